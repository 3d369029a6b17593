"""A second field (guidance) of another memory layout than the first: every backend gives the
plain-torch bits, whichever field is the odd one, for Euler and every Runge-Kutta stage.

The kernels index both fields of one launch with one set of strides; a second field that does
not share the first one's (transposed, sliced, expanded from a ``[1, *x_dims]`` prior, or of
another broadcastable shape) must not be read at the first one's offsets (wrong values, reads
past its storage). Runs through the backend ``FLOWMATCH_FAST_BACKEND`` selects (plain torch, the
Triton interpreter, the CUDA kernels' host emulation) and, per launch, through ``target``.
"""

import itertools

import pytest
import torch

from flowmatch_fast import FlowMatching as R1FlowMatching
from flowmatch_fast.alpamayo1_5 import FlowMatching
from flowmatch_fast.integrators import METHODS
from flowmatch_fast.kernels import reference
from flowmatch_fast.kernels.contract import Guidance, TimeGrid
from bitwise import assert_bitwise
from fields import smooth
from oracle import spec_sample_1_5

ODD = ("transposed", "sliced", "expanded", "batch1")
# (first field, second field): either one the odd one out
PAIRS = [("contiguous", odd) for odd in ODD] + [(odd, "contiguous") for odd in ODD] + [
    ("transposed", "expanded"), ("sliced", "batch1")]
STAGES = [(m, j) for m in METHODS for j in range(len(METHODS[m]))]


def lay_out(v: torch.Tensor, layout: str) -> torch.Tensor:
    """``v`` (or, for the broadcast layouts, its first row) in ``layout``; same values."""
    if layout == "contiguous":
        return v.contiguous()
    if layout == "transposed":  # first and last dims swapped in memory
        return v.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":  # every other element of a wider buffer, odd storage offset
        wide = torch.empty(*v.shape[:-1], 2 * v.shape[-1] + 1, dtype=v.dtype, device=v.device)
        return wide[..., 1::2].copy_(v)
    if layout == "expanded":  # prior.expand(x.shape): batch stride 0, a [1, *x_dims] storage
        return v[:1].contiguous().expand(v.shape)
    if layout == "batch1":  # a [1, *x_dims] field
        return v[:1].contiguous()
    raise ValueError(layout)


def _fields(layouts, dims, dtype, seed):
    """(guided, unguided) fields returning their values in the two layouts; fresh per run."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.randn(1, *dims, generator=gen)

    def field(layout, sign):
        def f(*, x, t):
            v = (smooth(x, t) * sign + scale.to(x.device)).to(dtype)
            if layout in ("expanded", "batch1"):  # batch-independent: the prior's row
                v = v[:1].expand(v.shape).clone()
            return lay_out(v, layout)
        return f

    return field(layouts[0], 1.0), field(layouts[1], -0.5)


# ------------------------------------------------------------------ one launch, every backend
@pytest.mark.parametrize("mode", ["mix", "batch"])
@pytest.mark.parametrize("layouts", PAIRS, ids=lambda p: "-".join(p))
def test_each_launch_reads_each_field_at_its_own_offsets(target, mode, layouts, case_rng):
    """Euler and every RK stage, one launch against the reference step, both guidance forms;
    a ``[1, *x_dims]`` field beside a full one too (the shapes the 1.5 original broadcasts)."""
    backend, device = target
    gen = torch.Generator().manual_seed(case_rng.randrange(2**31))
    shape = (case_rng.randint(2, 6), case_rng.randint(3, 40), 2)
    grid = TimeGrid(torch.linspace(0, 1, 5, device=device), shape[0], 3)
    w = case_rng.choice((2.5, -0.7, 1.0 / 3.0))
    for dtype, (method, j) in itertools.product((torch.float32, torch.bfloat16), [("euler", 0)] + STAGES):
        x = torch.randn(shape, generator=gen).to(device)
        vg = lay_out((torch.randn(shape, generator=gen) * 3).to(device, dtype), layouts[0])
        vu = lay_out((torch.randn(shape, generator=gen) * 3).to(device, dtype), layouts[1])
        stage = METHODS[method][j]
        acc = torch.randn(shape, generator=gen).to(device) if stage.uses_acc else None
        i = case_rng.randrange(4)
        guidance = Guidance(mode, w)
        what = f"{mode} {layouts} {dtype} {method} stage {j} shape={shape} i={i} w={w}"
        assert backend.supports(x, vg, acc, vu, mode == "mix"), what
        if method == "euler":
            got = backend.euler_step(x, vg, grid, i, None, None, vu, guidance)
            want = reference.euler_step(x, vg, grid, i, None, None, vu, guidance)
        else:
            got, got_acc = backend.stage_step(x, vg, grid, i, stage, acc, None, None, vu, guidance)
            want, want_acc = reference.stage_step(x, vg, grid, i, stage, acc, None, None, vu,
                                                  guidance)
            if stage.write_acc:
                assert_bitwise(got_acc, want_acc, what + " (accumulator)")
        assert_bitwise(got, want, what)


# -------------------------------------------------------- whole calls through the selected backend
@pytest.mark.parametrize("layouts", [p for p in PAIRS if "batch1" not in p], ids=lambda p: "-".join(p))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_alpamayo1_5_guidance_with_fields_of_two_layouts_is_the_original(device, layouts, dtype,
                                                                       case_rng, fused_launches):
    dims, batch, steps = [case_rng.randint(2, 20), 2], case_rng.randint(2, 7), 4
    seed = case_rng.randrange(2**31)
    msg = f"{layouts} {dtype} dims={dims} batch={batch} seed={seed}"
    torch.manual_seed(seed)
    ours = FlowMatching("euler", steps, 2.5, dims, True).sample(
        batch, *_fields(layouts, dims, dtype, seed), device, True)
    torch.manual_seed(seed)
    want = spec_sample_1_5(dims, batch, *_fields(layouts, dims, dtype, seed), device, steps, True,
                           guidance=True, weight=2.5)
    assert_bitwise(ours, want, msg)
    fused_launches.expect(steps, msg)


@pytest.mark.parametrize("method", ["midpoint", "heun", "rk4"])
@pytest.mark.parametrize("layouts", [p for p in PAIRS if "batch1" not in p], ids=lambda p: "-".join(p))
def test_alpamayo1_5_rk_guidance_with_fields_of_two_layouts_is_plain_torch(device, method, layouts,
                                                                         case_rng, fused_launches):
    dims, batch, steps = [case_rng.randint(2, 20), 2], case_rng.randint(2, 7), 3
    seed = case_rng.randrange(2**31)
    results = []
    for backend in (None, "torch"):
        torch.manual_seed(seed)
        fm = FlowMatching(method, steps, -0.7, dims, True, backend=backend)
        results.append(fm.sample(batch, *_fields(layouts, dims, torch.bfloat16, seed), device,
                                 True))
    msg = f"{method} {layouts} dims={dims} batch={batch} seed={seed}"
    assert_bitwise(results[0], results[1], msg)
    fused_launches.expect(steps * len(METHODS[method]), msg)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layout", ODD)
def test_r1_doubled_batch_field_of_any_layout_is_plain_torch(device, method, layout, case_rng,
                                                            fused_launches):
    """R1's ``guidance=True``: one tensor for both halves, so both share its strides; any layout
    of that tensor (a ``[1, *x_dims]`` one included) gives the plain-torch bits."""
    dims, batch, steps = [case_rng.randint(2, 20), 2], case_rng.randint(2, 7), 3
    seed = case_rng.randrange(2**31)
    field = _fields((layout, layout), dims, torch.float32, seed)[0]
    results = []
    for backend in (None, "torch"):
        torch.manual_seed(seed)
        fm = R1FlowMatching(x_dims=dims, int_method=method, num_inference_steps=steps,
                            backend=backend)
        results.append(fm.sample(batch, field, device=device, return_all_steps=True,
                                 guidance=True, guidance_weight=2.5))
    msg = f"{method} {layout} dims={dims} batch={batch} seed={seed}"
    assert_bitwise(results[0], results[1], msg)
    fused_launches.expect(steps * len(METHODS[method]), msg)
