"""The benchmark workloads, shared by ``pytest bench/`` and ``bench/gpu_bench.py``.

W1 launch-bound: Alpamayo's shape ``x_dims=(64, 2)``, batch 1/6/48, 10 steps, a small bf16 MLP
   field on a float32 state.
W2 bandwidth-bound: a float32 state of 50 MB (1024 x [3, 64, 64]), 20 steps, a stored field.
W3 trajectories: ``return_all_steps=True``, 100 steps, against the original's list-and-stack.
W4 CPU overhead: batch 6, ``(64, 2)``, 50 steps, a stored field, on CPU.
W5 Alpamayo's field: a Qwen-style transformer expert over a 2,048-token prompt KV cache held in
   static buffers (``bench/expert.py``), batch 1/6, 10 steps; a small config on CPU.

The baseline everywhere is the original loop, kept verbatim in ``flowmatch_fast._original``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from expert import CONFIGS as W5_CONFIGS
from expert import ActionExpert
from flowmatch_fast import FlowMatching
from flowmatch_fast._original import original_sample
from flowmatch_fast.graph import capture_callable
from flowmatch_fast.timing import synchronize, time_interleaved

ALPAMAYO_DIMS = (64, 2)
W1_BATCHES = (1, 6, 48)
W2_BATCH, W2_DIMS, W2_STEPS = 1024, (3, 64, 64), 20  # 12.6 M float32 = 50.3 MB
W3_STEPS = 100
W4_BATCH, W4_STEPS = 6, 50
W5_BATCHES = (1, 6)


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


def warm_up_device(device, seconds=2.0):
    """Busy the GPU for ``seconds`` (bf16 matmuls) so the first timed workload meets raised clocks.

    On a cold H200, W1's eager original at batch 1 took 3,761 us, more than batch 6 timed right
    after it (2,180 us): the first workload must not pay for the clock ramp. On CPU: nothing.
    """
    if torch.device(device).type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize(device)


VARIANTS = ("original", "ours-torch", "ours-triton", "ours-cuda",
            "graph-torch", "graph-triton", "graph-cuda")


def make_variant(name, x_dims, batch, field, device, steps, return_all_steps=False):
    """A zero-argument callable for one variant, or the reason it cannot run here (a str).

    ``original``: the verbatim original loop. ``ours-<backend>``: eager ``FlowMatching.sample``.
    ``graph-<backend>``: replay of an explicit ``FlowMatching.capture`` of the same call.
    ``per-forward-graphs``: the original loop with each field call replayed from its own graph.
    """
    from flowmatch_fast import backends as be

    device = torch.device(device)
    if name == "original":
        return lambda: original_sample(list(x_dims), batch, field, device, steps, return_all_steps)
    if name == "per-forward-graphs":
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        step = PerForwardGraph(field, (batch, *x_dims), device)
        return lambda: original_sample(list(x_dims), batch, step, device, steps, return_all_steps)
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


@torch.no_grad()
def graph_of(fn, times):
    """``times`` calls of ``fn`` captured in one CUDA graph; returns the replay function."""
    graph, _ = capture_callable(lambda: [fn() for _ in range(times)])
    return graph.replay


@torch.no_grad()
def field_floor(field, batch, x_dims, device, steps):
    """The field's own kernels, ``steps`` calls captured alone in one graph (no noise, no update)."""
    x = torch.randn(batch, *x_dims, device=device)
    ts = [torch.full((batch,) + (1,) * len(x_dims), i / steps, device=device) for i in range(steps)]
    graph, _ = capture_callable(lambda: [field(x=x, t=t) for t in ts], device)
    return graph.replay


class PerForwardGraph:
    """The field's forward captured once in its own graph, replayed for every call (static input
    buffers, copied into), with the loop and its updates eager: the approach of alpamayo1.5 PR
    #36, built here as the baseline between the eager loop and a captured whole loop."""

    @torch.no_grad()
    def __init__(self, field, shape, device):
        self.x = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], *[1] * (len(shape) - 1), device=device)
        self.graph, self.v = capture_callable(lambda: field(x=self.x, t=self.t), device)

    def __call__(self, *, x, t):
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.v  # the graph's buffer: consumed by the update before the next replay


# Inductor in eager-numerics mode: rounds every bf16 intermediate as eager does (which also turns
# off Triton's FMA contraction) and draws random numbers with torch's own generator.
EAGER_NUMERICS = {"emulate_precision_casts": True, "fallback_random": True}


def compiled_original(x_dims, batch, field, device, steps, return_all_steps=False,
                      eager_numerics=False):
    """``torch.compile(mode="reduce-overhead")`` of the original loop; returns (fn, compile_s).

    ``eager_numerics``: the same with :data:`EAGER_NUMERICS`. The compile time is the wall time
    of the first three calls (trace, compile, graph record).
    """
    def loop():
        return original_sample(list(x_dims), batch, field, device, steps, return_all_steps)

    # mode="reduce-overhead" is these options; torch.compile takes a mode or options, not both
    options = {"triton.cudagraphs": True, **(EAGER_NUMERICS if eager_numerics else {})}
    return _compile_timed(torch.compile(loop, options=options, dynamic=False), device)


def compiled_ours(x_dims, batch, field, device, steps):
    """Ours with ``compile=True``: on a GPU the compiled region captured in our CUDA graph
    (``capture(..., compile=True)``: compiled in the warm-up, never inside the capture;
    Inductor's own CUDA graphs off), elsewhere ``sample(..., compile=True)`` (first call eager,
    second compiles); returns (fn, compile_s): the wall time up to three calls done."""
    fm = FlowMatching(x_dims=x_dims, num_inference_steps=steps, compile=True)
    t0 = time.perf_counter()
    if torch.device(device).type == "cuda":
        fn = fm.capture(batch, field, device=device)
    else:
        fn = lambda: fm.sample(batch, field, device=device)  # noqa: E731
    fn, _ = _compile_timed(fn, device)
    return fn, time.perf_counter() - t0


def _compile_timed(fn, device):
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    return fn, time.perf_counter() - t0


def compiled_field_variants(x_dims, batch, field, device, steps):
    """The ``compiled-field`` rows: ``torch.compile(field)`` (default mode: our graph captures it)
    under the original loop, under ours eager and under ours captured. Returns ``({name: fn}, compile_s)``; the
    original loop with the compiled field is the bitwise reference of the captured one. The
    compile happens in the first call, timed here: never inside a capture."""
    compiled = torch.compile(field, dynamic=False)
    device = torch.device(device)
    fns = {"compiled-field-original": lambda: original_sample(list(x_dims), batch, compiled,
                                                              device, steps)}
    _, compile_s = _compile_timed(fns["compiled-field-original"], device)
    fm = FlowMatching(x_dims=x_dims, num_inference_steps=steps)
    fns["compiled-field-ours"] = lambda: fm.sample(batch, compiled, device=device)
    if device.type == "cuda":
        fns["compiled-field-graph"] = fm.capture(batch, compiled, device=device)
    return fns, compile_s


# ----------------------------------------------------------------------------- W5
W5_VARIANTS = ("original", "ours-torch", "per-forward-graphs", "graph-triton", "graph-cuda")


def w5_expert(config, batch, device, seed=0):
    """The W5 field for ``batch`` samples of one scene, its prompt KV set (``bench/expert.py``)."""
    expert = ActionExpert(W5_CONFIGS[config], batch, device=device, seed=seed)
    expert.set_prefix(*expert.random_prefix(seed + 1))
    return expert


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


def _methods_section(row, reps, device="cuda"):
    """rk4 and guided Euler, fused vs the same method in plain torch."""
    big = W2_BATCH if torch.device(device).type == "cuda" else 8  # the 50 MB state on a GPU
    mb = f"{big * math.prod(W2_DIMS) * 4 / 1e6:.3g}MB"
    cases = [
        ("rk4-W1-b6", "rk4", ALPAMAYO_DIMS, 6, TinyExpert().to(device), 10),
        (f"rk4-{mb}-5steps", "rk4", W2_DIMS, big, StoredField(big, W2_DIMS, device), 5),
        ("cfg-euler-W1-b6", "cfg", ALPAMAYO_DIMS, 6, TinyExpert().to(device), 10),
        (f"cfg-euler-{mb}-10steps", "cfg", W2_DIMS, big // 2, StoredField(big, W2_DIMS, device), 10),
    ]
    for label, kind, dims, batch, field, steps in cases:
        variants = method_variants(kind, dims, batch, field, device, steps)
        timings = time_interleaved(variants, device, reps if batch < 100 else max(10, reps // 5))
        base = timings["plain-torch"].median
        for name, tm in timings.items():
            row(label, name, tm, speedup_vs_plain=round(base / tm.median, 2))


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


def _v1_5_section(row, reps, device="cuda"):
    """Guided W1 on the 1.5 class: the variants timed interleaved (median, p10-p90), each checked
    bitwise against the original loop first; a variant that is not bitwise fails the section."""
    fns = {}
    for name in V1_5_VARIANTS:
        fn = v1_5_variant(name, device)
        if callable(fn):
            fns[name] = fn
        else:
            row(f"1.5-guided-W1-b{V1_5_BATCH}", name, None, reason=fn)
    outs = {}
    for name, fn in fns.items():
        torch.manual_seed(0)
        outs[name] = fn().clone()  # before the next variant may replay over a static buffer
    bitwise = {name: bool(torch.equal(out, outs["original"])) for name, out in outs.items()}
    timings = time_interleaved(fns, device, reps)
    base = timings["original"].median
    for name, tm in timings.items():
        row(f"1.5-guided-W1-b{V1_5_BATCH}", name, tm, speedup=round(base / tm.median, 2),
            bitwise_vs_original=bitwise[name])
    broken = [name for name, ok in bitwise.items() if not ok]
    if broken:
        raise AssertionError(f"1.5 guided W1: {', '.join(broken)} not bitwise to the original")


EXTRA_GPU_SECTIONS.append(("alpamayo1_5", _v1_5_section))
