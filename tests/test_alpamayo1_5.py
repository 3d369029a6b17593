"""Alpamayo 1.5's ``FlowMatching`` (``flowmatch_fast.alpamayo1_5``): API, bitwise parity with the
SPEC's algorithm (``tests/oracle.py``), PyTorch's rounding of ``(1 - w) * vu + w * vg``, the fused
guided update, errors.

Runs on whatever backend ``FLOWMATCH_FAST_BACKEND`` selects (CI: plain torch, then Triton through
the interpreter, then the CUDA kernels through their host emulation), on CPU and, when there is
one, on a CUDA device. In the kernel passes the parity cases also count the kernels' launches
(``fused_launches``): one per step, except where the contract mixes the fields in plain torch.
"""

import gc
import inspect
import itertools
import math
import types

import pytest
import torch

from flowmatch_fast import alpamayo1_5, alpamayo_r1, backends
from flowmatch_fast import FlowMatching as R1FlowMatching
from flowmatch_fast.alpamayo1_5 import BaseDiffusion, FlowMatching
from flowmatch_fast.graph_cache import GraphCache, field_key
from flowmatch_fast.integrators import METHODS, choose
from flowmatch_fast.kernels import reference
from flowmatch_fast.kernels.cuda import launch as cuda_euler
from flowmatch_fast.kernels.triton import launch as triton_euler
from flowmatch_fast.kernels.contract import Guidance, TimeGrid
from bitwise import assert_bitwise
from cuda_ext import emulated  # noqa: F401  (the host-emulation fixture)
from fields import FIELD_DTYPES, LAYOUTS, make_field, make_velocity, smooth
from oracle import spec_sample_1_5

DTYPE_PAIRS = [(f, f) for f in FIELD_DTYPES] + [
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
    (torch.float32, torch.float64), (torch.bfloat16, torch.float64)]
WEIGHTS = (1.0, 0.0, -0.7, 2.5, 1.0 / 3.0)


def _assert_same(ours, ref, msg):
    """Bitwise, NaN equal to NaN (inf/NaN fields propagate into both results)."""
    assert_bitwise(ours, ref, msg, nan_equal=True)


def _guided_both(fields, x_dims, batch, device, steps, weight, seed, return_all_steps=True,
                 temperature=1.0):
    """(ours, the SPEC's) guided sampling under the same seed; ``fields()`` makes a fresh
    (guided, unguided) pair per run (some test fields count their calls)."""
    results = []
    for run in ("ours", "spec"):
        vg, vu = fields()
        torch.manual_seed(seed)
        if run == "ours":
            fm = FlowMatching("euler", steps, weight, x_dims, True)
            results.append(fm.sample(batch, vg, vu, device, return_all_steps,
                                     temperature=temperature))
        else:
            results.append(spec_sample_1_5(x_dims, batch, vg, vu, device, steps, return_all_steps,
                                           guidance=True, weight=weight, temperature=temperature))
    return results


class _StepDtypes:
    """A ``fields()`` factory for :func:`_guided_both` whose first pair (our run) records the
    dtype and dims of what each field returns per step; :attr:`fused` counts the steps the
    contract gives the fused kernels: two dimensioned fields of one dtype (the fused mix and
    update), or fields of two dtypes of which one is dimensioned (PyTorch mixes them, as the
    original's expression, and the update of that velocity is fused); two 0-dim fields take the
    reference (their promotion)."""

    def __init__(self, fields):
        self._fields, self.steps = fields, None

    def __call__(self):
        vg, vu = self._fields()
        if self.steps is not None:
            return vg, vu
        self.steps = []

        def guided(*, x, t):
            v = vg(x=x, t=t)
            self.steps.append([(v.dtype, v.dim())])
            return v

        def unguided(*, x, t):
            v = vu(x=x, t=t)
            self.steps[-1].append((v.dtype, v.dim()))
            return v

        return guided, unguided

    @property
    def fused(self) -> int:
        return sum(g[1] > 0 or u[1] > 0 for g, u in self.steps)


def _unguided(field):
    """Another field from the same factory: evaluated at a moved state."""
    return lambda *, x, t: field(x=0.25 - 0.8 * x, t=t)


# ---------------------------------------------------------------------------------------- API
def test_constructor_positional_order_and_attributes():
    fm = FlowMatching("heun", 7, 2.5, [16, 2], True)
    assert (fm.int_method, fm.num_inference_steps, fm.inference_guidance_weight) == ("heun", 7, 2.5)
    assert fm.x_dims == [16, 2] and fm.use_classifier_free_guidance is True
    fm = FlowMatching(x_dims=128)
    assert fm.x_dims == [128] and fm.use_classifier_free_guidance is False
    assert (fm.int_method, fm.num_inference_steps, fm.inference_guidance_weight) == ("euler", 10, 1.0)
    assert isinstance(fm, BaseDiffusion) and isinstance(fm, torch.nn.Module)
    assert not hasattr(fm, "construct_training_data") and not hasattr(fm, "compute_loss_from_pred")
    assert fm.state_dict() == {} and list(fm.parameters()) == [] and list(fm.buffers()) == []


def test_sample_signature_keeps_the_original_positional_order():
    params = list(inspect.signature(FlowMatching.sample).parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["self", "batch_size", "step_fn", "unguided_step_fn", "device",
                          "return_all_steps", "inference_step", "int_method",
                          "use_classifier_free_guidance", "inference_guidance_weight",
                          "temperature"]
    defaults = {p.name: p.default for p in params}
    assert defaults["unguided_step_fn"] is None and defaults["temperature"] == 1.0
    assert defaults["device"] == torch.device("cpu")


def test_module_names_mirror_the_originals():
    assert alpamayo_r1.FlowMatching is R1FlowMatching
    assert alpamayo1_5.FlowMatching is not R1FlowMatching
    assert not issubclass(FlowMatching, R1FlowMatching)


def test_to_bfloat16_changes_nothing(case_rng):
    seed = case_rng.randrange(2**31)
    field = make_field("contiguous", torch.bfloat16, [8, 2], seed)
    results = []
    for cast in (False, True):
        fm = FlowMatching(x_dims=(8, 2), use_classifier_free_guidance=True,
                          inference_guidance_weight=1.5)
        if cast:
            fm = fm.to(dtype=torch.bfloat16)
        torch.manual_seed(seed)
        results.append(fm.sample(3, field, _unguided(field), return_all_steps=True))
    _assert_same(results[1], results[0], f"seed={seed}")


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("return_all_steps", [False, True], ids=["final", "all_steps"])
def test_guided_parity_every_dtype_pair(device, dtypes, return_all_steps, case_rng,
                                        fused_launches):
    x_dims = [case_rng.randint(1, 9) for _ in range(case_rng.randint(1, 3))]
    batch, steps = case_rng.randint(1, 24), case_rng.randint(1, 8)
    layout = case_rng.choice(LAYOUTS)
    weight = case_rng.choice(WEIGHTS + (case_rng.uniform(-3, 4),))
    temperature = case_rng.choice((1.0, 0.5, 1.3))
    seed = case_rng.randrange(2**31)
    msg = (f"x_dims={x_dims} batch={batch} steps={steps} layout={layout} w={weight} "
           f"temperature={temperature} seed={seed}")
    fields = _StepDtypes(lambda: (make_field(layout, dtypes[0], x_dims, seed),
                                  _unguided(make_field(layout, dtypes[1], x_dims, seed + 1))))
    _assert_same(*_guided_both(fields, x_dims, batch, device, steps, weight, seed,
                               return_all_steps, temperature), msg)
    assert len(fields.steps) == steps and fields.fused == steps, msg
    fused_launches.expect(fields.fused, msg)


@pytest.mark.parametrize("dtype", FIELD_DTYPES, ids=str)
def test_unguided_parity_and_temperature(device, dtype, case_rng, fused_launches):
    """Guidance off: ``unguided_step_fn`` is never called; ``temperature`` scales the noise."""
    seed = case_rng.randrange(2**31)
    temperature = case_rng.choice((1.0, 0.7, 2.0))
    calls = [0]

    def unguided(*, x, t):
        calls[0] += 1
        return x

    torch.manual_seed(seed)
    fm = FlowMatching(x_dims=(5, 3), num_inference_steps=6)
    ours = fm.sample(4, make_field("contiguous", dtype, [5, 3], seed), unguided, device,
                     return_all_steps=True, temperature=temperature)
    torch.manual_seed(seed)
    ref = spec_sample_1_5((5, 3), 4, make_field("contiguous", dtype, [5, 3], seed), None, device, 6,
                          True, temperature=temperature)
    _assert_same(ours, ref, f"seed={seed} temperature={temperature}")
    assert calls[0] == 0
    fused_launches.expect(6, f"seed={seed}")


def test_temperature_one_leaves_the_noise_unchanged(device):
    fm = FlowMatching(x_dims=(4, 2), num_inference_steps=2)
    torch.manual_seed(5)
    states, _ = fm.sample(3, lambda *, x, t: x, device=device, return_all_steps=True)
    torch.manual_seed(5)
    assert torch.equal(states[:, 0], torch.randn(3, 4, 2, device=device))


def test_guided_field_is_called_first_so_random_fields_match(device, case_rng, fused_launches):
    """Fields that draw from the global generator give the original's numbers only when called
    in its order: guided, then unguided, every step."""
    seed = case_rng.randrange(2**31)
    order = []

    def noisy(tag, scale):
        def field(*, x, t):
            order.append(tag)
            return (smooth(x, t) * scale + 0.1 * torch.randn_like(x)).to(torch.bfloat16)
        return field

    fields = lambda: (noisy("g", 1.0), noisy("u", -0.5))  # noqa: E731
    _assert_same(*_guided_both(fields, (64, 2), 6, device, 5, 2.0, seed), f"seed={seed}")
    assert order[:4] == ["g", "u", "g", "u"]
    fused_launches.expect(5, f"seed={seed}")


# inf * 0 = NaN on purpose: the Triton interpreter's NumPy arithmetic warns about it.
NAN_ON_PURPOSE = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@NAN_ON_PURPOSE
@pytest.mark.parametrize("weight", [1.0, 0.0, -0.5])
def test_nan_and_inf_fields_propagate_without_shortcuts(device, weight, fused_launches):
    """w = 1 is not vg itself: an inf in vu gives 0 * inf = NaN, as in the original."""
    def vg(*, x, t):
        v = smooth(x, t).to(torch.bfloat16)
        v[0, 0, 0] = float("inf")
        v[1, 1, 1] = float("nan")
        return v

    def vu(*, x, t):
        v = (0.5 * x).to(torch.bfloat16)
        v[0, 1, 0] = float("inf")
        v[1, 0, 1] = -float("inf")
        return v

    results = _guided_both(lambda: (vg, vu), (3, 2), 2, device, 3, weight, 11)
    _assert_same(*results, f"w={weight}")
    assert results[0][0].isnan().any()
    fused_launches.expect(3, f"w={weight}")


def test_noise_generator_methods_grids_agree_with_the_torch_backend(device, case_rng,
                                                                    fused_launches):
    """Our extras on the 1.5 class: the selected backend equals the reference backend bitwise."""
    seed = case_rng.randrange(2**31)
    field = make_field("contiguous", torch.bfloat16, [16, 2], seed)
    opts = [dict(int_method="rk4"), dict(int_method="midpoint", timesteps=[0.0, 0.2, 0.7, 1.0]),
            dict(shift=3.0, return_all_steps=True)]
    for opt in opts:
        results = []
        for backend in ("torch", None):
            fm = FlowMatching("euler", 4, 1.7, (16, 2), True, backend=backend)
            gen = torch.Generator(device).manual_seed(seed)
            results.append(fm.sample(5, field, _unguided(field), device, generator=gen,
                                     temperature=0.8, **opt))
        _assert_same(*results, f"{opt} seed={seed}")
        steps = len(opt["timesteps"]) - 1 if "timesteps" in opt else 4
        fused_launches.expect(steps * len(METHODS[opt.get("int_method", "euler")]), str(opt))
    fm = FlowMatching("euler", 4, 1.7, (16, 2), True)
    torch.manual_seed(seed)
    drawn = fm.sample(5, field, _unguided(field), device, temperature=0.8)
    torch.manual_seed(seed)
    given = fm.sample(5, field, _unguided(field), device, temperature=0.8,
                      noise=torch.randn(5, 16, 2, device=device))
    _assert_same(given, drawn, "noise= is the draw temperature multiplies")
    fused_launches.expect(2 * 4, "noise= and drawn noise")


def test_zero_dim_fields_keep_pytorchs_promotion(device, fused_launches):
    for dtypes in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)):
        vg = lambda *, x, t: torch.tensor(0.75, dtype=dtypes[0], device=x.device)  # noqa: E731
        vu = lambda *, x, t: torch.tensor(-1.5, dtype=dtypes[1], device=x.device)  # noqa: E731
        _assert_same(*_guided_both(lambda: (vg, vu), (4, 2), 5, device, 3, 2.5, 3), str(dtypes))
        fused_launches.expect(0, f"{dtypes}: 0-dim fields take the reference (their promotion)")


def test_graph_cache_evicts_when_either_field_is_collected():
    """The cache watches both fields of a guided graph (CPU bookkeeping; capture is GPU-only)."""
    cache = GraphCache(max_graphs=4)

    def guided(*, x, t):
        return x

    def unguided(*, x, t):
        return x

    keys, watches = zip(field_key(guided), field_key(unguided))
    for _ in range(2):  # a signature is captured on its second call
        cache.call((*keys, "plan"), watches, lambda: (lambda: None), lambda: None)
    assert len(cache) == 1
    del unguided, watches
    gc.collect()
    assert len(cache) == 0 and cache.stats.evictions == 1


# ----------------------------------------------------------------------- PyTorch's rounding
def _mix_model(vg, vu, w):
    """How PyTorch evaluates ``(1 - w) * vu + w * vg`` for one field dtype ``F`` (established by
    experiment; the fused kernels implement this): each Python-float scalar cast to the op's math
    type (float32 for bf16/fp16/fp32, float64 for fp64), each product and the sum in that type,
    rounded to ``F``."""
    f = vg.dtype
    p = torch.promote_types(torch.float32, f)
    c0 = torch.tensor(1 - w, dtype=torch.float64).to(p)
    c1 = torch.tensor(w, dtype=torch.float64).to(p)
    a = (vu.to(p) * c0.to(vu.device)).to(f)
    b = (vg.to(p) * c1.to(vg.device)).to(f)
    return (a.to(p) + b.to(p)).to(f)


@pytest.mark.parametrize("dtype", FIELD_DTYPES, ids=str)
def test_pytorch_rounds_the_mix_with_math_type_scalars(device, dtype):
    gen = torch.Generator().manual_seed(0)
    vg = (torch.randn(4098, generator=gen, dtype=torch.float64) * 3).to(device, dtype)
    vu = (torch.randn(4098, generator=gen, dtype=torch.float64) * 3).to(device, dtype)
    for w in WEIGHTS + (0.3, 7.123456789):
        ours = (1 - w) * vu + w * vg
        assert ours.dtype == dtype
        _assert_same(_mix_model(vg, vu, w), ours, f"{dtype} w={w}")
        _assert_same(reference.mixed_velocity(vg, vu, w), ours, f"{dtype} w={w}")
        _assert_same(reference.mixed_velocity(vg[::2], vu[1::2], w), (1 - w) * vu[1::2] + w * vg[::2],
                     f"{dtype} w={w} strided")


def test_the_rounding_model_can_fail():
    """Rounding the scalar to bf16 first (a plausible wrong model) differs from PyTorch."""
    gen = torch.Generator().manual_seed(0)
    vg, vu = (torch.randn(2, 4097, generator=gen) * 3).to(torch.bfloat16)
    w = 0.3
    scalar_bf16 = torch.tensor(1 - w).to(torch.bfloat16).float()
    wrong = ((vu.float() * scalar_bf16).to(torch.bfloat16).float()
             + (vg.float() * torch.tensor(w).to(torch.bfloat16).float()).to(torch.bfloat16).float())
    assert not torch.equal(wrong.to(torch.bfloat16), (1 - w) * vu + w * vg)


def test_mixed_dtypes_round_each_product_in_its_own_dtype():
    gen = torch.Generator().manual_seed(1)
    vg = (torch.randn(4097, generator=gen) * 3).to(torch.bfloat16)
    vu = (torch.randn(4097, generator=gen) * 3).to(torch.float16)
    w = 0.3
    out = (1 - w) * vu + w * vg
    assert out.dtype == torch.float32
    expect = ((1 - w) * vu).float() + (w * vg).float()
    assert torch.equal(out, expect)
    assert torch.equal(reference.mixed_velocity(vg, vu, w), expect)


# --------------------------------------------------------------------- the fused guided update
@NAN_ON_PURPOSE
def test_fused_mix_matches_the_expression(target, case_rng):
    """Every backend that fuses the mix: one launch equals ``x + dt * ((1 - w) * vu + w * vg)``
    (as PyTorch evaluates it), every state x field dtype, layouts, inf/NaN, the trajectory slot."""
    backend, device = target
    gen = torch.Generator().manual_seed(case_rng.randrange(2**31))
    grid = TimeGrid(torch.linspace(0, 1, 6, device=device), 1, 3)
    for state, field, layout, w in itertools.product(
            (torch.float32, torch.float64), FIELD_DTYPES,
            ("contiguous", "transposed", "strided", "expanded"), WEIGHTS):
        shape = (case_rng.randint(1, 7), case_rng.randint(1, 40), 2)
        x = torch.randn(shape, generator=gen, dtype=state).to(device)
        vg = make_velocity(layout, shape, field, device, gen)
        vu = make_velocity(layout, shape, field, device, gen)
        if layout != "expanded":
            vg[0, 0, 0], vu[-1, -1, 1], vu[0, -1, 0] = float("inf"), float("nan"), -float("inf")
        i = case_rng.randrange(5)
        expect = x + grid.dt_views[i] * ((1 - w) * vu + w * vg)
        traj = torch.full((shape[0], 6, *shape[1:]), 7.0, dtype=expect.dtype, device=device)
        assert backend.supports(x, vg, None, vu, True, None, traj[:, i + 1])
        out = backend.euler_step(x, vg, grid, i, None, traj[:, i + 1], vu, Guidance("mix", w))
        what = f"{state} {field} {layout} w={w} shape={shape} i={i}"
        _assert_same(out, expect, what)
        _assert_same(traj[:, i + 1], expect, what + " traj")
        assert (traj[:, i] == 7.0).all(), what


def test_one_place_decides_fused_or_reference():
    x = torch.zeros(2, 3)
    bf, f32 = torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3)
    for backend in (triton_euler, cuda_euler):
        assert choose(backend, x, bf, None, bf, mix=True)[0] is backend
        assert choose(backend, x, bf, None, f32, mix=True)[0] is reference  # mixed dtypes
        assert choose(backend, x, bf, None, bf, mix=False)[0] is backend
    # a backend whose supports() refuses the mix
    unfused = types.SimpleNamespace(supports=lambda x, v, acc, vu, mix, out, traj: not mix)
    assert choose(unfused, x, bf, None, bf, mix=True)[0] is reference
    assert choose(unfused, x, bf, None, bf, mix=False)[0] is unfused


def test_triton_runs_one_fused_launch_per_guided_step(monkeypatch, case_rng):
    """Under the Triton pass, the 1.5 guided update is the fused kernel (no reference mix)."""
    backend = backends.resolve(backends.check_backend_name(None), torch.device("cpu"))
    if backend is not triton_euler:
        pytest.skip("this pass does not select the Triton backend (CI's Triton pass does)")
    euler_kernel, stage_kernel, sde_kernel = triton_euler._kernels()
    launches = []

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append(meta["MIX"])
                return euler_kernel[grid](*args, **meta)
            return launch

    def no_reference(*args):
        raise AssertionError("the reference mix ran instead of the fused kernel")

    monkeypatch.setattr(triton_euler, "_kernels", lambda: (Counting(), stage_kernel, sde_kernel))
    monkeypatch.setattr(reference, "mixed_velocity", no_reference)
    steps = case_rng.randint(2, 6)
    field = make_field("contiguous", torch.bfloat16, [64, 2], 0)
    fm = FlowMatching("euler", steps, 2.5, (64, 2), True)
    torch.manual_seed(0)
    fm.sample(6, field, _unguided(field), return_all_steps=True)
    assert launches == [True] * steps


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_cuda_runs_one_fused_launch_per_guided_stage(emulated, monkeypatch, method, case_rng):
    """The CUDA kernels (their host emulation, FLOWMATCH_FAST_CUDA_EMULATE=1): the 1.5 guided
    update is one launch per stage of every step, no plain-torch mix, and gives the bits of the
    SPEC's loop (Euler) or of the torch backend (rk4)."""
    def no_reference(*args):
        raise AssertionError("the reference mix ran instead of the fused kernel")

    steps, seed = case_rng.randint(2, 6), case_rng.randrange(2**31)
    field = make_field("contiguous", torch.bfloat16, [64, 2], seed)
    fm = FlowMatching(method, steps, 2.5, (64, 2), True, backend="cuda")
    kernel = "euler" if method == "euler" else "stage"
    with monkeypatch.context() as patched:
        patched.setattr(reference, "mixed_velocity", no_reference)
        before = emulated.host_launches()[kernel]
        torch.manual_seed(seed)
        ours = fm.sample(6, field, _unguided(field), return_all_steps=True)
        assert emulated.host_launches()[kernel] - before == steps * len(METHODS[method])
    torch.manual_seed(seed)
    if method == "euler":
        want = spec_sample_1_5((64, 2), 6, field, _unguided(field), "cpu", steps, True,
                               guidance=True, weight=2.5)
    else:
        want = FlowMatching(method, steps, 2.5, (64, 2), True, backend="torch").sample(
            6, field, _unguided(field), return_all_steps=True)
    _assert_same(ours, want, f"{method} steps={steps} seed={seed}")


@pytest.mark.parametrize("dtype", FIELD_DTYPES, ids=str)
def test_a_one_ulp_error_in_the_cuda_mix_fails_the_parity_checks(emulated, monkeypatch, dtype):
    """The mutation check of the CUDA mix: the emulated kernels' mixed velocity one ulp (of the
    field dtype) off, or their results one ulp up, must fail the 1.5 parity comparison."""
    monkeypatch.setenv("FLOWMATCH_FAST_BACKEND", "cuda")
    fields = lambda: (make_field("contiguous", dtype, [16, 2], 3),  # noqa: E731
                      _unguided(make_field("contiguous", dtype, [16, 2], 4)))
    _assert_same(*_guided_both(fields, [16, 2], 5, "cpu", 4, 2.5, 7), "exact")
    for hook in (emulated.set_host_mix_skew, emulated.set_host_result_skew):
        hook(1)
        with pytest.raises(pytest.fail.Exception, match="not bitwise equal"):
            _assert_same(*_guided_both(fields, [16, 2], 5, "cpu", 4, 2.5, 7), "one ulp up")
        hook(0)


# ------------------------------------------------------------------------------------- errors
def test_guidance_without_unguided_field_raises():
    fm = FlowMatching(x_dims=(4, 2), use_classifier_free_guidance=True)
    with pytest.raises(ValueError, match="unguided_step_fn"):
        fm.sample(2, lambda *, x, t: x)
    with pytest.raises(ValueError, match="unguided_step_fn"):
        FlowMatching(x_dims=(4, 2)).sample(2, lambda *, x, t: x, use_classifier_free_guidance=True)


@pytest.mark.parametrize("bad, match", [
    (lambda x: torch.cat([x, x]), r"unguided_step_fn returned a tensor of shape \(4, 4, 2\).*"
                                  r"state's shape \(2, 4, 2\)"),
    (lambda x: x[:, :3], r"unguided_step_fn returned a tensor of shape \(2, 3, 2\)"),
    (lambda x: x.to("meta"), "unguided_step_fn returned a tensor on meta.*cpu"),
    (lambda x: x.tolist(), "unguided_step_fn must return a torch.Tensor or a real number"),
])
def test_unguided_field_errors(bad, match):
    fm = FlowMatching("euler", 3, 2.0, (4, 2), True)
    with pytest.raises((ValueError, TypeError), match=match):
        fm.sample(2, lambda *, x, t: x * t, lambda *, x, t: bad(x))


def test_bad_arguments_raise_as_on_the_r1_class():
    with pytest.raises(ValueError, match="x_dims"):
        FlowMatching(x_dims=[])
    fm = FlowMatching(x_dims=(4, 2))
    with pytest.raises(ValueError, match="inference_step"):
        fm.sample(2, lambda *, x, t: x, inference_step=-1)
    with pytest.raises(TypeError, match="temperature"):
        fm.sample(2, lambda *, x, t: x, temperature="hot")
    with pytest.raises(ValueError, match="shape"):
        fm.sample(2, lambda *, x, t: x[:, :3])
    with pytest.raises(TypeError, match="inference_guidance_weight"):
        fm.sample(2, lambda *, x, t: x, lambda *, x, t: x, use_classifier_free_guidance=True,
                  inference_guidance_weight="2")
    with pytest.raises(RuntimeError, match="CUDA device"):
        fm.capture(2, lambda *, x, t: x, device="cpu")


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_cuda_graph_both_fields_in_one_graph_and_in_the_key():
    dev = torch.device("cuda")
    w1 = torch.randn(2, 2, device=dev)
    vg = lambda *, x, t: (x @ w1 + t).to(torch.bfloat16)  # noqa: E731
    vu = lambda *, x, t: (0.5 * x - t).to(torch.bfloat16)  # noqa: E731
    vu2 = lambda *, x, t: (0.25 * x).to(torch.bfloat16)  # noqa: E731
    fm = FlowMatching("euler", 10, 2.5, (64, 2), True, cuda_graph=True)
    eager = FlowMatching("euler", 10, 2.5, (64, 2), True)
    for unguided in (vu, vu, vu, vu2, vu2):  # a signature's second call captures
        torch.manual_seed(3)
        got = fm.sample(6, vg, unguided, dev, temperature=0.9)
        torch.manual_seed(3)
        _assert_same(got, spec_sample_1_5((64, 2), 6, vg, unguided, dev, 10, guidance=True,
                                          weight=2.5, temperature=0.9), "cached graph")
        torch.manual_seed(3)
        _assert_same(got, eager.sample(6, vg, unguided, dev, temperature=0.9), "eager")
    stats = fm.graph_stats
    assert (stats.first_calls, stats.captures, stats.replays) == (2, 2, 1)
    del vu2, unguided  # the loop variable holds the last field too
    gc.collect()
    assert fm.graph_stats.evictions == 1
    sampler = fm.capture(6, vg, vu, dev, True, temperature=0.9)
    torch.manual_seed(4)
    replay = sampler()
    torch.manual_seed(4)
    _assert_same(replay, spec_sample_1_5((64, 2), 6, vg, vu, dev, 10, True, guidance=True,
                                         weight=2.5, temperature=0.9), "capture")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FIELD_DTYPES, ids=str)
def test_cuda_mix_rounding_matches_the_model(dtype):
    """On CUDA the scalar is cast to opmath_t as on CPU: the same model (which the fused Triton
    and CUDA kernels implement; test_fused_mix_matches_the_expression runs them there)."""
    gen = torch.Generator().manual_seed(2)
    vg = (torch.randn(1 << 16, generator=gen, dtype=torch.float64) * 3).to("cuda", dtype)
    vu = (torch.randn(1 << 16, generator=gen, dtype=torch.float64) * 3).to("cuda", dtype)
    for w in WEIGHTS + (0.3, -math.pi):
        _assert_same(_mix_model(vg, vu, w), (1 - w) * vu + w * vg, f"{dtype} w={w}")
