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
