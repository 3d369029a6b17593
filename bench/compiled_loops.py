"""``compile=True`` against its peers, on CPU: the variants of ``pytest bench/``'s compiled rows.

Two workloads at batch 6, ``x_dims=(64, 2)``: a cheap bf16 field (elementwise, 50 steps: the
loop's own cost dominates) and W1 (a small bf16 MLP, 10 steps: the field's matmuls dominate).
Variants: the original loop (eager), ours eager, ours ``compile=True``, and ``torch.compile`` of
the original loop in its default mode and in eager-numerics mode (the options our region uses,
with the grid built inside the loop: not bitwise). Targets (issue 23, bitwise, side by side):
``compile=True`` >= 5x ours eager on the cheap field and >= 1.3x on W1; at most 2x the
default-mode compile of the original on the cheap field and 1.2x on W1.
"""

from __future__ import annotations

import functools
import time

import torch

import workloads as W
from flowmatch_fast import FlowMatching
from flowmatch_fast._original import original_sample

CHEAP_STEPS = 50
COMPILE_WORKLOADS = ("cheap-50steps", "W1-b6")
COMPILE_VARIANTS = ("original", "ours-eager", "ours-compile", "torch.compile-original",
                    "torch.compile-original-eager-numerics")
PEERS = COMPILE_VARIANTS[3:]  # not ours: timed by make bench, not compiled in CI's single pass


def cheap_field(*, x, t):
    """An elementwise bf16 field: a few float32 ops, rounded to bf16."""
    return (torch.sin(1.7 * x) - 0.5 * x * t + t).to(torch.bfloat16)


def compile_workload(name):
    """(field, steps) of one workload."""
    if name == "cheap-50steps":
        return cheap_field, CHEAP_STEPS
    return W.TinyExpert(), 10


def compile_variant(name, workload, batch=6, device="cpu"):
    """``(fn, compile_s)``: a zero-argument callable, warmed up (compiled) already."""
    field, steps = compile_workload(workload)
    dims = list(W.ALPAMAYO_DIMS)
    t0 = time.perf_counter()
    if name == "original":
        fn = lambda: original_sample(dims, batch, field, device, steps)  # noqa: E731
    elif name in ("ours-eager", "ours-compile"):
        fm = FlowMatching(x_dims=dims, num_inference_steps=steps,
                          compile=name == "ours-compile")
        fn = lambda: fm.sample(batch, field, device=device)  # noqa: E731
    else:
        options = W.EAGER_NUMERICS if name.endswith("eager-numerics") else None
        fn = torch.compile(lambda: original_sample(dims, batch, field, device, steps),
                           options=options, dynamic=False)
    for _ in range(2):  # ours: the first call eager, the second compiles
        fn()
    return fn, time.perf_counter() - t0


def trivial_field(*, x, t):
    return x * t


@functools.lru_cache(maxsize=1)
def overhead_sampler():
    """One compiled 1-step call on 8 numbers (compiled once, shared by the overhead rows)."""
    fm = FlowMatching(x_dims=(4,), num_inference_steps=1, compile=True)
    for _ in range(3):
        fm.sample(2, trivial_field)
    return fm
