"""W6, an RL rollout: the RL recipes' SDE sampler with log-probabilities (GRPO rollouts).

B = 6 scenes x 16 samples = 96 rows, ``x_dims=(64, 2)``, 10 SDE steps, log-probs returned. The
baseline is the recipes' loop as they run it (:func:`recipes_rollout`: per step the 0-dim
scalar ops on the device, a host-side ``list.index``, a ``torch.tensor`` copy, a fresh noise
draw, ~15 element-wise kernels); ours is ``flowmatch_fast.alpamayo1_x_rl.FlowMatching``, eager
(one fused launch per step on the Triton and CUDA backends) and captured whole in one CUDA
graph. Every variant is checked bitwise against the baseline before it is timed. Importing this
module registers the W6 section of ``bench/gpu_bench.py``.
"""

from __future__ import annotations

import math

import torch

import workloads as W
from flowmatch_fast.alpamayo1_x_rl import FlowMatching as RLFlowMatching
from flowmatch_fast.timing import time_interleaved

W6_BATCH, W6_STEPS, W6_NOISE_LEVEL = 6 * 16, 10, 0.7
W6_VARIANTS = ("recipes", "ours-eager", "ours-graph", "field-floor")


def cheap_field(*, x, t):
    """The CPU bench's field: two element-wise ops and a bf16 cast (the loop's cost dominates)."""
    return (torch.tanh(x) - x * t).to(torch.bfloat16)


@torch.no_grad()
def recipes_rollout(x_dims, batch, field, device, steps, noise_level=W6_NOISE_LEVEL):
    """The recipes' SDE rollout as they run it (SPEC.md, "The RL recipes' FlowMatching"):
    returns ``(x, log_prob, all_steps, timesteps)``."""
    ones = [1] * len(x_dims)
    x = torch.randn(batch, *x_dims, device=device) * 1.0
    grid = torch.linspace(0.0, 1.0, steps + 1).tolist()
    states, log_probs = [x], []
    for i in range(steps):
        t = grid[i] * torch.ones([batch, *ones], device=device)
        v = field(x=x, t=t).float()
        sample = x.float()
        t_now = grid[i]
        t_next = grid[grid.index(t_now) + 1]
        sigma = torch.tensor(1 - t_now, device=device, dtype=torch.float32)
        dt = t_next - t_now
        std = torch.sqrt(sigma / (1 - sigma.clip(max=1 - grid[1]))) * noise_level
        mean = sample * (1 - std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        x = mean + std * math.sqrt(dt) * torch.randn(v.shape, device=device, dtype=torch.float32)
        lp = (-((x - mean) ** 2) / (2 * (std * math.sqrt(dt)) ** 2) - torch.log(std * math.sqrt(dt))
              - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
        log_probs.append(lp.mean(dim=tuple(range(1, lp.ndim))))
        states.append(x)
    return (x, torch.stack(log_probs, dim=1).mean(dim=1), torch.stack(states, dim=1),
            torch.tensor(grid, device=device, dtype=torch.float32))


def w6_field(device):
    """W1's bf16 MLP expert on a GPU (the floor is its own kernels); the cheap field on CPU."""
    return W.TinyExpert().to(device) if torch.device(device).type == "cuda" else cheap_field


def w6_variant(name, field, device, batch=W6_BATCH, steps=W6_STEPS):
    """A zero-argument callable for one W6 variant, or the reason it cannot run here (a str).
    Each returns ``(x, log_prob, all_steps, timesteps)`` but ``field-floor`` (the field's 10
    calls alone, captured)."""
    device = torch.device(device)
    dims = W.ALPAMAYO_DIMS
    if name == "recipes":
        return lambda: recipes_rollout(dims, batch, field, device, steps)
    if name == "field-floor":
        if device.type != "cuda":
            return "the floor is the field's kernels captured in a CUDA graph"
        return W.field_floor(field, batch, dims, device, steps)
    fm = RLFlowMatching("sde", num_inference_steps=steps, x_dims=dims)
    opts = dict(return_info=True, noise_level=W6_NOISE_LEVEL)
    if name == "ours-eager":
        return lambda: _as_tuple(fm.sample(batch, field, device=device, **opts))
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    sampler = fm.capture(batch, field, device=device, **opts)
    return lambda: _as_tuple(sampler())


def _as_tuple(info):
    return info["x"], info["log_prob"], info["all_steps"], info["timesteps"]


def w6_bitwise(fns, device) -> dict:
    """``{variant: bool}``: each variant's rollout under seed 0 equals the recipes' bitwise."""
    outs = {}
    for name, fn in fns.items():
        if name == "field-floor":
            continue
        torch.manual_seed(0)
        outs[name] = [t.clone() for t in fn()]
    want = outs["recipes"]
    return {name: all(torch.equal(a, b) for a, b in zip(out, want)) for name, out in outs.items()}


def _w6_section(row, reps, device="cuda"):
    """W6 timed interleaved (median, p10-p90), bitwise checked first; ratios to the recipes'
    loop and, on a GPU, ours captured over the field alone captured (the floor)."""
    field = w6_field(device)
    label = f"W6-RL-b{W6_BATCH}-{W6_STEPS}steps"
    fns = {}
    for name in W6_VARIANTS:
        fn = w6_variant(name, field, device)
        if callable(fn):
            fns[name] = fn
        else:
            row(label, name, None, reason=fn)
    bitwise = w6_bitwise(fns, device)
    timings = time_interleaved(fns, device, reps)
    base = timings["recipes"].median
    floor = timings["field-floor"].median if "field-floor" in timings else None
    for name, tm in timings.items():
        extra = dict(speedup_vs_recipes=round(base / tm.median, 2))
        if floor is not None and name != "field-floor":
            extra["over_floor"] = round(tm.median / floor, 3)
        if name in bitwise:
            extra["bitwise_vs_recipes"] = bitwise[name]
        row(label, name, tm, **extra)
    broken = [name for name, ok in bitwise.items() if not ok]
    if broken:
        raise AssertionError(f"W6: {', '.join(broken)} not bitwise to the recipes' loop")


W.EXTRA_GPU_SECTIONS.append(("w6-rl", _w6_section))
