"""Every fused backend's ops (``euler_step``, ``stage_step``) against the reference, bitwise,
case by case (the ``target`` fixture: tests/conftest.py).

Runs for Triton on CPU tensors when ``TRITON_INTERPRET=1`` (CI does), for the CUDA extension on CPU
tensors through its host emulation when ``FLOWMATCH_FAST_CUDA_EMULATE=1`` (CI does), and for
Triton and the CUDA extension on a CUDA device when there is one; otherwise the cases skip with
the reason.
"""

import itertools

import pytest
import torch

from fields import FIELD_DTYPES, make_velocity
from flowmatch_fast.kernels import reference
from flowmatch_fast.kernels.contract import Guidance, TimeGrid, result_dtype

STATE_DTYPES = (torch.float32, torch.float64)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "misaligned")
SHAPES = ((1, 1), (3, 5), (6, 64, 2), (2, 1025), (4, 3, 7, 11), (1, 4099))


def _run(step, x, v, grid, i, rows_out, traj_buf, vu=None, w=1.0):
    dtype = result_dtype(x.dtype, v)
    out = torch.full((rows_out * x.shape[0], *x.shape[1:]), float("nan"), dtype=dtype, device=x.device)
    traj = None
    if traj_buf is not None:
        traj_buf = traj_buf.to(dtype).fill_(float("nan"))
        traj = traj_buf[:, i + 1]
    step(x, v, grid, i, out, traj, vu, Guidance("batch", w))
    return out, traj_buf


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_euler_step_matches_reference(target, shape, case_rng):
    backend, device = target
    gen = torch.Generator().manual_seed(case_rng.randrange(2**31))
    steps = 7
    grid = TimeGrid(torch.linspace(0, 1, steps + 1, device=device), shape[0], len(shape))
    for state_dtype, field_dtype, layout, with_traj, dup, guided in itertools.product(
        STATE_DTYPES, FIELD_DTYPES, LAYOUTS, (False, True), (1, 2), (False, True)
    ):
        if (dup == 2) != guided:  # the doubled output goes with guidance
            continue
        i = case_rng.randrange(steps)
        x = torch.randn(shape, generator=gen).to(device, state_dtype)
        v = make_velocity(layout, shape, field_dtype, device, gen)
        vu = make_velocity(layout, shape, field_dtype, device, gen) if guided else None
        if vu is not None and layout == "expanded":
            vu = v + 0.5  # same layout and dtype as v is part of the contract
            vu = vu[:1].expand(shape)
        w = case_rng.choice([2.5, -0.75, 7.3])
        traj_buf = torch.empty(shape[0], steps + 1, *shape[1:], device=device) if with_traj else None
        want, want_traj = _run(reference.euler_step, x, v, grid, i, dup, traj_buf, vu, w)
        x_before, v_before = x.clone(), v.clone()
        got, got_traj = _run(backend.euler_step, x, v, grid, i, dup, traj_buf, vu, w)
        msg = f"{state_dtype} {field_dtype} {layout} traj={with_traj} dup={dup} guided={guided} i={i}"
        assert torch.equal(got, want), msg  # NaN poison: also proves every element was written
        assert torch.equal(x, x_before) and torch.equal(v, v_before), msg
        if with_traj:
            assert torch.equal(got_traj[:, i + 1], want_traj[:, i + 1]), msg
            others = [j for j in range(steps + 1) if j != i + 1]
            assert got_traj[:, others].isnan().all(), f"{msg}: wrote outside its slot"


def test_dt_is_read_from_the_grid_on_device(target):
    """A non-uniform grid: the kernel must take dt = grid[i+1] - grid[i] for the given i."""
    backend, device = target
    values = torch.tensor([0.0, 0.1, 0.35, 0.36, 1.0], device=device)
    grid = TimeGrid(values, 2, 2)
    x = torch.randn(2, 33, device=device)
    v = torch.randn(2, 33, device=device)
    for i in range(4):
        out = torch.empty_like(x)
        backend.euler_step(x, v, grid, i, out)
        assert torch.equal(out, x + (values[i + 1] - values[i]) * v)


def test_no_fused_multiply_add(target):
    """Inputs where fma(dt, v, x) and x + round(dt * v) differ: the kernel must give the latter."""
    backend, device = target
    grid = TimeGrid(torch.linspace(0, 1, 4, device=device), 1, 2)  # dt = 1/3, inexact
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(1, 4096, generator=gen).to(device)
    x = -(grid.dt_views[0] * v)  # x + dt*v is exactly 0; an fma returns the product's rounding error
    out = torch.empty_like(x)
    backend.euler_step(x, v, grid, 0, out)
    assert torch.equal(out, torch.zeros_like(out))
    fused = torch.addcmul(x.double(), grid.dt_views[0].double(), v.double()).float()
    assert (fused != 0).any(), "the test inputs no longer separate fma from mul+add"


def test_stage_step_matches_reference(target, case_rng):
    """Every Runge-Kutta stage program, every dtype pair, guided or not: bitwise."""
    from flowmatch_fast.integrators import METHODS
    from flowmatch_fast.kernels.contract import stage_dtype

    backend, device = target
    if not hasattr(backend, "stage_step"):
        pytest.skip(f"{backend.__name__} has no stage_step")
    gen = torch.Generator().manual_seed(case_rng.randrange(2**31))
    shape = (3, 5, 7)
    steps = 5
    grid = TimeGrid(torch.linspace(0, 1, steps + 1, device=device), shape[0], len(shape))
    stages = {st for name, sts in METHODS.items() if name != "euler" for st in sts}
    for st, state_dtype, field_dtype, guided, layout in itertools.product(
        sorted(stages), STATE_DTYPES, FIELD_DTYPES, (False, True),
        ("contiguous", "transposed", "expanded")
    ):
        i = case_rng.randrange(steps)
        x = torch.randn(shape, generator=gen).to(device, state_dtype)
        k = make_velocity(layout, shape, field_dtype, device, gen)
        ku = make_velocity(layout, shape, field_dtype, device, gen) if guided else None
        if ku is not None and layout == "expanded":
            ku = (k[:1] + 0.5).expand(shape)  # same layout and dtype as k
        acc = torch.randn(shape, generator=gen).to(device, state_dtype) if st.uses_acc else None
        c = stage_dtype(x.dtype, k, acc)
        traj_buf = torch.full((shape[0], steps + 1, *shape[1:]), float("nan"), dtype=c, device=device)
        results = []
        for step in (reference.stage_step, backend.stage_step):
            out = torch.full(((2 if guided else 1) * shape[0], *shape[1:]), float("nan"), dtype=c,
                             device=device)
            tb = traj_buf.clone()
            new, acc_out = step(x, k, grid, i, st, acc, out, tb[:, i + 1] if st.from_acc else None,
                                ku, Guidance("batch", 1.75))
            results.append((new, acc_out, tb))
        msg = f"{st} {state_dtype} {field_dtype} guided={guided} {layout} i={i}"
        (r_new, r_acc, r_tb), (b_new, b_acc, b_tb) = results
        assert torch.equal(r_new, b_new), msg
        assert (r_acc is None) == (b_acc is None), msg
        if r_acc is not None:
            assert r_acc.shape == b_acc.shape == x.shape and b_acc.is_contiguous(), msg
            assert torch.equal(r_acc, b_acc), msg
        assert torch.equal(r_tb.nan_to_num(7.0), b_tb.nan_to_num(7.0)), msg


def _sde_table(device, steps, noise_level=0.8):
    from flowmatch_fast.sde import sde_grid

    return sde_grid(torch.linspace(0, 1, steps + 1).tolist(), noise_level, torch.device(device)).table


@pytest.mark.parametrize("shape", ((1, 1), (6, 64, 2), (2, 1025), (4, 3, 7, 11)),
                         ids=lambda s: "x".join(map(str, s)))
def test_sde_step_matches_reference(target, shape, case_rng):
    """The RL SDE step: every field dtype and layout, guided (1.5's mix) or not, drawing or
    replaying, with or without the trajectory slot: next state, slot and log-prob bitwise."""
    backend, device = target
    gen = torch.Generator().manual_seed(case_rng.randrange(2**31))
    steps = 5
    table = _sde_table(device, steps)
    for field_dtype, layout, guided in itertools.product(FIELD_DTYPES, LAYOUTS, (False, True)):
        # drawing or replaying, with or without the slot: one of each per case, at random
        replay, with_traj = case_rng.random() < 0.5, case_rng.random() < 0.5
        i = case_rng.randrange(steps)
        x = torch.randn(shape, generator=gen).to(device)
        v = make_velocity(layout, shape, field_dtype, device, gen)
        vu = None
        if guided:
            vu = (v + 0.5) if layout != "expanded" else (v[:1] + 0.5).expand(shape)
        noise = torch.randn(shape, generator=gen).to(device)
        guidance = Guidance("mix" if guided else "none", case_rng.choice([2.5, -0.75]))
        results = []
        for step in (reference.sde_step, backend.sde_step):
            traj_buf = torch.full((shape[0], steps + 1, *shape[1:]), float("nan"), device=device)
            slot = traj_buf[:, i + 1] if with_traj else None
            nxt, lp = step(x, v, vu, guidance, table, i, noise, replay, None, slot, None)
            results.append((nxt, lp, traj_buf))
        msg = f"{field_dtype} {layout} guided={guided} replay={replay} traj={with_traj} i={i}"
        (r_next, r_lp, r_tb), (b_next, b_lp, b_tb) = results
        assert torch.equal(b_next, r_next) and torch.equal(b_lp, r_lp), msg
        assert b_lp.is_contiguous() and b_lp.shape == x.shape, msg
        assert torch.equal(b_tb.nan_to_num(7.0), r_tb.nan_to_num(7.0)), msg
        if replay:
            assert b_next is noise, msg


def test_sde_step_divides_exactly(target):
    """Values where -(d*d) / denom and -(d*d) * (1 / denom) differ: the kernel divides."""
    backend, device = target
    table = _sde_table(device, 4, noise_level=0.37)
    gen = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(2, 4096, generator=gen).to(device) for _ in range(3))
    want = reference.sde_step(x, v, None, Guidance(), table, 1, z, False)[1]
    got = backend.sde_step(x, v, None, Guidance(), table, 1, z, False)[1]
    assert torch.equal(got, want)
    d = z * table[1, 3]  # next - mean, up to rounding
    assert not torch.equal(-(d * d) / table[1, 4], -(d * d) * (1 / table[1, 4])), (
        "the inputs no longer separate division from multiplication by the reciprocal")
