"""``python -m flowmatch_fast demo``: train a tiny flow on a 2-D toy, sample it, time it, plot it.

In about 15 s on a 2-core CPU (about 8 s with ``--fast``): trains a small MLP velocity field on a
2-D toy (two moons, or a ring of 8 Gaussians) with ``construct_training_data`` and
``compute_loss_from_pred``; samples it with ``FlowMatching.sample`` and scores the samples against
held-out data by the maximum mean discrepancy (MMD, multi-scale RBF kernel; the headline, since
it sees mass smeared between the ring's modes) and the sliced Wasserstein distance, next to the
initial noise and a fresh draw of the data (the finite-sample floor); times ``sample`` against the
original Alpamayo-R1 loop (:func:`flowmatch_fast._original.original_sample`) on the same field,
checking that both are bitwise equal (on CUDA also the captured sampler, ``FlowMatching.capture``);
writes a PNG of the data, the samples and a few trajectories. From Python: :func:`run_demo`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional, Union

import torch

from ._original import original_sample
from .demo_toy import DATASETS, VelocityMLP, mmd_rbf, plot_demo, sliced_wasserstein, toy_data
from .flow_matching import FlowMatching

X_DIMS = (2,)

# Default and --fast settings. The --fast ones are what the tests run. Both clear the required 3x
# (noise MMD / sample MMD) with a margin: measured ~9x (default) and ~8x (--fast) on the ring;
# two moons is harder for this small MLP (~5x).
DEFAULTS = dict(train_steps=5000, train_batch=256, lr=5e-3, num_samples=4000, repeats=15)
FAST = dict(train_steps=2500, train_batch=256, lr=1e-2, num_samples=4000, repeats=5)
NUM_TRAJECTORIES = 40
REAL_USE_BATCH = 6  # Alpamayo-R1 draws 6 trajectories per scene by default
DEFAULT_PNG = "flowmatch_demo.png"


# ---------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fns, device: torch.device, repeats: int, warmup: int = 2):
    """Median wall time in seconds of each ``fn()`` in ``fns``, over ``repeats`` calls each.

    The calls are interleaved (one of each per round, the order rotating every round), so a
    machine that slows down or speeds up during the measurement affects every function alike.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times = [[] for _ in fns]
    for r in range(repeats):
        for j in range(len(fns)):
            k = (j + r) % len(fns)
            start = time.perf_counter()
            fns[k]()
            _sync(device)
            times[k].append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.2f} ms"


def _time_row(label, n, t, small, t_small, t_ref, t_ref_small) -> str:
    """One summary line: time per call at both batch sizes, with the speedup over the original."""
    def cell(batch, seconds, ref):
        if seconds is None:
            return f"batch {batch}: n/a"
        return f"batch {batch}: {_fmt_time(seconds):>9} ({ref / seconds:4.2f}x)"

    return f"                  {label:<15}{cell(n, t, t_ref)}   {cell(small, t_small, t_ref_small)}"


# ---------------------------------------------------------------------------------- the demo
class DemoError(ValueError):
    """A setting the demo cannot run with; the command line prints it without a traceback."""


def check_device(device: Union[str, torch.device]) -> torch.device:
    """The device to train and sample on: CPU, or CUDA when this torch sees a GPU."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise DemoError(f"--device {device!r}: the demo runs on 'cpu' or 'cuda' ({exc})") from None
    if parsed.type not in ("cpu", "cuda"):
        raise DemoError(f"--device {str(parsed)!r}: the demo runs on 'cpu' or 'cuda' (it trains "
                        "and times real computations)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {str(parsed)!r}: this torch sees no CUDA device "
                        "(torch.cuda.is_available() is False)")
    return parsed


def resolve_out(out: Optional[str]) -> Optional[str]:
    """The figure's absolute path: ``flowmatch_demo.png`` inside ``out`` when it names an existing
    directory, else ``out``, whose directory must exist (the demo creates no directories)."""
    if out is None:
        return None
    if os.path.isdir(out):
        return os.path.abspath(os.path.join(out, DEFAULT_PNG))
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise DemoError(f"--out {out!r}: the directory {parent} does not exist (the demo creates "
                        "no directories: make it first, or name an existing one)")
    return os.path.abspath(out)


def train_field(fm: FlowMatching, cfg: dict, dataset: str, seed: int, device: torch.device,
                progress: bool = True):
    """Train a fresh :class:`VelocityMLP` (initialised from the current RNG state) for
    ``cfg["train_steps"]`` steps. Returns ``(model in eval mode, final loss EMA or None, seconds)``."""
    model = VelocityMLP().to(device)
    start, final_loss = time.perf_counter(), None
    if cfg["train_steps"] > 0:
        from tqdm.auto import tqdm

        data_gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg["lr"], total_steps=cfg["train_steps"], pct_start=0.1)
        bar = tqdm(range(cfg["train_steps"]), desc="training", disable=not progress,
                   mininterval=0.25, dynamic_ncols=True)
        for _ in bar:
            data = fm.construct_training_data(toy_data(dataset, cfg["train_batch"], data_gen).to(device))
            loss = fm.compute_loss_from_pred(data, model(data["noisy_x"], data["timesteps"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            final_loss = value if final_loss is None else 0.98 * final_loss + 0.02 * value
            bar.set_postfix(loss=f"{final_loss:.4f}", refresh=False)
        bar.close()
    return model.eval(), final_loss, time.perf_counter() - start


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def score_samples(fm: FlowMatching, step_fn, dataset: str, n: int, seed: int,
                  device: torch.device) -> dict:
    """Sample ``n`` points after ``torch.manual_seed(seed)``, keeping every step, and score the
    noise, the samples and a fresh draw of the data against held-out data (MMD and sliced W1)."""
    heldout = toy_data(dataset, n, torch.Generator().manual_seed(seed + 1_000_003))
    fresh = toy_data(dataset, n, torch.Generator().manual_seed(seed + 2_000_003))
    torch.manual_seed(seed)
    states, grid = fm.sample(n, step_fn, device=device, return_all_steps=True)
    mmd = [mmd_rbf(c, heldout) for c in (states[:, 0], states[:, -1], fresh)]
    sw = [sliced_wasserstein(c, heldout) for c in (states[:, 0], states[:, -1], fresh)]
    return dict(states=states, grid=grid, heldout=heldout, metric="mmd_rbf",
                noise_metric=mmd[0], sample_metric=mmd[1], data_floor_metric=mmd[2],
                ratio=_ratio(mmd[0], mmd[1]), sw_noise=sw[0], sw_samples=sw[1],
                sw_data_floor=sw[2], sw_ratio=_ratio(sw[0], sw[1]))


def time_sampling(fm: FlowMatching, step_fn, n: int, steps: int, seed: int, device: torch.device,
                  repeats: int, states: torch.Tensor, grid: torch.Tensor) -> dict:
    """Check ``sample`` (and its trajectories ``states``, ``grid``) bitwise against the original
    loop under the same seed; time both at batch ``n`` and 6, and on CUDA the captured sampler."""
    small = REAL_USE_BATCH

    def run_original(batch, **kwargs):
        torch.manual_seed(seed)
        return original_sample(list(X_DIMS), batch, step_fn, device=device, inference_step=steps,
                               **kwargs)

    def run_ours(batch):
        torch.manual_seed(seed)
        return fm.sample(batch, step_fn, device=device, inference_step=steps)

    ref = run_original(n)
    ref_states, ref_grid = run_original(n, return_all_steps=True)
    r = dict(bitwise_equal=bool(torch.equal(ref, run_ours(n)) and torch.equal(ref_states, states)
                                and torch.equal(ref_grid, grid)),
             time_captured_s=None, time_captured_small_s=None)
    r["time_original_s"], r["time_ours_s"] = time_calls(
        [lambda: run_original(n), lambda: run_ours(n)], device, repeats)
    r["time_original_small_s"], r["time_ours_small_s"] = time_calls(
        [lambda: run_original(small), lambda: run_ours(small)], device, repeats * 4)
    if device.type != "cuda":
        r["capture_note"] = "captured-graph sampler: CUDA only (run with --device cuda)"
        return r
    try:
        sampler = fm.capture(n, step_fn, device=device, inference_step=steps)
        torch.manual_seed(seed)
        capture_equal = bool(torch.equal(sampler(), ref))
        (r["time_captured_s"],) = time_calls([sampler], device, repeats)
        sampler_small = fm.capture(small, step_fn, device=device, inference_step=steps)
        (r["time_captured_small_s"],) = time_calls([sampler_small], device, repeats * 4)
        r["capture_note"] = f"captured sampler bitwise equal to the original: {capture_equal}"
    except Exception as exc:  # report and carry on: the rest of the demo stands on its own
        r["capture_note"] = f"captured sampler failed ({type(exc).__name__}: {exc}); skipped"
    return r


def report(r: dict) -> str:
    """The summary printed at the end, from :func:`run_demo`'s results."""
    n, small, reps = r["num_samples"], REAL_USE_BATCH, r["repeats"]
    if r["final_loss"] is None:
        training = ("none (train_steps=0): the field is untrained, so the samples are not "
                    "expected to resemble the data")
    else:
        training = (f"{r['train_steps']} steps in {r['train_s']:.1f} s, final loss (EMA) "
                    f"{r['final_loss']:.4f}")
    lines = ["", "== summary " + "=" * 60, f"training      : {training}",
             "quality       : distance to held-out data, lower is better   MMD (RBF)   sliced W1"]
    for label, mmd, sw in (("initial noise (t=0)", "noise_metric", "sw_noise"),
                           ("samples (t=1)", "sample_metric", "sw_samples"),
                           ("fresh draw of the data (the floor)", "data_floor_metric", "sw_data_floor")):
        lines.append(f"{'':18}{label:<44}{r[mmd]:9.4f}   {r[sw]:9.4f}")
    lines += [
        f"{'':18}-> samples are {r['ratio']:.1f}x closer than the noise (MMD; "
        f"{r['sw_ratio']:.1f}x in sliced W1)",
        f"bitwise       : FlowMatching.sample == original loop (torch.equal): {r['bitwise_equal']}",
        f"time per call : {r['steps']} Euler steps, same field, median of {reps} calls "
        f"({reps * 4} for batch {small})",
    ]
    for label, key in (("original loop", "original"), ("ours (sample)", "ours"),
                       ("ours (capture)", "captured")):
        if r[f"time_{key}_s"] is not None:
            lines.append(_time_row(label, n, r[f"time_{key}_s"], small, r[f"time_{key}_small_s"],
                                   r["time_original_s"], r["time_original_small_s"]))
    lines.append(f"                ({r['capture_note']})")
    if r["device"] == "cpu":
        lines.append("                (on CPU the MLP dominates each call, so expect ~1x; the "
                     "gains are on GPU)")
    lines += [f"figure        : {r['png'] or '(not written)'}", f"wall time     : {r['wall_s']:.1f} s"]
    return "\n".join(lines)


def run_demo(
    steps: int = 20,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    out: Optional[str] = DEFAULT_PNG,
    fast: bool = False,
    train_steps: Optional[int] = None,
    dataset: str = "ring",
    num_samples: Optional[int] = None,
    repeats: Optional[int] = None,
    timestep_sampler: str = "uniform",
    progress: bool = True,
    threads: Optional[int] = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Train, sample, score, time and plot; print a summary and return the results as a dict.

    Keys: the settings used; ``noise_metric``, ``sample_metric``, ``data_floor_metric`` (MMD to
    held-out data of the initial noise, of the samples, of a fresh draw of the data), ``ratio``
    (noise / sample), ``sw_noise``, ``sw_samples``, ``sw_data_floor``, ``sw_ratio`` (the same in
    sliced W1); ``final_loss`` (``None`` untrained), ``train_s``; ``bitwise_equal``;
    ``time_{original,ours,captured}_s`` and ``time_{...}_small_s`` (captured: ``None`` off CUDA),
    ``speedup``, ``speedup_small``, ``capture_note``; ``png`` (absolute path, ``None`` when ``out``
    is ``None``), ``wall_s``. Bad settings raise :class:`DemoError` before any work.
    """
    wall_start = time.perf_counter()
    cfg = dict(FAST if fast else DEFAULTS)
    for key, value in (("train_steps", train_steps), ("num_samples", num_samples),
                       ("repeats", repeats)):
        if value is not None:
            cfg[key] = value
    if steps < 1 or cfg["train_steps"] < 0 or cfg["num_samples"] < 2 or cfg["repeats"] < 1:
        raise DemoError("need steps >= 1, train_steps >= 0, num_samples >= 2, repeats >= 1")
    if dataset not in DATASETS:
        raise DemoError(f"dataset must be one of {DATASETS}; got {dataset!r}")
    if threads is not None and threads < 1:
        raise DemoError(f"threads must be >= 1 or None, got {threads}")
    device, png, n = check_device(device), resolve_out(out), cfg["num_samples"]
    fm = FlowMatching(x_dims=list(X_DIMS), num_inference_steps=steps,
                      train_timestep_sampler=timestep_sampler)
    log(f"flowmatch_fast demo: {dataset} (2-D), device={device}, seed={seed}, "
        f"{cfg['train_steps']} training steps, {steps} inference steps, {n} samples"
        + (" [--fast]" if fast else ""))
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model, final_loss, train_s = train_field(fm, cfg, dataset, seed, device, progress)

        def step_fn(*, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t)

        scores = score_samples(fm, step_fn, dataset, n, seed, device)
        log(f"MMD to held-out data: noise {scores['noise_metric']:.4f}, samples "
            f"{scores['sample_metric']:.4f} ({scores['ratio']:.1f}x better), fresh data "
            f"{scores['data_floor_metric']:.4f} (finite-sample floor)")
        states, grid, heldout = scores.pop("states"), scores.pop("grid"), scores.pop("heldout")
        timing = time_sampling(fm, step_fn, n, steps, seed, device, cfg["repeats"], states, grid)
        log("bitwise equal to the original loop (torch.equal, same seed; final states and "
            f"return_all_steps trajectories): {timing['bitwise_equal']}")
        if png is not None:
            plot_demo(png, heldout, states[:, -1], states[:min(NUM_TRAJECTORIES, n)],
                      scores["noise_metric"], scores["sample_metric"],
                      title=(f"flowmatch_fast demo: {dataset}, {cfg['train_steps']} training "
                             f"steps, {steps} Euler steps, seed {seed}"))
    finally:
        torch.set_num_threads(prev_threads)
    result = dict(dataset=dataset, device=str(device), seed=seed, steps=steps,
                  train_steps=cfg["train_steps"], num_samples=n, repeats=cfg["repeats"],
                  final_loss=final_loss, train_s=train_s, **scores, **timing, png=png,
                  speedup=_ratio(timing["time_original_s"], timing["time_ours_s"]),
                  speedup_small=_ratio(timing["time_original_small_s"], timing["time_ours_small_s"]),
                  wall_s=time.perf_counter() - wall_start)
    log(report(result))
    return result


# ---------------------------------------------------------------------------------- CLI
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _default(key: str) -> str:
    normal, fast = DEFAULTS[key], FAST[key]
    return f"default: {normal}" + ("" if normal == fast else f", or {fast} with --fast")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--steps", type=_int_at_least(1), default=20,
                        help="Euler steps per sample call, i.e. inference_step (default: 20)")
    parser.add_argument("--device", default="cpu",
                        help="'cpu' or 'cuda': where to train and sample (default: cpu); on cuda "
                             "the captured-graph sampler is timed too")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the weights, the data and the sampling noise (default: 0)")
    parser.add_argument("--out", default=DEFAULT_PNG,
                        help=f"the figure: a file name, or an existing directory to write "
                             f"{DEFAULT_PNG} into; no directory is created (default: ./{DEFAULT_PNG})")
    parser.add_argument("--train-steps", type=_int_at_least(0), default=None,
                        help=f"optimizer steps to train the velocity field ({_default('train_steps')}"
                             "; 0 samples the untrained field)")
    parser.add_argument("--dataset", choices=DATASETS, default="ring",
                        help="the 2-D toy distribution: a ring of 8 Gaussians or two moons "
                             "(default: ring)")
    parser.add_argument("--samples", type=_int_at_least(2), default=None,
                        help=f"samples drawn and scored ({_default('num_samples')})")
    parser.add_argument("--fast", action="store_true",
                        help="quick mode (~8 s; used by the tests): half the training steps, "
                             "fewer timing repeats")
    parser.add_argument("--threads", type=_int_at_least(0), default=1,
                        help="CPU threads torch may use during the demo (default: 1; the tiny "
                             "matmuls gain nothing from more, and a busy machine makes extra "
                             "threads stall); 0 keeps torch's own setting")
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; returns the exit status."""
    try:
        result = run_demo(
            steps=args.steps, device=args.device, seed=args.seed, out=args.out, fast=args.fast,
            train_steps=args.train_steps, dataset=args.dataset, num_samples=args.samples,
            progress=not args.no_progress, threads=args.threads or None,
        )
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result["bitwise_equal"] else 1


DESCRIPTION = (
    "Train a small MLP velocity field on a 2-D toy distribution (~15 s on a 2-core CPU), sample "
    "it with FlowMatching.sample, score the samples against held-out data (MMD with an RBF "
    "kernel, and sliced Wasserstein; next to the same distances for the initial noise), time the "
    "original Alpamayo-R1 loop against ours on the same field (and check that they are bitwise "
    "equal), and write a PNG of the data, the samples and a few trajectories."
)
