"""Bitwise parity of ``FlowMatching.sample`` with the SPEC's algorithm (``tests/oracle.py``).

Runs on whatever backend ``FLOWMATCH_FAST_BACKEND`` selects (CI: plain torch, then Triton through
the interpreter, then the CUDA kernels through their host emulation), on CPU and, when there is
one, on a CUDA device. In the kernel passes every case also counts the kernels' launches
(``fused_launches``): one per step, none where the contract sends a call to the reference.
"""

import pytest
import torch

from flowmatch_fast import FlowMatching
from bitwise import assert_bitwise, sample_both
from fields import FIELD_DTYPES, LAYOUTS, make_field
from oracle import spec_sample


@pytest.mark.parametrize("dtype", FIELD_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("return_all_steps", [False, True], ids=["final", "all_steps"])
def test_every_layout_and_dtype(device, layout, dtype, return_all_steps, case_rng, fused_launches):
    x_dims = [case_rng.randint(1, 9) for _ in range(case_rng.randint(1, 4))]
    batch = case_rng.randint(1, 64)
    steps = case_rng.randint(1, 12)
    seed = case_rng.randrange(2**31)
    msg = f"x_dims={x_dims} batch={batch} steps={steps} seed={seed}"
    ours, ref = sample_both(x_dims, batch, steps, layout, dtype, device, seed, return_all_steps)
    assert_bitwise(ours, ref, msg)
    fused_launches.expect(steps, msg)


@pytest.mark.parametrize("case", range(12))
def test_fuzz_random_cases(device, case, case_rng, fused_launches):
    """Random shape, batch, steps (up to 100), dtype, layout, x_dims form and return mode."""
    n = case_rng.randint(1, 4)
    dims = [case_rng.choice([1, 2, 3, 5, 7, 16, 33, 64]) for _ in range(n)]
    while len(dims) > 1 and torch.Size(dims).numel() > 4096:
        dims.pop()
    form = case_rng.choice(["int", "list", "tuple"]) if len(dims) == 1 else case_rng.choice(["list", "tuple"])
    x_dims = dims[0] if form == "int" else (list(dims) if form == "list" else tuple(dims))
    batch = case_rng.randint(1, 64)
    steps = case_rng.choice([1, 2, 3, 10, 50, 100])
    layout = case_rng.choice(LAYOUTS)
    dtype = case_rng.choice(FIELD_DTYPES)
    seed = case_rng.randrange(2**31)
    all_steps = case_rng.random() < 0.5
    msg = (f"x_dims={x_dims!r} batch={batch} steps={steps} layout={layout} dtype={dtype} "
           f"seed={seed} all_steps={all_steps}")
    ours, ref = sample_both(x_dims, batch, steps, layout, dtype, device, seed, all_steps)
    assert_bitwise(ours, ref, msg)
    fused_launches.expect(steps, msg)


@pytest.mark.parametrize("x_dims", [(64, 2), 128, [3, 5, 7, 2], (1,)], ids=str)
def test_alpamayo_and_odd_shapes(device, x_dims, case_rng, fused_launches):
    seed = case_rng.randrange(2**31)
    for batch in (1, 6, 64):
        ours, ref = sample_both(x_dims, batch, 10, "contiguous", torch.bfloat16, device, seed, True)
        msg = f"x_dims={x_dims} batch={batch} seed={seed}"
        assert_bitwise(ours, ref, msg)
        fused_launches.expect(10, msg)


def test_float64_field_promotes_state(device, case_rng, fused_launches):
    seed = case_rng.randrange(2**31)
    ours, ref = sample_both((5, 3), 4, 7, "mixed", torch.float64, device, seed, True)
    assert_bitwise(ours, ref, f"seed={seed}")
    assert ours[0].dtype == torch.float64
    fused_launches.expect(7, f"seed={seed}")


def test_zero_dim_field(device, fused_launches):
    """A 0-dim field broadcasts; PyTorch's promotion treats it as a scalar (we follow it)."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        torch.manual_seed(3)
        fm = FlowMatching(x_dims=(4, 2), num_inference_steps=3)
        field = lambda *, x, t: torch.tensor(0.75, dtype=dtype, device=x.device)  # noqa: E731
        ours = fm.sample(5, field, device=device)
        torch.manual_seed(3)
        ref = spec_sample((4, 2), 5, field, device=device, steps=3)
        assert_bitwise(ours, ref, str(dtype))
        fused_launches.expect(0, f"{dtype}: a 0-dim field takes the reference (its promotion)")


def test_inference_step_override(device, case_rng, fused_launches):
    seed = case_rng.randrange(2**31)
    fm = FlowMatching(x_dims=(8, 2), num_inference_steps=4)
    torch.manual_seed(seed)
    ours = fm.sample(3, make_field("contiguous", torch.float32, [8, 2]), device=device, inference_step=17)
    torch.manual_seed(seed)
    ref = spec_sample((8, 2), 3, make_field("contiguous", torch.float32, [8, 2]), device=device, steps=17)
    assert_bitwise(ours, ref, f"seed={seed}")
    fused_launches.expect(17, f"seed={seed}")


def test_empty_batch(device, fused_launches):
    fm = FlowMatching(x_dims=(3, 2), num_inference_steps=3)
    out = fm.sample(0, lambda *, x, t: x * t, device=device)
    assert out.shape == (0, 3, 2)
    states, grid = fm.sample(0, lambda *, x, t: x * t, device=device, return_all_steps=True)
    assert states.shape == (0, 4, 3, 2) and grid.shape == (4,)
    fused_launches.expect(0, "an empty batch: nothing to launch")
