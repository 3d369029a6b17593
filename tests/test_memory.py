"""Host memory flat in the step count: no per-step views or trajectory slots made up front.

Every step's ``t`` and ``dt`` views and trajectory slot once took ~1.2 KB of host memory, all made
before the first step (1.2 GB at 10^6 steps; the original stays flat). Measured in a fresh
interpreter (peak RSS, ``VmHWM``), on the default backend (plain torch on CPU).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import torch
    from flowmatch_fast import FlowMatching

    def peak_mb():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    v = torch.ones(1, 2)
    field = lambda *, x, t: v  # a 2-element state: the loop's own memory, nothing else
    calls = [("euler", 300_000, False), ("euler", 100_000, True), ("midpoint", 50_000, False)]
    for method, _, all_steps in calls:  # warm: everything imported and allocated once
        FlowMatching(x_dims=2, int_method=method).sample(1, field, inference_step=3000,
                                                         return_all_steps=all_steps)
    base = peak_mb()
    for method, steps, all_steps in calls:
        FlowMatching(x_dims=2, int_method=method).sample(1, field, inference_step=steps,
                                                         return_all_steps=all_steps)
        print(f"{method} {steps} steps all_steps={all_steps}: peak RSS +{peak_mb() - base:.1f} MB")
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_peak_host_memory_is_flat_in_the_step_count():
    env = {k: v for k, v in os.environ.items() if k != "FLOWMATCH_FAST_BACKEND"}  # the default
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    growth = float(lines[-1].rsplit("+", 1)[1].split()[0])
    # 300,000 steps of a 2-element state: the grid (1.2 MB), the 100,000-step trajectory
    # (0.8 MB), and at most one chunk of views; made up front they took ~350 MB
    assert growth < 60, "\n".join(lines)


def test_grids_longer_than_one_chunk_of_views_are_the_original(monkeypatch, case_rng,
                                                               fused_launches):
    """Past ``VIEW_CHUNK`` steps the views are made a chunk at a time: every step still gets its
    own ``t``, ``dt`` and trajectory slot (the oracle's bits, Euler; plain torch's, midpoint).
    The chunk is made small here (4 steps), so that the kernel passes stay fast."""
    from bitwise import sample_both, assert_bitwise
    from flowmatch_fast import FlowMatching
    from flowmatch_fast.kernels import contract

    monkeypatch.setattr(contract, "VIEW_CHUNK", 4)
    steps = 2 * 4 + 3
    seed = case_rng.randrange(2**31)
    ours, want = sample_both([3, 2], 2, steps, "permuted", torch.bfloat16, "cpu", seed, True)
    assert_bitwise(ours, want, f"euler, {steps} steps, seed={seed}")
    fused_launches.expect(steps, "euler")
    results = []
    for backend in (None, "torch"):
        torch.manual_seed(seed)
        fm = FlowMatching(x_dims=[3, 2], int_method="midpoint", backend=backend)
        results.append(fm.sample(2, lambda *, x, t: torch.sin(x) * t, inference_step=steps,
                                 return_all_steps=True))
    assert_bitwise(results[0], results[1], f"midpoint, {steps} steps, seed={seed}")


def test_chunked_views_index_like_a_tuple():
    from flowmatch_fast.kernels.contract import VIEW_CHUNK, ChunkedViews, step_views

    values = torch.arange(3 * VIEW_CHUNK + 5)
    make = lambda lo, hi: values[lo:hi].unbind(0)  # noqa: E731
    assert isinstance(step_views(make, VIEW_CHUNK), tuple)
    views = step_views(make, values.numel())
    assert isinstance(views, ChunkedViews) and len(views) == values.numel()
    for i in [0, 1, VIEW_CHUNK - 1, VIEW_CHUNK, 3 * VIEW_CHUNK + 4, 5, -1, -VIEW_CHUNK - 2]:
        assert views[i].item() == values[i].item()
    assert [v.item() for v in views] == values.tolist()  # iteration stops at the end
    with pytest.raises(IndexError):
        views[values.numel()]
