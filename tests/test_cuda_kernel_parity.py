"""Bitwise parity of the CUDA kernels with the reference, case by case, wherever they run: emulated
on the host (CPU tensors, FLOWMATCH_FAST_CUDA_EMULATE=1; every CI pass) and on a GPU (-m gpu):
dtypes, odd sizes, layouts, guidance, trajectory and doubled outputs, misaligned pointers, every
stage of every Runge-Kutta method, the fallbacks, and sampling against the torch backend. On a
GPU also: emulated vs device on the same inputs, side streams, graph capture, more than 2^31
elements, and torch.compile.
"""

from __future__ import annotations

import functools
import itertools
import zlib

import pytest
import torch

from cuda_ext import ext_or_skip
from fields import FIELD_DTYPES, TENSOR_LAYOUTS, make_velocity
from flowmatch_fast import FlowMatching, alpamayo1_5
from flowmatch_fast import integrators
from flowmatch_fast.graph import capture_callable
from flowmatch_fast.integrators import METHODS
from flowmatch_fast.kernels import reference
from flowmatch_fast.kernels.cuda import launch as cuda_euler
from flowmatch_fast.kernels.cuda import loader as cuda_loader
from flowmatch_fast.kernels.contract import Guidance, TimeGrid, result_dtype, stage_dtype

STATE_DTYPES = (torch.float32, torch.float64)
SENTINEL = 1234.5
# Velocity modes: the field alone, R1's guidance (doubled batch out), Alpamayo 1.5's mix.
GUIDANCE = (False, "cfg", "mix")


def _guidance(guided, uncond, w, key="vu"):
    """The keyword arguments of _both (_stage_both: key="ku") for one velocity mode; ``uncond``
    is the unconditional field."""
    if guided == "cfg":
        return {key: uncond, "w": w, "doubled": True}
    if guided == "mix":
        return {key: uncond, "w": w, "mix": True}
    return {}


def _grid(steps, batch, ndim, device, seed=0):
    """A non-uniform grid, so that dt is an arbitrary float32 (not a power of two)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(steps + 1, generator=g).sort().values.to(device)
    return TimeGrid(values, batch, ndim)


# The CUDA steps where their ``supports`` takes the call, else the reference (as sampling does).
_cuda_or_reference_euler = functools.partial(integrators.euler_step, cuda_euler)
_cuda_or_reference_stage = functools.partial(integrators.stage_step, cuda_euler)


def _as_guidance(w, mix):
    return Guidance("mix" if mix else "batch", w)


def _both(x, v, grid, i, *, traj=False, doubled=False, vu=None, w=1.0, mix=False,
          misaligned_out=False, out_none=False):
    """Run the reference and the CUDA kernel on identical fresh buffers; return both results."""
    dtype = result_dtype(x.dtype, v)
    rows = x.shape[0]
    results = []
    for step in (reference.euler_step, _cuda_or_reference_euler):
        shape = (2 * rows if doubled else rows, *x.shape[1:])
        if out_none:
            out = None
        elif misaligned_out:
            numel = torch.Size(shape).numel()
            out = torch.full((numel + 1,), SENTINEL, dtype=dtype, device=x.device)[1:].view(shape)
        else:
            out = torch.full(shape, SENTINEL, dtype=dtype, device=x.device)
        states = None
        if traj:
            states = torch.full((rows, grid.steps + 1, *x.shape[1:]), SENTINEL, dtype=dtype,
                                device=x.device)
        res = step(x, v, grid, i, out, states[:, i + 1] if traj else None, vu,
                   _as_guidance(w, mix))
        results.append((res, states))
    _sync(x.device)
    return results


def _assert_same(results, what):
    (ref, ref_states), (got, got_states) = results
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    assert torch.equal(got, ref), f"{what}: max diff {(got.double() - ref.double()).abs().max()}"
    if ref_states is not None:
        assert torch.equal(got_states, ref_states), f"{what}: trajectory differs"


@pytest.fixture
def cuda():
    reason = cuda_euler.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the cuda backend is not available: {reason}")
    return torch.device("cuda")


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def kdev(request, monkeypatch):
    """Where the kernels run: emulated on the host (CPU tensors, every CI pass) or on a GPU."""
    if request.param == "emulated":
        ext_or_skip()
        monkeypatch.setenv(cuda_euler.EMULATE_ENV, "1")
        return torch.device("cpu")
    return request.getfixturevalue("cuda")


# "large": enough elements that every thread of the grid-stride loops runs several iterations.
# An H200 (132 SMs x 2048 threads) holds 270336 threads; the host emulation's grid 2048.
LARGE = {"cuda": 1000003, "cpu": 20011}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("numel", [1, 3, 127, "large"])
def test_parity_dtypes_and_odd_sizes(kdev, numel):
    numel = LARGE[kdev.type] if numel == "large" else numel
    gen = torch.Generator().manual_seed(numel)
    for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
        for shape in ((1, numel), (numel, 1)) if numel < 1000 else ((1, numel),):
            x = torch.randn(shape, generator=gen).to(kdev, state)
            v = make_velocity("contiguous", shape, field, kdev, gen)
            grid = _grid(5, shape[0], 2, kdev, seed=numel)
            for i in (0, 3):
                _assert_same(_both(x, v, grid, i), (state, field, shape, i))
            _assert_same(_both(x, v, grid, 2, out_none=True), (state, field, shape, "out=None"))


@pytest.mark.parametrize("layout", TENSOR_LAYOUTS)
@pytest.mark.parametrize("shape", [(6, 64, 2), (3, 5, 7), (2, 3, 4, 5, 6), (4, 1025)],
                         ids=lambda s: "x".join(map(str, s)))
def test_parity_layouts_guidance_traj_doubled(kdev, layout, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, shape)).encode()))
    grid = _grid(7, shape[0], len(shape), kdev, seed=len(shape))
    for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
        x = torch.randn(shape, generator=gen).to(kdev, state)
        v = make_velocity(layout, shape, field, kdev, gen)
        vu = make_velocity(layout, shape, field, kdev, gen)
        for traj, guided in itertools.product((False, True), GUIDANCE):
            what = (layout, shape, state, field, traj, guided)
            _assert_same(_both(x, v, grid, 4, traj=traj, **_guidance(guided, vu, 2.5)), what)


def test_parity_misaligned_state_and_output(kdev):
    gen = torch.Generator().manual_seed(7)
    shape = (3, 130)
    grid = _grid(4, shape[0], 2, kdev)
    for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
        flat = torch.randn(torch.Size(shape).numel() + 1, generator=gen).to(kdev, state)
        x = flat[1:].view(shape)  # contiguous but not 16-byte aligned
        v = make_velocity("contiguous", shape, field, kdev, gen)
        _assert_same(_both(x, v, grid, 1), (state, field, "x"))
        _assert_same(_both(x, v, grid, 1, misaligned_out=True), (state, field, "out"))
        vu = make_velocity("misaligned", shape, field, kdev, gen)
        _assert_same(_both(x, v, grid, 2, vu=vu, w=-0.75, doubled=True, traj=True),
                     (state, field, "vu"))
        _assert_same(_both(x, v, grid, 2, vu=vu, w=-0.75, mix=True, traj=True),
                     (state, field, "vu, mix"))


def test_parity_rows_that_break_vectors(kdev):
    """Trajectory rows and doubled halves that do not start on a vector boundary."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((5, 3), (3, 1, 3), (7, 2), (2, 6)):
        grid = _grid(3, shape[0], len(shape), kdev)
        for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
            x = torch.randn(shape, generator=gen).to(kdev, state)
            v = make_velocity("contiguous", shape, field, kdev, gen)
            vu = make_velocity("contiguous", shape, field, kdev, gen)
            _assert_same(_both(x, v, grid, 1, traj=True, vu=vu, w=2.5, doubled=True),
                         (shape, state, field))


@pytest.mark.gpu
def test_side_stream(cuda):
    gen = torch.Generator().manual_seed(11)
    shape = (4, 1000)
    x = torch.randn(shape, generator=gen).to(cuda)
    v = make_velocity("transposed", shape, torch.bfloat16, cuda, gen)
    grid = _grid(3, 4, 2, cuda)
    expected = reference.euler_step(x, v, grid, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_euler.euler_step(x, v, grid, 1)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_graph_capture_reads_dt_on_the_device(cuda):
    gen = torch.Generator().manual_seed(5)
    shape = (6, 64, 2)
    x = torch.randn(shape, generator=gen).to(cuda)
    v = make_velocity("batch1", shape, torch.float16, cuda, gen)
    grid = _grid(4, 6, 3, cuda)
    out = torch.empty(shape, device=cuda)
    # the warm-up call loads the kernel outside the capture
    graph, _ = capture_callable(lambda: cuda_euler.euler_step(x, v, grid, 2, out), cuda, warmup=1)
    for seed in (1, 2):
        grid.values.copy_(_grid(4, 6, 3, cuda, seed=seed).values)  # new dt, same buffer
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, reference.euler_step(x, v, TimeGrid(grid.values, 6, 3), 2))


@pytest.mark.parametrize("method, return_all_steps", [
    ("euler", False), ("euler", True), ("midpoint", True), ("heun", True), ("rk4", True)])
def test_sample_matches_torch_backend(kdev, method, return_all_steps):
    def field(*, x, t):
        return (torch.sin(1.7 * x) - 0.5 * x * t + t).to(torch.bfloat16)

    results = []
    for backend in ("torch", "cuda"):
        torch.manual_seed(0)
        fm = FlowMatching(x_dims=[64, 2], backend=backend, num_inference_steps=7)
        results.append(fm.sample(6, field, device=kdev, int_method=method,
                                 return_all_steps=return_all_steps))
    if return_all_steps:
        assert all(torch.equal(a, b) for a, b in zip(*results))
    else:
        assert torch.equal(*results)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_guided_sample_matches_torch_backend(kdev, method):
    """Guidance (doubled batch, out with 2B rows, w = 2.5) and a multi-stage method."""
    def field(*, x, t):
        return torch.cos(x) * t + x[..., :1]  # [2B, 64, 2]; both halves see the same x

    results = []
    for backend in ("torch", "cuda"):
        fm = FlowMatching(x_dims=[64, 2], backend=backend, num_inference_steps=6)
        gen = torch.Generator(kdev).manual_seed(3)
        results.append(fm.sample(5, field, device=kdev, int_method=method, guidance=True,
                                 guidance_weight=2.5, generator=gen, return_all_steps=True))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.gpu
def test_parity_past_2_to_the_31_elements(cuda):
    """The 64-bit index path (n > INT32_MAX): batch-broadcast field and trajectory rows."""
    if torch.cuda.get_device_properties(cuda).total_memory < 80 * 2**30:
        pytest.skip("needs 80 GiB of GPU memory")
    rows, cols = 3, 2**31 // 3 + 77  # n = 2^31 + 229
    x = torch.empty(rows, cols, device=cuda).normal_()
    v = torch.randn(1, cols, device=cuda, dtype=torch.bfloat16)
    grid = _grid(2, rows, 2, cuda)
    expected = reference.euler_step(x, v, grid, 1)
    got = cuda_euler.euler_step(x, v, grid, 1)
    assert torch.equal(got, expected)
    del got
    traj_buf = torch.empty(rows, 2, cols, device=cuda)  # slot i+1 of a 2-slot trajectory
    cuda_euler.euler_step(x, v, grid, 0, traj=traj_buf[:, 1])
    assert torch.equal(traj_buf[:, 1], reference.euler_step(x, v, grid, 0))


# ------------------------------------------------------------- GPU parity: Runge-Kutta stages
# Every distinct stage of the multi-stage methods (midpoint, heun, rk4), and the last stages,
# which write the trajectory slot in integrators.integrate.
STAGES = sorted({st for name, sts in METHODS.items() if name != "euler" for st in sts})
LAST_STAGES = {sts[-1] for name, sts in METHODS.items() if name != "euler"}
STAGE_LAYOUTS = ("contiguous", "transposed", "batch1", "expanded", "strided")


def _nan_buffer(shape, dtype, device, misaligned=False):
    """A NaN-poisoned buffer: an element the kernel forgets to write fails torch.equal."""
    if not misaligned:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    numel = torch.Size(shape).numel()
    return torch.full((numel + 1,), float("nan"), dtype=dtype, device=device)[1:].view(shape)


def _stage_both(x, k, grid, i, st, *, acc=None, ku=None, w=1.0, mix=False, doubled=False,
                traj=False, out_none=False, misaligned_out=False):
    """reference.stage_step and cuda_euler.stage_step on identical fresh (poisoned) buffers."""
    c = stage_dtype(x.dtype, k, acc)
    rows = x.shape[0]
    inputs = [t.clone() for t in (x, k, acc, ku) if t is not None]
    results = []
    for step in (reference.stage_step, _cuda_or_reference_stage):
        out = None
        if not out_none:
            out = _nan_buffer(((2 if doubled else 1) * rows, *x.shape[1:]), c, x.device,
                              misaligned_out)
        states = None
        if traj:
            states = _nan_buffer((rows, grid.steps + 1, *x.shape[1:]), c, x.device)
        new, acc_out = step(x, k, grid, i, st, acc, out, states[:, i + 1] if traj else None, ku,
                            _as_guidance(w, mix))
        results.append((new, acc_out, states))
    _sync(x.device)
    after = [t for t in (x, k, acc, ku) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after)), "an input was written"
    return results


def _assert_same_stage(results, i, what):
    (r_new, r_acc, r_states), (b_new, b_acc, b_states) = results
    assert b_new.dtype == r_new.dtype and b_new.shape == r_new.shape, what
    assert b_new.is_contiguous(), what
    assert torch.equal(b_new, r_new), (
        f"{what}: max diff {(b_new.double() - r_new.double()).abs().nan_to_num(float('inf')).max()}")
    assert (r_acc is None) == (b_acc is None), what
    if r_acc is not None:
        assert b_acc.dtype == r_acc.dtype and b_acc.is_contiguous(), what
        assert torch.equal(b_acc, r_acc), f"{what}: accumulator differs"
    if r_states is not None:
        assert not b_states[:, i + 1].isnan().any(), f"{what}: trajectory slot not fully written"
        assert torch.equal(b_states.nan_to_num(7.0), r_states.nan_to_num(7.0)), (
            f"{what}: trajectory differs (or written outside its slot)")


@pytest.mark.parametrize("layout", STAGE_LAYOUTS)
def test_stage_parity_programs_dtypes_guidance_layouts(kdev, layout):
    """Every stage of every method x state x field dtype x velocity mode (R1 guidance with a
    doubled out, the 1.5 mix) x layout; the last stages also write the trajectory slot. The
    accumulator comes in C, as from the previous stage, or in the state's dtype (widened by
    stage_step) on alternate cases."""
    shape = (6, 64, 2)
    gen = torch.Generator().manual_seed(zlib.crc32(layout.encode()))
    grid = _grid(5, shape[0], len(shape), kdev, seed=3)
    for n, (st, state, field, guided) in enumerate(
        itertools.product(STAGES, STATE_DTYPES, FIELD_DTYPES, GUIDANCE)
    ):
        x = torch.randn(shape, generator=gen).to(kdev, state)
        k = make_velocity(layout, shape, field, kdev, gen)
        ku = make_velocity(layout, shape, field, kdev, gen)
        acc = None
        if st.uses_acc:
            acc_dtype = stage_dtype(state, k, None) if n % 2 else state
            acc = torch.randn(shape, generator=gen).to(kdev, acc_dtype)
        i = n % grid.steps
        what = (layout, st, state, field, guided, i)
        results = _stage_both(x, k, grid, i, st, acc=acc, traj=st in LAST_STAGES,
                              **_guidance(guided, ku, 2.5, key="ku"))
        _assert_same_stage(results, i, what)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 3), (3, 1, 3), (2, 1025), (1, "large")],
                         ids=lambda s: "x".join(map(str, s)))
def test_stage_parity_odd_sizes_and_misaligned_buffers(kdev, shape):
    """Sizes that leave scalar tails, trajectory rows and doubled halves off vector boundaries,
    misaligned state / field / accumulator / output pointers, and out=None."""
    shape = tuple(LARGE[kdev.type] if d == "large" else d for d in shape)
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    grid = _grid(4, shape[0], len(shape), kdev, seed=len(shape))
    rk4 = METHODS["rk4"]
    for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
        c = stage_dtype(state, torch.empty(0, dtype=field), None)
        numel = torch.Size(shape).numel()
        x = torch.randn(numel + 1, generator=gen).to(kdev, state)[1:].view(shape)
        k = make_velocity("misaligned", shape, field, kdev, gen)
        acc = torch.randn(numel + 1, generator=gen).to(kdev, c)[1:].view(shape)
        for j, st in enumerate(rk4):
            what = (shape, state, field, j)
            a = acc if st.uses_acc else None
            _assert_same_stage(_stage_both(x, k, grid, 1, st, acc=a), 1, what)
            _assert_same_stage(_stage_both(x, k, grid, 2, st, acc=a, misaligned_out=True,
                                           traj=True), 2, what + ("misaligned out",))
            _assert_same_stage(_stage_both(x, k, grid, 3, st, acc=a, out_none=True), 3,
                               what + ("out=None",))
            if numel < 1000:
                ku = make_velocity("contiguous", shape, field, kdev, gen)
                _assert_same_stage(_stage_both(x, k, grid, 0, st, acc=a, ku=ku, w=-0.75,
                                               doubled=True, traj=True), 0, what + ("guided",))
                _assert_same_stage(_stage_both(x, k, grid, 0, st, acc=a, ku=ku, w=-0.75,
                                               mix=True, traj=True), 0, what + ("mix",))


def test_stage_fallbacks_give_the_same_bits(kdev):
    """What the kernel does not cover goes to the reference: an accumulator that alone makes C
    float64, a broadcast accumulator, fields of two dtypes, an out of another dtype."""
    gen = torch.Generator().manual_seed(9)
    shape = (4, 33)
    grid = _grid(3, shape[0], 2, kdev)
    st = METHODS["rk4"][1]  # has_acc, acc_w2, write_acc
    x = torch.randn(shape, generator=gen).to(kdev)
    k = torch.randn(shape, generator=gen).to(kdev, torch.bfloat16)
    acc64 = torch.randn(shape, generator=gen).to(kdev, torch.float64)
    _assert_same_stage(_stage_both(x, k, grid, 1, st, acc=acc64), 1, "float64 accumulator")
    acc_b = torch.randn(1, shape[1], generator=gen).to(kdev).expand(shape)
    _assert_same_stage(_stage_both(x, k, grid, 1, st, acc=acc_b), 1, "broadcast accumulator")
    ku = torch.randn(shape, generator=gen).to(kdev, torch.float16)
    _assert_same_stage(_stage_both(x, k, grid, 1, st, acc=acc_b.contiguous(), ku=ku, w=2.0,
                                   doubled=True), 1, "mixed field dtypes")
    out = torch.empty(shape, device=kdev, dtype=torch.float64)
    new, acc_out = _cuda_or_reference_stage(x, k, grid, 1, st, acc_b.contiguous(), out)
    ref, ref_acc = reference.stage_step(x, k, grid, 1, st, acc_b.contiguous(), torch.empty_like(out))
    assert new is out and torch.equal(new, ref) and torch.equal(acc_out, ref_acc)


@pytest.mark.gpu
def test_stage_graph_capture_reads_dt_on_the_device(cuda):
    gen = torch.Generator().manual_seed(6)
    shape = (6, 64, 2)
    st = METHODS["heun"][1]  # from_acc, coef 0.5
    x = torch.randn(shape, generator=gen).to(cuda)
    k = make_velocity("batch1", shape, torch.float16, cuda, gen)
    acc = torch.randn(shape, generator=gen).to(cuda)
    grid = _grid(4, 6, 3, cuda)
    out = torch.empty(shape, device=cuda)
    graph, _ = capture_callable(lambda: cuda_euler.stage_step(x, k, grid, 2, st, acc, out), cuda,
                                warmup=1)
    for seed in (1, 2):
        grid.values.copy_(_grid(4, 6, 3, cuda, seed=seed).values)
        graph.replay()
        torch.cuda.synchronize()
        want, _ = reference.stage_step(x, k, TimeGrid(grid.values, 6, 3), 2, st, acc)
        assert torch.equal(out, want)


# ------------------------------------------------------------------- GPU: torch.compile
@pytest.mark.gpu
@pytest.mark.parametrize("method, kwargs", [
    ("euler", {}),
    ("rk4", {}),
    ("heun", dict(guidance=True, guidance_weight=2.5, return_all_steps=True,
                  inference_step=4)),
], ids=["euler", "rk4", "heun-guided-traj"])
def test_torch_compile_fullgraph_matches_eager(cuda, method, kwargs):
    """torch.compile(fullgraph=True, backend="eager") of cuda-backend sampling runs (the launches
    as the custom ops) and gives eager's bits under the same seed."""
    def field(*, x, t):
        return torch.sin(1.7 * x) - 0.5 * x * t + t

    fm = FlowMatching(x_dims=(64, 2), backend="cuda")

    def run():
        return fm.sample(6, field, device="cuda", int_method=method, **kwargs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = run()
    torch.manual_seed(0)
    compiled = torch.compile(run, fullgraph=True, backend="eager")()
    if isinstance(eager, tuple):
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    else:
        assert torch.equal(eager, compiled)



@pytest.mark.gpu
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_torch_compile_of_1_5_guided_sampling_matches_eager(cuda, method):
    """Alpamayo 1.5's guided sampling (the mix inside the custom ops) compiled with
    fullgraph=True gives eager's bits under the same seed."""
    def guided(*, x, t):
        return (torch.sin(1.7 * x) - 0.5 * x * t + t).to(torch.bfloat16)

    def unguided(*, x, t):
        return (0.5 * x - t).to(torch.bfloat16)

    fm = alpamayo1_5.FlowMatching(method, 4, 2.5, (64, 2), True, backend="cuda")

    def run():
        return fm.sample(6, guided, unguided, "cuda", return_all_steps=True)

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = run()
    torch.manual_seed(0)
    compiled = torch.compile(run, fullgraph=True, backend="eager")()
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "batch1", "misaligned"])
def test_emulation_matches_the_device(cuda, monkeypatch, layout):
    """The same inputs through the host emulation (CPU) and the GPU, torch.equal: drift between
    the host and the device compilation of the kernels' code (contraction, conversions,
    intrinsics, the 1.5 mix's rounding to 16 bits) shows here, for the Euler update and every
    Runge-Kutta stage, in every velocity mode (the mix at weights whose float32 rounding and
    1 - w matter)."""
    ext_or_skip()
    monkeypatch.setenv(cuda_euler.EMULATE_ENV, "1")
    gen = torch.Generator().manual_seed(zlib.crc32(layout.encode()))
    shape = (5, 67, 3)  # odd sizes: vector path (when aligned) and scalar tail
    grid_cpu = _grid(4, shape[0], len(shape), "cpu", seed=1)
    grid_gpu = TimeGrid(grid_cpu.values.to(cuda), shape[0], len(shape))
    modes = [(False, 1.0), ("cfg", 2.5)] + [("mix", w) for w in (2.5, 1.0 / 3.0, -0.7)]
    for state, field, (guided, w) in itertools.product(STATE_DTYPES, FIELD_DTYPES, modes):
        x = torch.randn(shape, generator=gen).to(state)
        v = make_velocity(layout, shape, field, "cpu", gen)
        vu = make_velocity(layout, shape, field, "cpu", gen) if guided else None
        c = stage_dtype(state, v, None)
        acc = torch.randn(shape, generator=gen).to(c)
        mix = guided == "mix"
        what = (layout, state, field, guided, w)

        def on(device, grid):
            def move(t):  # same values, strides and alignment on the GPU
                return None if t is None else _same_layout(t, device)

            xd, vd, vud, accd = move(x), move(v), move(vu), move(acc)
            got = [cuda_euler.euler_step(xd, vd, grid, 2, None, None, vud, _as_guidance(w, mix))]
            for st in STAGES:
                a = accd if st.uses_acc else None
                got += [t for t in cuda_euler.stage_step(xd, vd, grid, 2, st, a, None, None, vud,
                                                         _as_guidance(w, mix)) if t is not None]
            return [t.cpu() for t in got]

        for a, b in zip(on("cpu", grid_cpu), on(cuda, grid_gpu)):
            assert torch.equal(a, b), what


def _same_layout(t, device):
    """``t`` on ``device`` with the same strides (and a storage offset of one element when ``t``
    has one, so that misalignment carries over)."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
    storage.copy_(torch.as_strided(t, (storage.numel(),), (1,), 0))
    return torch.as_strided(storage.to(device), t.shape, t.stride(), t.storage_offset())
