"""``torch.set_default_dtype(...)``: the original's noise and ``linspace`` grid follow the default
dtype, so under a float64 default ``dt`` is float64 and every update is a float64 product. Every
backend gives the original's bits (the oracle run under the same default) or, where its kernels
cannot read that grid, says so: ``auto`` takes another backend, an explicit request raises
naming the default dtype.

Runs through the backend ``FLOWMATCH_FAST_BACKEND`` selects, and per launch through ``target``.
"""

import pytest
import torch

from flowmatch_fast import FlowMatching, arguments, backends
from flowmatch_fast.alpamayo1_5 import FlowMatching as FlowMatching1_5
from flowmatch_fast.integrators import METHODS
from flowmatch_fast.kernels import reference
from flowmatch_fast.kernels.contract import Guidance, TimeGrid
from bitwise import assert_bitwise
from capture_fakes import captures_on_cpu  # noqa: F401  (a fixture)
from fields import FIELD_DTYPES, LAYOUTS, make_field, make_velocity
from oracle import spec_sample, spec_sample_1_5

DEFAULTS = [torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=DEFAULTS, ids=str)
def default_dtype(request):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(previous)


def _selected(grid_dtype):
    """(backend to construct with, kernel launches per fused step): the selected backend, or
    ``"auto"`` after checking that the selected one refuses this grid, naming the default dtype."""
    name = backends.check_backend_name(None)
    if name in ("triton", "cuda") and backends.grid_reason(name, grid_dtype) is not None:
        with pytest.raises(RuntimeError, match=f"default dtype {torch.get_default_dtype()}"):
            FlowMatching(x_dims=2, backend=name).sample(1, lambda *, x, t: x)
        return "auto", 0
    return None, 1


@pytest.mark.parametrize("field_dtype", FIELD_DTYPES, ids=str)
@pytest.mark.parametrize("return_all_steps", [False, True], ids=["final", "all_steps"])
def test_r1_sample_is_the_original_under_the_default_dtype(device, default_dtype, field_dtype,
                                                         return_all_steps, case_rng,
                                                         fused_launches):
    dims = [case_rng.randint(1, 9), case_rng.randint(1, 4)]
    batch, steps = case_rng.randint(1, 9), case_rng.choice((7, 10, 13))  # dt inexact in float32
    layout = case_rng.choice(LAYOUTS)
    seed = case_rng.randrange(2**31)
    backend, per_step = _selected(default_dtype)
    fm = FlowMatching(x_dims=dims, num_inference_steps=steps, backend=backend)
    torch.manual_seed(seed)
    ours = fm.sample(batch, make_field(layout, field_dtype, dims, seed), device=device,
                     return_all_steps=return_all_steps)
    torch.manual_seed(seed)
    want = spec_sample(dims, batch, make_field(layout, field_dtype, dims, seed), device, steps,
                       return_all_steps)
    msg = f"default {default_dtype} field {field_dtype} {layout} dims={dims} b={batch} seed={seed}"
    assert_bitwise(ours, want, msg)
    # a 16-bit default draws 16-bit noise: the first update (a 16-bit state) is plain torch
    fused = steps if default_dtype == torch.float64 else 0
    fused_launches.expect(per_step * fused, msg)


@pytest.mark.parametrize("dtypes", [(f, f) for f in FIELD_DTYPES] + [(torch.bfloat16, torch.float32)],
                         ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_alpamayo1_5_guidance_is_the_original_under_a_float64_default(device, dtypes, case_rng,
                                                                    fused_launches):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dims, batch, steps = [case_rng.randint(2, 12), 2], case_rng.randint(1, 7), 10
        seed = case_rng.randrange(2**31)
        weight, temperature = case_rng.choice((2.5, -0.7, 1.0 / 3.0)), case_rng.choice((1.0, 0.8))
        backend, per_step = _selected(torch.float64)

        def fields():
            guided = make_field("contiguous", dtypes[0], dims, seed)
            unguided = make_field("permuted", dtypes[1], dims, seed + 1)
            return guided, lambda *, x, t: unguided(x=0.25 - 0.8 * x, t=t)

        torch.manual_seed(seed)
        ours = FlowMatching1_5("euler", steps, weight, dims, True, backend=backend).sample(
            batch, *fields(), device, True, temperature=temperature)
        torch.manual_seed(seed)
        want = spec_sample_1_5(dims, batch, *fields(), device, steps, True, guidance=True,
                               weight=weight, temperature=temperature)
        msg = f"{dtypes} w={weight} dims={dims} b={batch} seed={seed}"
        assert_bitwise(ours, want, msg)
        # two dtypes: PyTorch mixes the fields (the original's expression), the update is fused
        fused_launches.expect(per_step * steps, msg)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_methods_and_r1_guidance_under_a_float64_default_are_plain_torch(device, method, dtype,
                                                                       case_rng, fused_launches):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dims, batch, steps = [case_rng.randint(1, 9), 2], case_rng.randint(1, 7), 7
        seed = case_rng.randrange(2**31)
        backend, per_step = _selected(torch.float64)
        for guidance in (False, True):
            results = []
            for name in (backend, "torch"):
                fm = FlowMatching(x_dims=dims, int_method=method, num_inference_steps=steps,
                                  backend=name)
                torch.manual_seed(seed)
                results.append(fm.sample(batch, make_field("permuted", dtype, dims, seed),
                                         device=device, return_all_steps=True, guidance=guidance,
                                         guidance_weight=2.5 if guidance else None))
            msg = f"{method} {dtype} guidance={guidance} dims={dims} b={batch} seed={seed}"
            assert results[0][0].dtype == torch.float64 and results[0][1].dtype == torch.float64
            assert_bitwise(results[0], results[1], msg)
            fused_launches.expect(per_step * steps * len(METHODS[method]), msg)
    finally:
        torch.set_default_dtype(previous)


def test_each_launch_on_a_float64_grid_is_the_reference(target, case_rng):
    """One launch with a float64 grid: ``P = promote(float64, field)``, for every state and
    field dtype, Euler and every RK stage, guided or not; a backend whose kernels read a float32
    grid only says so (``GRID_DTYPES``) and the resolution never hands it one."""
    backend, device = target
    if torch.float64 not in backend.GRID_DTYPES:
        with pytest.raises(RuntimeError, match="default dtype torch.float64"):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                backends.resolve(backend.__name__.split(".")[-2], device, grid_dtype=torch.float64)
            finally:
                torch.set_default_dtype(previous)
        return
    gen = torch.Generator().manual_seed(case_rng.randrange(2**31))
    grid = TimeGrid(torch.linspace(0, 1, 8, dtype=torch.float64, device=device), 3, 3)
    stages = [("euler", None)] + [(m, st) for m in ("midpoint", "rk4") for st in METHODS[m]]
    for state in (torch.float32, torch.float64):
        for field in FIELD_DTYPES:
            for (method, stage), mode in zip(stages * 2, ["none"] * len(stages) + ["mix"] * len(stages)):
                shape = (3, case_rng.randint(1, 30), 2)
                x = torch.randn(shape, generator=gen, dtype=state).to(device)
                v = make_velocity(case_rng.choice(("contiguous", "transposed", "batch1")), shape,
                                  field, device, gen)
                vu = None if mode == "none" else make_velocity("contiguous", shape, field, device, gen)
                guidance = Guidance(mode, 2.5)
                i = case_rng.randrange(7)
                what = f"{state} {field} {method} {mode} i={i}"
                if stage is None:
                    got = backend.euler_step(x, v, grid, i, None, None, vu, guidance)
                    want = reference.euler_step(x, v, grid, i, None, None, vu, guidance)
                else:
                    got, _ = backend.stage_step(x, v, grid, i, stage, None, None, None, vu, guidance)
                    want, _ = reference.stage_step(x, v, grid, i, stage, None, None, None, vu, guidance)
                assert want.dtype == torch.float64, what
                assert_bitwise(got, want, what)


def test_grids_follow_the_default_dtype_as_documented(default_dtype):
    """The plain grid is the original's ``linspace`` (the default dtype); a shifted or explicit
    grid is float32, float64 under a float64 default (never a 16-bit grid)."""
    fm = FlowMatching(x_dims=2, num_inference_steps=7, backend="torch")
    field = lambda *, x, t: torch.ones_like(x)  # noqa: E731
    _, plain = fm.sample(2, field, return_all_steps=True)
    assert plain.dtype == default_dtype and torch.equal(plain, torch.linspace(0.0, 1.0, 8))
    shaped = torch.float64 if default_dtype == torch.float64 else torch.float32
    _, shifted = fm.sample(2, field, return_all_steps=True, shift=3.0)
    s = 1.0 - torch.linspace(0.0, 1.0, 8, dtype=shaped).double()
    want = (1.0 - 3.0 * s / (1.0 + 2.0 * s)).to(shaped)
    want[0], want[-1] = 0.0, 1.0
    assert shifted.dtype == shaped and torch.equal(shifted, want)
    values = [0.0, 0.1, 0.35, 0.7, 1.0]
    _, explicit = fm.sample(2, field, return_all_steps=True, timesteps=values)
    assert explicit.dtype == shaped and torch.equal(explicit, torch.tensor(values, dtype=shaped))
    states, _ = fm.sample(2, field, return_all_steps=True, timesteps=values, noise=torch.zeros(2, 2, dtype=torch.float32))
    dts = torch.tensor(values, dtype=shaped).diff()  # a float64 grid makes the state float64
    assert torch.equal(states[:, -1], torch.zeros(2, 2, dtype=torch.float32).to(torch.promote_types(shaped, torch.float32))
                       + dts[0] + dts[1] + dts[2] + dts[3])


def test_explicit_grids_stay_float32_under_the_float32_default():
    fm = FlowMatching(x_dims=2, num_inference_steps=7)
    field = lambda *, x, t: torch.ones_like(x)  # noqa: E731
    for opts in (dict(shift=3.0), dict(timesteps=[0.0, 0.1, 1.0]),
                 dict(timesteps=torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64))):
        assert fm.sample(2, field, return_all_steps=True, **opts)[1].dtype == torch.float32


@pytest.mark.parametrize("shift", [None, 3.0])
def test_a_graph_under_a_float64_default_holds_the_float64_grid(shift, captures_on_cpu):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fm = FlowMatching(x_dims=(2, 3), cuda_graph=True, num_inference_steps=7, backend="auto")
        field = lambda *, x, t: torch.sin(x) * t  # noqa: E731
        torch.manual_seed(3)
        want = fm.sample(3, field, device="cpu", shift=shift, return_all_steps=True, cuda_graph=False)
        got = []
        for _ in range(3):  # eager, capture, replay
            torch.manual_seed(3)
            got.append(fm.sample(3, field, device="cuda:0", shift=shift, return_all_steps=True))
        (graph,) = captures_on_cpu
        assert graph._static_inputs[0].dtype == torch.float64
        for result in got:
            assert_bitwise(result, want, f"shift={shift}")
    finally:
        torch.set_default_dtype(previous)
