"""The GPU measurement behind ``bench/results/``: run by ``bench/gpu_suite.sh`` on a GPU machine.

Times with CUDA events (median of ``--reps`` after a warm-up), measures the bandwidth ceiling (a
same-size device-to-device copy) in the same run, and writes ``<out>/<date>-<gpu>.json`` and
``.md``; the table is printed last. Every figure quoted in the README comes from such a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402

from flowmatch_fast import FlowMatching, backends  # noqa: E402
from flowmatch_fast.kernels.reference import TimeGrid  # noqa: E402

ROWS: list = []


def row(workload, variant, seconds=None, **extra):
    r = {"workload": workload, "variant": variant,
         "median_us": None if seconds is None else seconds * 1e6, **extra}
    ROWS.append(r)
    shown = "" if seconds is None else f"{seconds * 1e6:10.1f} us"
    print(f"  {workload:26s} {variant:22s} {shown} {extra if extra else ''}", flush=True)
    return r


def environment():
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
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "driver": cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "nvcc": cmd(["nvcc", "--version"]).splitlines()[-1] if cmd(["which", "nvcc"]) else None,
        "cuda_extension": ext,
        "python": platform.python_version(),
        # the device copy of the tree may have no .git: the caller can pass the commit
        "commit": os.environ.get("FLOWMATCH_COMMIT") or cmd(["git", "rev-parse", "--short", "HEAD"]),
        "available_backends": backends.available_backends("cuda"),
    }


def copy_bandwidth(numel, reps):
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    med, best = W.cuda_time(lambda: dst.copy_(src), reps=reps)
    return 2 * numel * 4 / med / 1e9, med


def bench_kernel_alone(reps, copy_gbs):
    """One Euler update on the 50 MB state per backend: GB/s against the copy (issues 3 and 4)."""
    shape = (W.W2_BATCH, *W.W2_DIMS)
    n = torch.Size(shape).numel()
    grid = TimeGrid(torch.linspace(0, 1, 21, device="cuda"), shape[0], len(shape))
    for field_dtype, traj in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        sets = [(torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda").to(field_dtype))
                for _ in range(2)]
        out = torch.empty(shape, device="cuda")
        traj_buf = torch.empty(shape[0], 2, *shape[1:], device="cuda") if traj else None
        nbytes = n * (4 + field_dtype.itemsize + 4 + (4 if traj else 0))
        label = f"kernel-50MB-{str(field_dtype)[6:]}{'-traj' if traj else ''}"
        for name in ("torch", "triton", "cuda"):
            if backends.unavailable_reason(name, torch.device("cuda")):
                continue
            step = backends.resolve(name, torch.device("cuda")).euler_step
            k = [0]

            def fn():
                x, v = sets[k[0] % 2]
                k[0] += 1
                step(x, v, grid, 3, out, traj_buf[:, 1] if traj else None)

            # In a graph of 10 launches: the kernel alone, without the host's launch cost (Triton's
            # ~34 us per launch is close to this kernel's ~40 us, so eager timing is host-bound).
            med, _ = W.cuda_time(W.graph_of(fn, 10), reps=reps)
            med /= 10
            gbs = nbytes / med / 1e9
            eager, _ = W.cuda_time(fn, reps=reps)
            row(label, name, med, GBps=round(gbs, 1), pct_of_copy=round(100 * gbs / copy_gbs, 1),
                eager_us=round(eager * 1e6, 1))


def bench_launch_overhead(n_calls=5000):
    """Host time to enqueue one update on Alpamayo's tiny state (the GPU keeps up: launch-bound)."""
    x = torch.randn(6, 64, 2, device="cuda")
    v = torch.randn(6, 64, 2, device="cuda")
    grid = TimeGrid(torch.linspace(0, 1, 11, device="cuda"), 6, 3)
    out = torch.empty_like(x)
    for name in ("torch", "triton", "cuda"):
        if backends.unavailable_reason(name, torch.device("cuda")):
            continue
        step = backends.resolve(name, torch.device("cuda")).euler_step
        for _ in range(100):
            step(x, v, grid, 1, out)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_calls):
            step(x, v, grid, 1, out)
        host = (time.perf_counter() - t0) / n_calls
        torch.cuda.synchronize()
        row("launch-overhead-b6", name, host, note="host seconds per euler_step call")


def _bitwise(fn, ref_fn, seed=1234):
    torch.manual_seed(seed)
    a = fn()
    torch.manual_seed(seed)
    b = ref_fn()
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    return bool(torch.equal(a, b))


def bench_workload(label, x_dims, batch, field, steps, reps, all_steps=False, floor=False,
                   compile_=False, bytes_per_call=None, copy_gbs=None):
    variants = W.sampler_variants(x_dims, batch, field, "cuda", steps, all_steps)
    base = variants["original"]
    results = {}
    for name, fn in variants.items():
        med, best = W.cuda_time(fn, reps=reps)
        extra = {"bitwise_vs_original": _bitwise(fn, base)}
        if bytes_per_call:
            gbs = bytes_per_call / med / 1e9
            extra.update(GBps=round(gbs, 1), pct_of_copy=round(100 * gbs / copy_gbs, 1))
        results[name] = med
        row(label, name, med, **extra)
    if floor:
        fl = W.field_floor(field, batch, x_dims, "cuda", steps)
        med, _ = W.cuda_time(fl, reps=reps)
        results["floor"] = med
        row(label, "floor (field only, graph)", med)
    if compile_:
        try:
            fn, compile_s = W.compiled_original(x_dims, batch, field, "cuda", steps, all_steps)
            med, _ = W.cuda_time(fn, reps=reps)
            results["compile"] = med
            row(label, "torch.compile(reduce-overhead)", med, compile_s=round(compile_s, 1))
        except Exception as exc:  # noqa: BLE001
            row(label, "torch.compile(reduce-overhead)", None, error=repr(exc)[:300])
    best_graph = min((v, k) for k, v in results.items() if k.startswith("graph-")) if any(
        k.startswith("graph-") for k in results) else None
    if best_graph:
        summary = {"best_graph": best_graph[1],
                   "speedup_vs_original": round(results["original"] / best_graph[0], 2)}
        if "floor" in results:
            summary["ratio_to_floor"] = round(best_graph[0] / results["floor"], 3)
        if "compile" in results:
            summary["compile_vs_best_graph"] = round(results["compile"] / best_graph[0], 2)
        row(label, "summary", None, **summary)


def bench_memory_flat(replays=1000):
    fm = FlowMatching(x_dims=W.ALPAMAYO_DIMS)
    field = W.TinyExpert().cuda()
    with torch.no_grad():
        sampler = fm.capture(6, field, device="cuda")
    for _ in range(10):
        sampler()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(replays):
        out = sampler()
    del out
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    row("memory-1000-replays", "graph-auto", None, bytes_before=before, bytes_after=after,
        flat=before == after)


def write_results(env, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-")
    stem = os.path.join(out_dir, f"{env['date'][:10]}-{gpu}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "rows": ROWS}, f, indent=1)
    lines = [f"# flowmatch_fast GPU results, {env['date']}", "",
             f"- GPU: {env['gpu']} (sm {env['capability']}, {env['sm_count']} SMs), "
             f"driver {env['driver']}",
             f"- torch {env['torch']} (CUDA {env['torch_cuda']}), Triton {env['triton']}, "
             f"{env['nvcc']}, Python {env['python']}, commit {env['commit']}",
             f"- CUDA extension: {env['cuda_extension']}", "",
             "Medians of CUDA-event timings after warm-up. `graph-*`: replay of `FlowMatching.capture`;"
             " `ours-*`: eager `FlowMatching.sample`; `original`: the verbatim original loop.", "",
             "| workload | variant | median (us) | details |", "|---|---|---:|---|"]
    for r in ROWS:
        med = "" if r["median_us"] is None else f"{r['median_us']:.1f}"
        details = ", ".join(f"{k}={v}" for k, v in r.items()
                            if k not in ("workload", "variant", "median_us"))
        lines.append(f"| {r['workload']} | {r['variant']} | {med} | {details} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--compile", default="w1b6",
                    help="what to torch.compile (comma-separated): w1 (every batch), w1b<batch>, "
                         "w2, w3, or none; each compile costs ~10-60 s")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device")
    env = environment()
    print(json.dumps(env, indent=1), flush=True)
    sections = set(args.only.split(",")) if args.only else None
    compile_set = set(args.compile.split(","))

    def want(name):
        return sections is None or name in sections

    copy_gbs, copy_s = copy_bandwidth(W.W2_BATCH * torch.Size(W.W2_DIMS).numel(), args.reps)
    row("copy-50MB", "torch copy_", copy_s, GBps=round(copy_gbs, 1))
    steps = [
        ("kernel", lambda: bench_kernel_alone(args.reps, copy_gbs)),
        ("launch", bench_launch_overhead),
        ("w1", lambda: [bench_workload(f"W1-b{b}", W.ALPAMAYO_DIMS, b, W.TinyExpert().cuda(), 10,
                                       args.reps, floor=True,
                                       compile_=bool({"w1", f"w1b{b}"} & compile_set))
                        for b in W.W1_BATCHES]),
        ("w2", lambda: bench_workload(
            "W2-50MB-20steps", W.W2_DIMS, W.W2_BATCH, W.StoredField(W.W2_BATCH, W.W2_DIMS, "cuda"),
            W.W2_STEPS, max(10, args.reps // 5), compile_="w2" in compile_set,
            bytes_per_call=W.W2_STEPS * 12 * W.W2_BATCH * torch.Size(W.W2_DIMS).numel(),
            copy_gbs=copy_gbs)),
        ("w3", lambda: bench_workload(
            "W3-b48-100steps-all", W.ALPAMAYO_DIMS, 48, W.StoredField(48, W.ALPAMAYO_DIMS, "cuda"),
            W.W3_STEPS, args.reps, all_steps=True, compile_="w3" in compile_set)),
        ("memory", bench_memory_flat),
    ]
    extra = getattr(W, "EXTRA_GPU_SECTIONS", None)
    if extra:
        steps += [(name, lambda f=f: f(row, args.reps)) for name, f in extra]
    with torch.no_grad():
        for name, fn in steps:
            if not want(name):
                continue
            print(f"== {name}", flush=True)
            try:
                fn()
            except Exception:  # noqa: BLE001 - one broken section must not lose the others
                traceback.print_exc()
                row(name, "ERROR", None, error=traceback.format_exc(limit=3)[-400:])
            write_results(env, args.out)  # after every section: a time limit loses only the rest
    stem = write_results(env, args.out)
    print(f"\nwrote {stem}.json and {stem}.md\n")
    print(open(stem + ".md").read())


if __name__ == "__main__":
    main()
