"""The benchmark workloads, shared by ``pytest bench/`` and ``bench/gpu_bench.py``.

W1 launch-bound: Alpamayo's shape ``x_dims=(64, 2)``, batch 1/6/48, 10 steps, a small bf16 MLP
   field on a float32 state.
W2 bandwidth-bound: a float32 state of 50 MB (1024 x [3, 64, 64]), 20 steps, a stored field.
W3 trajectories: ``return_all_steps=True``, 100 steps, against the original's list-and-stack.
W4 CPU overhead: batch 6, ``(64, 2)``, 50 steps, a stored field, on CPU.

The baseline everywhere is the original loop, kept verbatim in ``flowmatch_fast._original``.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

from flowmatch_fast import FlowMatching
from flowmatch_fast._original import original_sample

ALPAMAYO_DIMS = (64, 2)
W1_BATCHES = (1, 6, 48)
W2_BATCH, W2_DIMS, W2_STEPS = 1024, (3, 64, 64), 20  # 12.6 M float32 = 50.3 MB
W3_STEPS = 100
W4_BATCH, W4_STEPS = 6, 50


class TinyExpert(nn.Module):
    """A small bf16 MLP velocity field: sinusoidal time embedding, 3 hidden layers of 512, SiLU.

    About 15 kernels per call, the scale of one block of Alpamayo's action expert in miniature.
    """

    def __init__(self, x_dims=ALPAMAYO_DIMS, hidden=512, t_dim=64, dtype=torch.bfloat16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        d = math.prod(x_dims)
        self.t_dim = t_dim
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000.0), t_dim // 2)))
        self.inp = nn.Linear(d + t_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.out = nn.Linear(hidden, d)
        self.to(dtype)
        self.dtype = dtype

    def forward(self, *, x, t):
        angles = t.flatten(1).float() * self.freqs
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)
        h = torch.cat([x.flatten(1), emb], dim=1).to(self.dtype)
        h = nn.functional.silu(self.inp(h))
        for layer in self.hidden:
            h = nn.functional.silu(layer(h))
        return self.out(h).view(x.shape)


class StoredField:
    """A field that returns a stored tensor: the loop's own cost, with no field work."""

    def __init__(self, batch, x_dims, device, dtype=torch.float32):
        self.v = torch.randn(batch, *x_dims, device=device).to(dtype)

    def __call__(self, *, x, t):
        return self.v


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def host_time(fn, device="cpu", warmup=5, reps=50):
    """Median wall-clock seconds of ``fn()`` (synchronised on CUDA), with the spread."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def cuda_time(fn, warmup=10, reps=100):
    """Median seconds of ``fn()`` between CUDA events (warm-up excluded), and the minimum."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    return statistics.median(times), min(times)


VARIANTS = ("original", "ours-torch", "ours-triton", "ours-cuda",
            "graph-torch", "graph-triton", "graph-cuda")


def make_variant(name, x_dims, batch, field, device, steps, return_all_steps=False):
    """A zero-argument callable for one variant, or the reason it cannot run here (a str).

    ``original``: the verbatim original loop. ``ours-<backend>``: eager ``FlowMatching.sample``.
    ``graph-<backend>``: replay of an explicit ``FlowMatching.capture`` of the same call.
    """
    from flowmatch_fast import backends as be

    device = torch.device(device)
    if name == "original":
        return lambda: original_sample(list(x_dims), batch, field, device, steps, return_all_steps)
    kind, backend = name.split("-")
    reason = be.unavailable_reason(backend, device)
    if reason is not None:
        return f"backend {backend}: {reason}"
    fm = FlowMatching(x_dims=x_dims, num_inference_steps=steps, backend=backend)
    if kind == "ours":
        return lambda: fm.sample(batch, field, device=device, return_all_steps=return_all_steps)
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return fm.capture(batch, field, device=device, return_all_steps=return_all_steps)


def sampler_variants(x_dims, batch, field, device, steps, return_all_steps=False,
                     names=VARIANTS):
    """``{name: callable}`` of every variant in ``names`` that can run on ``device``."""
    out = {}
    for name in names:
        fn = make_variant(name, x_dims, batch, field, device, steps, return_all_steps)
        if callable(fn):
            out[name] = fn
    return out


def graph_of(fn, times):
    """``times`` calls of ``fn`` captured in one CUDA graph (after a side-stream warm-up); returns
    the replay function."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for _ in range(times):
            fn()
    return graph.replay


def field_floor(field, batch, x_dims, device, steps):
    """The field's own kernels, ``steps`` calls captured alone in one graph (no noise, no update)."""
    x = torch.randn(batch, *x_dims, device=device)
    ts = [torch.full((batch,) + (1,) * len(x_dims), i / steps, device=device) for i in range(steps)]
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):
            for t in ts[:2]:
                field(x=x, t=t)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for t in ts:
                field(x=x, t=t)
    return graph.replay


def compiled_original(x_dims, batch, field, device, steps, return_all_steps=False):
    """``torch.compile(mode="reduce-overhead")`` of the original loop; returns (fn, compile_s).

    The compile time is the wall time of the first three calls (trace, compile, graph record).
    """
    def loop():
        return original_sample(list(x_dims), batch, field, device, steps, return_all_steps)

    fn = torch.compile(loop, mode="reduce-overhead", dynamic=False)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    return fn, time.perf_counter() - t0


# ----------------------------------------------------------------------------- beyond Euler
def plain_rk4(x_dims, batch, field, device, steps):
    """RK4 written as plain torch (the textbook loop): the baseline for the fused stages."""
    x = torch.randn(batch, *x_dims, device=device)
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device)
    ones = [1] * len(x_dims)
    for i in range(steps):
        t = grid[i].view(1, *ones).expand(batch, *ones)
        dt = (grid[i + 1] - grid[i]).view(1, *ones)
        k1 = field(x=x, t=t)
        k2 = field(x=x + dt / 2 * k1, t=t + dt / 2)
        k3 = field(x=x + dt / 2 * k2, t=t + dt / 2)
        k4 = field(x=x + dt * k3, t=t + dt)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def plain_guided_euler(x_dims, batch, field, device, steps, weight):
    """Classifier-free-guided Euler as plain torch: doubled batch, split, combine, update."""
    x = torch.randn(batch, *x_dims, device=device)
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device)
    ones = [1] * len(x_dims)
    for i in range(steps):
        t = grid[i].view(1, *ones).expand(2 * batch, *ones)
        dt = (grid[i + 1] - grid[i]).view(1, *ones)
        v = field(x=torch.cat([x, x]), t=t)
        vc, vu = v[:batch].float(), v[batch:].float()
        x = x + dt * (vu + weight * (vc - vu))
    return x


def method_variants(kind, x_dims, batch, field, device, steps, weight=2.5):
    """``{name: callable}`` for rk4 or guided Euler: plain torch, ours eager, ours captured."""
    from flowmatch_fast import backends as be

    device = torch.device(device)
    if kind == "rk4":
        out = {"plain-torch": lambda: plain_rk4(x_dims, batch, field, device, steps)}
        opts = dict(int_method="rk4")
    else:
        out = {"plain-torch": lambda: plain_guided_euler(x_dims, batch, field, device, steps,
                                                         weight)}
        opts = dict(guidance=True, guidance_weight=weight)
    for name in ("torch", "triton", "cuda"):
        if be.unavailable_reason(name, device) is not None:
            continue
        fm = FlowMatching(x_dims=x_dims, num_inference_steps=steps, backend=name)
        out[f"ours-{name}"] = lambda fm=fm: fm.sample(batch, field, device=device, **opts)
        if device.type == "cuda":
            out[f"graph-{name}"] = fm.capture(batch, field, device=device, **opts)
    return out


def _methods_section(row, reps):
    """rk4 and guided Euler, fused vs the same method in plain torch (issue: beyond Euler)."""
    cases = [
        ("rk4-W1-b6", "rk4", ALPAMAYO_DIMS, 6, TinyExpert().cuda(), 10),
        ("rk4-50MB-5steps", "rk4", W2_DIMS, W2_BATCH, StoredField(W2_BATCH, W2_DIMS, "cuda"), 5),
        ("cfg-euler-W1-b6", "cfg", ALPAMAYO_DIMS, 6, TinyExpert().cuda(), 10),
        ("cfg-euler-50MB-10steps", "cfg", W2_DIMS, W2_BATCH // 2,
         StoredField(W2_BATCH, W2_DIMS, "cuda"), 10),
    ]
    for label, kind, dims, batch, field, steps in cases:
        variants = method_variants(kind, dims, batch, field, "cuda", steps)
        base = None
        for name, fn in variants.items():
            med, _ = cuda_time(fn, reps=reps if batch < 100 else max(10, reps // 5))
            base = base or med
            row(label, name, med, speedup_vs_plain=round(base / med, 2))


EXTRA_GPU_SECTIONS = [("methods", _methods_section)]


# -------------------------------------------------- Alpamayo 1.5: guided W1 (two fields, B = 6)
V1_5_BATCH, V1_5_STEPS, V1_5_WEIGHT = 6, 10, 2.5
V1_5_VARIANTS = ("original", "ours-eager", "ours-graph")


@torch.no_grad()
def original_1_5_sample(x_dims, batch, step_fn, unguided_step_fn, device, steps, weight):
    """Alpamayo 1.5's guided Euler loop as its SPEC states it (the eager baseline): guided field
    first, then the unguided one, ``v = (1 - w) * vu + w * vg``, ``x = x + dt * v``."""
    ones = [1] * len(x_dims)
    x = torch.randn(batch, *x_dims, device=device) * 1.0
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device)
    for i in range(steps):
        t = grid[i].view(1, *ones).expand(batch, *ones)
        dt = (grid[i + 1] - grid[i]).view(1, *ones).expand(batch, *ones)
        vg = step_fn(x=x, t=t)
        vu = unguided_step_fn(x=x, t=t)
        x = x + dt * ((1 - weight) * vu + weight * vg)
    return x


def v1_5_variant(name, device, batch=V1_5_BATCH, steps=V1_5_STEPS, weight=V1_5_WEIGHT):
    """A zero-argument callable for one guided-W1 variant of the 1.5 class (two bf16 MLP fields),
    or the reason it cannot run here (a str). ``ours-eager``: ``sample`` with ``auto``;
    ``ours-graph``: replay of ``capture`` (CUDA only)."""
    from flowmatch_fast.alpamayo1_5 import FlowMatching as FlowMatching1_5

    device = torch.device(device)
    guided, unguided = TinyExpert(seed=0).to(device), TinyExpert(seed=1).to(device)
    if name == "original":
        return lambda: original_1_5_sample(ALPAMAYO_DIMS, batch, guided, unguided, device, steps,
                                           weight)
    fm = FlowMatching1_5("euler", steps, weight, ALPAMAYO_DIMS, True)
    if name == "ours-eager":
        return lambda: fm.sample(batch, guided, unguided, device)
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return fm.capture(batch, guided, unguided, device)


def _v1_5_section(row, reps):
    """Guided W1 on the 1.5 class: each variant timed and checked bitwise against the original."""
    base = None
    for name in V1_5_VARIANTS:
        fn = v1_5_variant(name, "cuda")
        torch.manual_seed(0)
        out = fn()
        if base is None:
            reference = out
        med, _ = cuda_time(fn, reps=reps)
        base = base or med
        row("1.5-guided-W1-b6", name, med, speedup=round(base / med, 2),
            bitwise=bool(torch.equal(out, reference)))


EXTRA_GPU_SECTIONS.append(("alpamayo1_5", _v1_5_section))
