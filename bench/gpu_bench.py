"""The GPU measurement behind ``bench/results/``: run by ``bench/gpu_suite.sh`` on a GPU machine.

Warms the GPU up, then times each workload's variants interleaved (CUDA events, median with the
10th-90th percentile spread beside it), measures the bandwidth ceiling (a same-size device copy)
in the same run, checks ``torch.equal`` wherever the contract says bitwise, and writes
``<out>/<date>-<gpu>.json`` and ``.md`` after every section; the table is printed last. Exits 1
when a section failed or a bitwise check did not hold: such a run does not count.

``--dry-run`` runs every section's Python entry on CPU with tiny sizes (CUDA graphs, the floor,
the kernel count and the memory check need CUDA and are reported as skipped), so the script is
tested where there is no GPU; it writes ``<out>/dry-run-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_workloads  # noqa: E402,F401  (registers the W6 RL section)
import workloads as W  # noqa: E402

from flowmatch_fast import FlowMatching, backends  # noqa: E402
from flowmatch_fast._original import original_sample  # noqa: E402
from flowmatch_fast.kernels.contract import TimeGrid  # noqa: E402
from flowmatch_fast.timing import Timing, synchronize, time_interleaved  # noqa: E402

ROWS: list = []
PROBLEMS: list = []  # failed sections and bitwise checks that did not hold: the run does not count


@dataclasses.dataclass(frozen=True)
class Sizes:
    device: str
    w1_batches: tuple
    w2: tuple  # batch, dims, steps
    w3: tuple  # batch, steps
    w5_config: str
    w5_batches: tuple
    launch_calls: int
    memory_replays: int


FULL = Sizes("cuda", W.W1_BATCHES, (W.W2_BATCH, W.W2_DIMS, W.W2_STEPS), (48, W.W3_STEPS), "2b",
             W.W5_BATCHES, 5000, 10_000)
# Each compile costs ~10 s (W1, measured on the H200) to minutes (W5 unrolled over 10 steps): only
# where the targets are (W1, W5 at batch 6: ours compile=True captured vs reduce-overhead); W1's
# four (~4 x 10 s) spend the shared --compile-budget first (120 s in gpu_suite.sh, not measured on
# a GPU: a W5 row past it reads "budget spent"). W1 batch 1 and 48: --compile w1b1:loop,...
COMPILE_DEFAULT = "w1b6:all,w5b6:ours"
OURS_COMPILED = "ours compile=True captured"
DRY = Sizes("cpu", (2,), (4, (3, 8, 8), 3), (4, 5), "small", (2,), 20, 0)


def row(workload, variant, timing=None, **extra):
    """Record one result; ``timing`` is a ``Timing``, plain seconds, or ``None``."""
    r = {"workload": workload, "variant": variant, "median_us": None}
    if isinstance(timing, Timing):
        r.update(median_us=timing.median * 1e6, p10_us=round(timing.p10 * 1e6, 1),
                 p90_us=round(timing.p90 * 1e6, 1))
    elif timing is not None:
        r["median_us"] = timing * 1e6
    r.update(extra)
    ROWS.append(r)
    shown = "" if r["median_us"] is None else f"{r['median_us']:10.1f} us"
    print(f"  {workload:26s} {variant:30s} {shown} {extra if extra else ''}", flush=True)
    return r


def skipped(section, why):
    row(section, "skipped", None, reason=why)


def environment(device):
    def cmd(args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            return f"unavailable ({exc})"

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        from flowmatch_fast import _cuda_euler
        ext = _cuda_euler.build_info()
    except Exception as exc:  # noqa: BLE001
        ext = f"not built ({exc})"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "nvcc": cmd(["nvcc", "--version"]).splitlines()[-1] if cmd(["which", "nvcc"]) else None,
        "cuda_extension": ext,
        "python": platform.python_version(),
        # the device copy of the tree may have no .git: the caller passes the commit
        "commit": os.environ.get("FLOWMATCH_COMMIT") or cmd(["git", "rev-parse", "--short", "HEAD"]),
        "available_backends": backends.available_backends(device),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}",
                   driver=cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        env.update(gpu="dry-run-cpu", sm_count=None, capability=None, driver=None)
    return env


@contextlib.contextmanager
def time_limit(seconds):
    """Raise ``TimeoutError`` in this (main) thread after ``seconds`` (0: no limit). Yields a list
    whose first item turns ``True`` when the limit fired (torch.compile may re-raise the error as
    another type). Import torch._dynamo and torch._inductor before: an import cut short by the
    alarm leaves half-initialised modules behind."""
    fired = [False]

    def expired(signum, frame):
        fired[0] = True
        raise TimeoutError(f"exceeded {seconds} s")

    if not seconds:
        yield fired
        return
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(int(seconds))
    try:
        yield fired
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _bitwise(fn, ref_fn, seed=1234):
    torch.manual_seed(seed)
    a = fn()
    a = (a[0] if isinstance(a, tuple) else a).clone()  # before ref_fn may replay over it
    torch.manual_seed(seed)
    b = ref_fn()
    b = b[0] if isinstance(b, tuple) else b
    return bool(torch.equal(a, b))


# ----------------------------------------------------------------------------- sections
def copy_bandwidth(numel, reps, device):
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    tm = time_interleaved({"copy": lambda: dst.copy_(src)}, device, reps)["copy"]
    gbs = 2 * numel * 4 / tm.median / 1e9
    row(f"copy-{numel * 4 / 1e6:.3g}MB", "torch copy_", tm, GBps=round(gbs, 1))
    return gbs


def bench_kernel_alone(sz, reps, copy_gbs):
    """One Euler update of the W2 state per backend, GB/s against the copy: timed inside a graph
    of 10 launches (the kernel alone, without the host's launch cost: Triton's ~34 us per launch
    is close to this kernel's ~40 us), and eagerly beside it."""
    batch, dims, _ = sz.w2
    shape = (batch, *dims)
    device = torch.device(sz.device)
    n = torch.Size(shape).numel()
    grid = TimeGrid(torch.linspace(0, 1, 21, device=device), shape[0], len(shape))
    on_cuda = device.type == "cuda"
    if not on_cuda:
        skipped("kernel-alone", "the in-graph timing needs CUDA; eager timing only")
    for field_dtype, traj in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        sets = [(torch.randn(shape, device=device), torch.randn(shape, device=device).to(field_dtype))
                for _ in range(2)]
        out = torch.empty(shape, device=device)
        traj_buf = torch.empty(shape[0], 2, *shape[1:], device=device) if traj else None
        nbytes = n * (4 + field_dtype.itemsize + 4 + (4 if traj else 0))
        label = f"kernel-{n * 4 / 1e6:.3g}MB-{str(field_dtype)[6:]}{'-traj' if traj else ''}"
        for name in ("torch", "triton", "cuda"):
            if backends.unavailable_reason(name, device):
                continue
            step = backends.resolve(name, device).euler_step
            k = [0]

            def fn():
                x, v = sets[k[0] % 2]
                k[0] += 1
                step(x, v, grid, 3, out, traj_buf[:, 1] if traj else None)

            fns = {"eager": fn}
            if on_cuda:
                fns["graph10"] = W.graph_of(fn, 10)
            tms = time_interleaved(fns, device, reps)
            eager = tms["eager"]
            if on_cuda:
                tm = Timing(*(v / 10 for v in tms["graph10"]))
                gbs = nbytes / tm.median / 1e9
                row(label, name, tm, GBps=round(gbs, 1), pct_of_copy=round(100 * gbs / copy_gbs, 1),
                    eager_us=round(eager.median * 1e6, 1))
            else:
                row(label, f"{name} (eager)", eager)


def bench_launch_overhead(sz):
    """Host time to enqueue one update on Alpamayo's tiny state (the GPU keeps up: launch-bound)."""
    device = torch.device(sz.device)
    x = torch.randn(6, 64, 2, device=device)
    v = torch.randn(6, 64, 2, device=device)
    grid = TimeGrid(torch.linspace(0, 1, 11, device=device), 6, 3)
    out = torch.empty_like(x)
    for name in ("torch", "triton", "cuda"):
        if backends.unavailable_reason(name, device):
            continue
        step = backends.resolve(name, device).euler_step
        for _ in range(100):
            step(x, v, grid, 1, out)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(sz.launch_calls):
            step(x, v, grid, 1, out)
        host = (time.perf_counter() - t0) / sz.launch_calls
        synchronize(device)
        row("launch-overhead-b6", name, host, note="host seconds per euler_step call")


class CompileBudget:
    """Seconds for all of a run's compiles together (``None``: no budget): each compile may take
    its own limit cut to what is left; once it is spent the remaining compiles are not tried, so
    the bench phase ends within its time limit in bench/gpu_suite.sh."""

    def __init__(self, total=None):
        self.left = total

    @staticmethod
    def out_of_time(why):
        return why.startswith(("compile exceeded", "not compiled"))

    def run(self, make, limit):
        """``(make(), None)``, or ``(None, why)`` when it raised, ran past its time, or no budget
        was left. ``limit``: seconds for this compile (0: none)."""
        if self.left is not None:
            if self.left < 1:
                return None, "not compiled: the run's compile budget is spent"
            limit = int(min(limit or self.left, self.left))
        fired, t0 = [False], time.perf_counter()
        try:
            with time_limit(limit) as fired:
                return make(), None
        except Exception as exc:  # noqa: BLE001 - a peer that does not compile is a result
            # (no dynamo reset here: it would drop the variants of this workload compiled already)
            return None, (f"compile exceeded {limit} s" if fired[0]
                          else traceback.format_exc(limit=3)[-400:])
        finally:
            if self.left is not None:
                self.left -= time.perf_counter() - t0


COMPILES = CompileBudget()  # main() sets the total from --compile-budget


def _compile_row(label, name, make, limit, fns, compile_s):
    """Build one compiled variant within its time; a failure or a timeout is a row."""
    built, why = COMPILES.run(make, limit)
    if why is None:
        fns[name], compile_s[name] = built
    else:
        row(label, name, None, error=why)


def bench_workload(label, x_dims, batch, field, steps, reps, sz, names=W.VARIANTS, all_steps=False,
                   floor=False, compile_="", compile_limit=0, bytes_per_call=None, copy_gbs=None):
    """Every variant of one workload, timed interleaved, each checked against its reference.

    ``compile_``: ``""`` (none), ``"loop"`` (torch.compile of the original loop, reduce-overhead,
    default numerics), ``"ours"`` (also ours with ``compile=True`` captured, bitwise status
    reported as the peers'), ``"peers"`` or ``"all"`` (also the original in eager-numerics mode,
    and the compiled-field rows).
    """
    device = torch.device(sz.device)
    if compile_:
        torch._dynamo.reset()  # earlier workloads' compiled loops share code objects with these
    fns = W.sampler_variants(x_dims, batch, field, device, steps, all_steps, names)
    refs = {name: "original" for name in fns if name != "original"}  # must be bitwise
    on_cuda = device.type == "cuda"
    if floor:
        if on_cuda:
            fns["floor (field only, graph)"] = W.field_floor(field, batch, x_dims, device, steps)
        else:
            skipped(label, "floor: a CUDA graph of the field alone needs CUDA")
    compile_s = {}
    peers = []  # compiled loops: bitwise status reported, not required
    if compile_:
        _compile_row(label, "torch.compile(reduce-overhead)", lambda: W.compiled_original(
            x_dims, batch, field, device, steps, all_steps), compile_limit, fns, compile_s)
        peers.append("torch.compile(reduce-overhead)")
    if compile_ in ("ours", "peers", "all"):
        _compile_row(label, OURS_COMPILED, lambda: W.compiled_ours(
            x_dims, batch, field, device, steps), compile_limit, fns, compile_s)
        peers.append(OURS_COMPILED)
    if compile_ in ("peers", "all"):
        _compile_row(label, "torch.compile(reduce-overhead, eager-numerics)",
                     lambda: W.compiled_original(x_dims, batch, field, device, steps, all_steps,
                                                 eager_numerics=True),
                     compile_limit, fns, compile_s)
        peers.append("torch.compile(reduce-overhead, eager-numerics)")
    if compile_ in ("peers", "all"):  # ours composing with a compiled field: must work, bitwise
        built, why = COMPILES.run(lambda: W.compiled_field_variants(x_dims, batch, field, device,
                                                                     steps), compile_limit)
        if why is None:
            cfns, compile_s["compiled-field-original"] = built
            fns.update(cfns)
            refs.update({n: "compiled-field-original" for n in cfns if n != "compiled-field-original"})
        else:
            row(label, "compiled-field", None, error=why)
            if not CompileBudget.out_of_time(why):  # past its time it is torch.compile's, not ours
                PROBLEMS.append(f"{label}: compiled-field")
    # bitwise first (before timing: a broken variant is reported even when timing it would fail)
    status = {name: _bitwise(fns[name], fns[ref]) for name, ref in refs.items()}
    status.update({name: _bitwise(fns[name], fns["original"]) for name in peers if name in fns})
    timings = time_interleaved(fns, device, reps)
    for name, tm in timings.items():
        extra = {}
        if name in status:
            extra[f"bitwise_vs_{refs.get(name, 'original')}"] = status[name]
            if name in refs and not status[name]:
                PROBLEMS.append(f"{label}: {name} not bitwise to {refs[name]}")
        if name in compile_s:
            extra["compile_s"] = round(compile_s[name], 1)
        if bytes_per_call:
            gbs = bytes_per_call / tm.median / 1e9
            extra.update(GBps=round(gbs, 1), pct_of_copy=round(100 * gbs / copy_gbs, 1))
        row(label, name, tm, **extra)
    _summary(label, {name: tm.median for name, tm in timings.items()})


def _summary(label, med):
    graphs = {k: v for k, v in med.items() if k.startswith("graph-")}
    if not graphs:
        return
    best = min(graphs, key=graphs.get)
    summary = {"best_graph": best, "speedup_vs_original": round(med["original"] / graphs[best], 2)}
    ratios = {"floor (field only, graph)": "ratio_to_floor",
              "per-forward-graphs": "ratio_to_per_forward_graphs",
              "torch.compile(reduce-overhead)": "ratio_to_compile",
              "torch.compile(reduce-overhead, eager-numerics)": "ratio_to_compile_eager_numerics"}
    pair = med.get(OURS_COMPILED), med.get("torch.compile(reduce-overhead)")
    if None not in pair:  # issue 23's target: <= 1.0
        summary["ours_compiled_to_compile"] = round(pair[0] / pair[1], 3)
    for name, key in ratios.items():
        if name in med:
            summary[key] = round(graphs[best] / med[name], 3)
    if "compiled-field-graph" in med and "torch.compile(reduce-overhead)" in med:
        summary["compiled_field_graph_to_compile"] = round(
            med["compiled-field-graph"] / med["torch.compile(reduce-overhead)"], 3)
    row(label, "summary", None, **summary)


def bench_kernel_count(sz):
    """The kernels of one W1 (batch 6) replay against those of the field's own 10 calls: what is
    left beyond the field should be the noise draw and one update per step."""
    if sz.device != "cuda":
        return skipped("kernel-count-W1-b6", "counts the kernels of a CUDA graph replay")
    from torch.profiler import ProfilerActivity, profile

    field = W.TinyExpert().cuda()

    def kernels(fn):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        counts = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        return counts

    backend = "cuda" if backends.unavailable_reason("cuda", torch.device("cuda")) is None else "triton"
    sampler = W.make_variant(f"graph-{backend}", W.ALPAMAYO_DIMS, 6, field, "cuda", 10)
    floor_replay = W.field_floor(field, 6, W.ALPAMAYO_DIMS, "cuda", 10)
    ours, floor = kernels(lambda: sampler(static_output=True)), kernels(floor_replay)
    counted = "graph replay"
    if not ours or not floor:  # a profiler that does not see inside graphs: the same calls eagerly
        fm = FlowMatching(x_dims=W.ALPAMAYO_DIMS, backend=backend)
        x = torch.randn(6, *W.ALPAMAYO_DIMS, device="cuda")
        ts = [torch.full((6, 1, 1), i / 10, device="cuda") for i in range(10)]
        ours = kernels(lambda: fm.sample(6, field, device="cuda"))
        floor = kernels(lambda: [field(x=x, t=t) for t in ts])
        counted = "eager calls (the profiler saw no kernels inside the replay)"
    extra = {n: c - floor.get(n, 0) for n, c in ours.items() if c != floor.get(n, 0)}
    # The noise draw and 10 updates; an eager call also builds its time grid (1 linspace), a
    # graph holds it (built once before the capture).
    expected = 1 + 10 if counted == "graph replay" else 1 + 1 + 10
    row("kernel-count-W1-b6", f"one call, backend {backend}", None, counted_from=counted,
        kernels=sum(ours.values()),
        field_kernels=sum(floor.values()), beyond_field=sum(extra.values()),
        expected_beyond_field=expected, as_expected=sum(extra.values()) == expected,
        beyond_field_by_name={n[:80]: c for n, c in sorted(extra.items())})


def bench_memory_flat(sz):
    if sz.device != "cuda":
        return skipped(f"memory-{sz.memory_replays}-replays", "replays a CUDA graph")
    fm = FlowMatching(x_dims=W.ALPAMAYO_DIMS)
    field = W.TinyExpert().cuda()
    sampler = fm.capture(6, field, device="cuda")
    for _ in range(10):
        sampler()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(sz.memory_replays):
        out = sampler()
    del out
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    row(f"memory-{sz.memory_replays}-replays", "graph-auto", None, bytes_before=before,
        bytes_after=after, flat=before == after)
    if before != after:
        PROBLEMS.append(f"memory grew over {sz.memory_replays} replays: {before} -> {after}")


def write_results(env, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-")
    stem = os.path.join(out_dir, gpu if gpu == "dry-run-cpu" else f"{env['date'][:10]}-{gpu}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "rows": ROWS, "problems": PROBLEMS}, f, indent=1)
    clock = "host-clock" if env["gpu"] == "dry-run-cpu" else "CUDA-event"
    lines = [f"# flowmatch_fast GPU results, {env['date']}", "",
             f"- GPU: {env['gpu']} (sm {env['capability']}, {env['sm_count']} SMs), "
             f"driver {env['driver']}",
             f"- torch {env['torch']} (CUDA {env['torch_cuda']}), Triton {env['triton']}, "
             f"{env['nvcc']}, Python {env['python']}, commit {env['commit']}",
             f"- CUDA extension: {env['cuda_extension']}",
             f"- problems: {'; '.join(PROBLEMS) if PROBLEMS else 'none'}", "",
             f"Medians of per-call {clock} timings after a warm-up, the variants of a workload "
             "interleaved; p10-p90 beside each. `graph-*`: replay of `FlowMatching.capture`; `ours-*`: "
             "eager `FlowMatching.sample`; `original`: the verbatim original loop; "
             "`per-forward-graphs`: the original loop, each field call replayed from its own graph; "
             "`compiled-field-*`: `torch.compile(field)` under the original loop and under ours "
             f"captured; `{OURS_COMPILED}`: `FlowMatching.capture(..., compile=True)`, the whole "
             "call compiled (eager numerics) and captured in our graph.", "",
             "| workload | variant | median (us) | p10-p90 (us) | details |", "|---|---|---:|---:|---|"]
    for r in ROWS:
        med = "" if r["median_us"] is None else f"{r['median_us']:.1f}"
        spread = f"{r['p10_us']}-{r['p90_us']}" if "p10_us" in r else ""
        details = ", ".join(f"{k}={v}" for k, v in r.items()
                            if k not in ("workload", "variant", "median_us", "p10_us", "p90_us"))
        lines.append(f"| {r['workload']} | {r['variant']} | {med} | {spread} | {details} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


def sections(sz, args, copy_gbs):
    """``[(name, fn)]`` in the order they run: the launch-bound workloads (the README's headline)
    first, the long compiles last."""
    wanted = dict((t.split(":") + ["all"])[:2] for t in args.compile.split(",") if t)
    dev = sz.device

    def compile_for(tag):
        return wanted.get(tag, "")

    w2_batch, w2_dims, w2_steps = sz.w2
    w3_batch, w3_steps = sz.w3
    w2_numel = w2_batch * torch.Size(w2_dims).numel()
    out = [
        ("w1", lambda: [bench_workload(
            f"W1-b{b}", W.ALPAMAYO_DIMS, b, W.TinyExpert().to(dev), 10, args.reps, sz,
            names=W.VARIANTS + ("per-forward-graphs",), floor=True,
            compile_=compile_for(f"w1b{b}"), compile_limit=args.compile_limit)
            for b in sz.w1_batches]),
        ("w5", lambda: [bench_workload(
            f"W5-{sz.w5_config}-b{b}", W.ALPAMAYO_DIMS, b, W.w5_expert(sz.w5_config, b, dev), 10,
            args.reps, sz, names=W.W5_VARIANTS, floor=True, compile_=compile_for(f"w5b{b}"),
            compile_limit=args.compile_limit) for b in sz.w5_batches]),
        ("kernel-count", lambda: bench_kernel_count(sz)),
        ("kernel", lambda: bench_kernel_alone(sz, args.reps, copy_gbs)),
        ("launch", lambda: bench_launch_overhead(sz)),
        ("w2", lambda: bench_workload(
            f"W2-{w2_numel * 4 / 1e6:.3g}MB-{w2_steps}steps", w2_dims, w2_batch,
            W.StoredField(w2_batch, w2_dims, dev), w2_steps, max(10, args.reps // 5), sz,
            bytes_per_call=w2_steps * 12 * w2_numel, copy_gbs=copy_gbs)),
        ("w3", lambda: bench_workload(
            f"W3-b{w3_batch}-{w3_steps}steps-all", W.ALPAMAYO_DIMS, w3_batch,
            W.StoredField(w3_batch, W.ALPAMAYO_DIMS, dev), w3_steps, args.reps, sz, all_steps=True,
            compile_=compile_for("w3"), compile_limit=args.compile_limit)),
        ("memory", lambda: bench_memory_flat(sz)),
    ]
    for name, f in getattr(W, "EXTRA_GPU_SECTIONS", ()):
        if "device" in inspect.signature(f).parameters:
            out.append((name, lambda f=f: f(row, args.reps, device=dev)))
        elif dev == "cuda":
            out.append((name, lambda f=f: f(row, args.reps)))
        else:
            out.append((name, lambda name=name: skipped(name, "this section takes no device: "
                                                              "written for CUDA")))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder (default bench/results; dry run: "
                                                 "a temporary folder)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per variant (100; dry: 3)")
    ap.add_argument("--compile", default=COMPILE_DEFAULT,
                    help="comma-separated <workload>[:loop|ours|peers|all] (w1b<batch>, w5b<batch>, "
                         "w3): loop = torch.compile(reduce-overhead) of the original loop; ours = "
                         "also ours with compile=True, captured in our CUDA graph; peers or all "
                         "(the default) = also the original in eager-numerics mode, and the "
                         f"compiled-field rows. Dry run: none unless given. Default: {COMPILE_DEFAULT}")
    ap.add_argument("--compile-limit", type=int, default=90,
                    help="seconds allowed to one compile; past it the row says so (0: no limit)")
    ap.add_argument("--compile-budget", type=int, default=0,
                    help="seconds for all compiles together; each gets its limit cut to what is "
                         "left, and none is tried once it is spent (0: no budget)")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    ap.add_argument("--dry-run", action="store_true",
                    help="every section's entry on CPU with tiny sizes (no GPU needed)")
    args = ap.parse_args()
    sz = DRY if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device (or --dry-run)")
    if args.dry_run and not any(a.startswith("--compile=") or a == "--compile" for a in sys.argv):
        args.compile = ""  # compiles take seconds to minutes on CPU: only when asked
    args.reps = args.reps or (3 if args.dry_run else 100)
    COMPILES.left = args.compile_budget or None
    args.out = args.out or (os.path.join(os.environ.get("TMPDIR", "/tmp"), "flowmatch_dry_run")
                            if args.dry_run else os.path.join(os.path.dirname(__file__), "results"))
    env = environment(sz.device)
    print(json.dumps(env, indent=1), flush=True)
    only = set(filter(None, args.only.split(",")))
    if args.compile:  # imported before any compile's time limit can cut an import short
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor.compile_fx")
    t_start = time.perf_counter()
    with torch.no_grad():
        W.warm_up_device(sz.device)
        w2_numel = sz.w2[0] * torch.Size(sz.w2[1]).numel()
        copy_gbs = copy_bandwidth(w2_numel, args.reps, sz.device)
        for name, fn in sections(sz, args, copy_gbs):
            if only and name not in only:
                continue
            print(f"== {name} [{time.perf_counter() - t_start:.0f}s]", flush=True)
            t0 = time.perf_counter()
            try:
                fn()
            except Exception:  # noqa: BLE001 - one broken section must not lose the others
                traceback.print_exc()
                PROBLEMS.append(f"section {name} failed")
                row(name, "ERROR", None, error=traceback.format_exc(limit=3)[-400:])
            row(name, "section wall time", None, seconds=round(time.perf_counter() - t0, 1))
            write_results(env, args.out)  # after every section: a time limit loses only the rest
    stem = write_results(env, args.out)
    print(f"\nwrote {stem}.json and {stem}.md\n")
    print(open(stem + ".md").read())
    if PROBLEMS:
        print("PROBLEMS (this run does not count):\n  " + "\n  ".join(PROBLEMS))
        sys.exit(1)


if __name__ == "__main__":
    main()
