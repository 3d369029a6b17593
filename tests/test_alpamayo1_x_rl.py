"""The RL recipes' ``FlowMatching`` (``flowmatch_fast.alpamayo1_x_rl``): API, bitwise parity of
``euler``, ``midpoint`` and ``sde`` with the SPEC's algorithm (``tests/oracle.py``), replay of a
stored rollout, the fused SDE step (one launch per step in the kernel passes), errors.

Runs on whatever backend ``FLOWMATCH_FAST_BACKEND`` selects (CI: plain torch, the Triton
interpreter, the CUDA kernels' host emulation), on CPU and, when there is one, on a GPU. The
training helpers and ``_batched_sde_logprob``: tests/test_rl_training.py.
"""

import inspect

import pytest
import torch

from flowmatch_fast import alpamayo1_x_rl
from flowmatch_fast.alpamayo1_x_rl import FlowMatching
from flowmatch_fast.base import BaseDiffusion as R1Base
from bitwise import assert_bitwise
from cuda_ext import emulated  # noqa: F401  (the host-emulation fixture)
from fields import make_field
from oracle import spec_sample_rl

METHODS = ("euler", "midpoint", "sde")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 0.0 is not a weight of 0: the recipes take `inference_guidance_weight or the attribute`
WEIGHTS = (None, 0.0, 1.0, 2.5, -0.5)


def _unguided(field):
    return lambda *, x, t: field(x=0.25 - 0.8 * x, t=t)


def _generator(kind, batch, seed, device):
    if kind is None:
        return None
    if kind == "one":
        return torch.Generator(device).manual_seed(seed)
    return [torch.Generator(device).manual_seed(seed + 7 * i) for i in range(batch)]


def _returned(out):
    """(x, log_prob or None, all_steps, grid) of what ``sample`` returned."""
    if isinstance(out, dict):
        return out["x"], out["log_prob"], out["all_steps"], out["timesteps"]
    return out[0][:, -1], None, out[0], out[1]


def _assert_same(ours, ref, msg):
    for name, a, b in zip(("x", "log_prob", "all_steps", "grid"), ours, ref):
        if b is None:
            assert a is None, f"{msg}: {name}"
        else:
            assert_bitwise(a, b, f"{msg}: {name}", nan_equal=True)


def _run_both(method, x_dims, batch, steps, dtype, layout, device, seed, *, guidance=False,
              weight=None, attr_weight=1.5, temperature=1.0, gen=None, noise_level=0.7,
              timesteps=None):
    """(ours, the SPEC's) one call under the same seed and the same (fresh) generators."""
    fm = FlowMatching(method, "beta", steps, 0.1, attr_weight, guidance, x_dims=x_dims)
    w = weight or attr_weight
    results = []
    for who in ("ours", "spec"):
        field = make_field(layout, dtype, x_dims, seed)
        unguided = _unguided(make_field(layout, dtype, x_dims, seed + 1))
        torch.manual_seed(seed)
        generator = _generator(gen, batch, seed, device)
        if who == "ours":
            kw = dict(noise_level=noise_level, timesteps=timesteps, return_info=True)
            out = fm.sample(batch, field, unguided, device, method != "sde", generator=generator,
                            inference_guidance_weight=weight, temperature=temperature,
                            **(kw if method == "sde" else {}))
            results.append(_returned(out))
        else:
            results.append(spec_sample_rl(x_dims, batch, field, unguided, device, steps, method,
                                          guidance, w, temperature, generator, noise_level,
                                          timesteps))
    return results


def test_constructor_positional_order_attributes_and_base():
    fm = FlowMatching("sde", "uniform", 7, 0.2, 2.5, True, x_dims=(16, 2))
    assert (fm.int_method, fm.train_timestep_sampler, fm.num_inference_steps) == ("sde", "uniform", 7)
    assert (fm.train_ignore_guidance_rate, fm.inference_guidance_weight) == (0.2, 2.5)
    assert fm.use_classifier_free_guidance is True and fm.x_dims == [16, 2]
    assert isinstance(fm, R1Base) and alpamayo1_x_rl.BaseDiffusion is R1Base
    assert fm.state_dict() == {} and list(fm.buffers()) == []
    fm = FlowMatching(x_dims=8)
    assert (fm.int_method, fm.use_classifier_free_guidance, fm.x_dims) == ("euler", False, [8])


def test_sample_signature_keeps_the_recipes_positional_order():
    params = inspect.signature(FlowMatching.sample).parameters.values()
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == [
        "self", "batch_size", "step_fn", "unguided_step_fn", "device", "return_all_steps",
        "inference_step", "timesteps", "int_method", "inference_guidance_weight",
        "use_classifier_free_guidance", "temperature"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("guidance", [False, True], ids=["plain", "guided"])
def test_parity_with_the_recipes_algorithm(device, method, dtype, guidance, case_rng,
                                           fused_launches):
    x_dims = [case_rng.randint(1, 9) for _ in range(case_rng.randint(1, 3))]
    batch, steps = case_rng.randint(1, 12), case_rng.randint(1, 7)
    layout = case_rng.choice(("contiguous", "permuted", "strided", "expanded", "batch1", "mixed"))
    opts = dict(weight=case_rng.choice(WEIGHTS) if guidance else None,
                temperature=case_rng.choice((1.0, 0.6)),
                gen=case_rng.choice((None, "one", "rows")),
                noise_level=case_rng.choice((0.7, 0.3, 1.4)))
    if method == "sde" and case_rng.random() < 0.4:
        inner = sorted(case_rng.uniform(0.01, 0.99) for _ in range(steps - 1))
        opts["timesteps"] = [0.0, *inner, 1.0]
    seed = case_rng.randrange(2**31)
    msg = f"x_dims={x_dims} batch={batch} steps={steps} layout={layout} {opts} seed={seed}"
    ours, ref = _run_both(method, x_dims, batch, steps, dtype, layout, device, seed,
                          guidance=guidance, **opts)
    _assert_same(ours, ref, msg)
    # one fused launch per step: the SDE step; Euler's update; midpoint's second update (its
    # first, x + (v * dt) / 2, is the reference's: the kernels round dt / 2 first)
    fused_launches.expect(steps, msg)


def test_replay_of_a_stored_rollout_gives_its_log_prob(device, case_rng, fused_launches):
    seed = case_rng.randrange(2**31)
    field = make_field("contiguous", torch.bfloat16, [16, 2], seed)
    fm = FlowMatching("sde", num_inference_steps=6, x_dims=(16, 2))
    torch.manual_seed(seed)
    rollout = fm.sample(5, field, device=device, return_info=True, noise_level=0.9)
    fused_launches.expect(6, f"seed={seed}")
    stored = list(rollout["all_steps"].unbind(1))  # strided views, as users store them
    before = [s.clone() for s in stored]
    state = torch.random.get_rng_state()
    again = fm.sample(5, field, device=device, samples_list=stored, return_info=True,
                      noise_level=0.9)
    assert torch.equal(torch.random.get_rng_state(), state), "a replay draws nothing"
    assert again["x"] is stored[-1], "the recipes return the last stored sample itself"
    for k in ("log_prob", "all_steps", "timesteps"):
        assert_bitwise(again[k], rollout[k], f"seed={seed}: {k}")
    assert all(torch.equal(a, b) for a, b in zip(stored, before)), "stored samples unchanged"
    torch.manual_seed(seed)
    ref = spec_sample_rl((16, 2), 5, field, None, device, 6, "sde", noise_level=0.9,
                         samples_list=stored)
    assert_bitwise(again["log_prob"], ref[1], f"seed={seed}: oracle")
    fused_launches.expect(6, f"seed={seed}")


def test_return_forms():
    fm = FlowMatching("sde", num_inference_steps=3, x_dims=(4, 2))
    field = lambda *, x, t: -x  # noqa: E731
    torch.manual_seed(1)
    x = fm.sample(2, field)
    torch.manual_seed(1)
    states, grid = fm.sample(2, field, return_all_steps=True)
    torch.manual_seed(1)
    info = fm.sample(2, field, return_info=True, return_all_steps=True)
    assert set(info) == {"x", "log_prob", "all_steps", "timesteps"}
    assert torch.equal(x, info["x"]) and torch.equal(states, info["all_steps"])
    assert torch.equal(grid, info["timesteps"]) and grid.dtype == torch.float32
    assert states.shape == (2, 4, 4, 2) and info["log_prob"].shape == (2,)


def test_generator_rows_depend_on_their_own_generator_alone(device):
    """One generator per row: any subset of rows, sampled alone, gives the same rows (how a
    rollout batch splits across ranks)."""
    field = make_field("contiguous", torch.bfloat16, [8, 2], 3)
    fm = FlowMatching("sde", num_inference_steps=4, x_dims=(8, 2))
    gens = lambda rows: [torch.Generator(device).manual_seed(100 + r) for r in rows]  # noqa: E731
    full = fm.sample(6, field, device=device, generator=gens(range(6)), return_info=True)
    part = fm.sample(2, field, device=device, generator=gens([4, 1]), return_info=True)
    for k in ("x", "log_prob", "all_steps"):
        assert torch.equal(part[k], full[k][[4, 1]]), k


def test_the_recipes_quirks():
    """``or`` fall-backs; the SDE's ``timesteps`` ignored by euler; sde re-checks the attribute."""
    field = lambda *, x, t: 0.5 - x  # noqa: E731
    fm = FlowMatching("euler", num_inference_steps=3, inference_guidance_weight=2.0, x_dims=3)
    torch.manual_seed(0)
    a = fm.sample(2, field, int_method="", inference_step=0, timesteps=[0.0, 0.3, 1.0])
    torch.manual_seed(0)
    b = spec_sample_rl(3, 2, field, steps=3)[0]
    assert torch.equal(a, b)
    guided = FlowMatching("sde", use_classifier_free_guidance=True, x_dims=3)
    with pytest.raises(ValueError, match="unguided_step_fn is required"):
        guided.sample(2, field, use_classifier_free_guidance=False)
    guided.int_method = "euler"  # the same call runs unguided on euler, as in the recipes
    guided.sample(2, field, use_classifier_free_guidance=False)


def test_errors_name_the_argument():
    fm = FlowMatching("sde", num_inference_steps=3, x_dims=(4, 2))
    field = lambda *, x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match="Invalid integration method"):
        fm.sample(2, field, int_method="rk45")
    with pytest.raises(ValueError, match="list of 3 generators; expected one per row of the batch, 2"):
        fm.sample(2, field, generator=[torch.Generator() for _ in range(3)])
    for bad in ([0.0, 0.5, 1.0], [0.0, 0.2, 0.4, 0.6, 1.0]):
        with pytest.raises(AssertionError, match="timesteps must have length"):
            fm.sample(2, field, timesteps=bad)  # the recipes' AssertionError
        with pytest.raises(ValueError, match="timesteps must have length"):
            fm.sample(2, field, timesteps=bad)  # and a ValueError, as bad input is
    good = [torch.zeros(2, 4, 2)] * 4
    with pytest.raises(AssertionError, match="samples_list must have length"):
        fm.sample(2, field, samples_list=good[:3])
    with pytest.raises(ValueError, match=r"samples_list\[2\] has shape \(2, 4\)"):
        fm.sample(2, field, samples_list=good[:2] + [torch.zeros(2, 4)] + good[:1])
    with pytest.raises(ValueError, match=r"samples_list\[1\] has dtype torch.int64"):
        fm.sample(2, field, samples_list=good[:1] + [torch.zeros(2, 4, 2, dtype=torch.long)] + good[:2])
    with pytest.raises(ValueError, match="unguided_step_fn is required"):
        fm.sample(2, field, use_classifier_free_guidance=True)
    with pytest.raises(NotImplementedError, match="CPS is not implemented"):
        fm.sample(2, field, sde_type="cps")
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match="noise_level must be > 0"):
            fm.sample(2, field, noise_level=bad)
    with pytest.raises(TypeError, match="noise_level must be a real number"):
        fm.sample(2, field, noise_level="0.7")


@pytest.mark.gpu
def test_errors_for_generators_and_samples_on_other_devices():
    fm = FlowMatching("sde", num_inference_steps=2, x_dims=(4, 2))
    field = lambda *, x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match="mixed devices"):
        fm.sample(2, field, device="cuda", generator=[torch.Generator(), torch.Generator("cuda")])
    with pytest.raises(ValueError, match=r"samples_list\[0\] is on cpu"):
        fm.sample(2, field, device="cuda", samples_list=[torch.zeros(2, 4, 2)] * 3)
    with pytest.raises(ValueError, match="Cannot generate|expected generators on the sampling"):
        fm.sample(2, field, device="cpu", generator=torch.Generator("cuda"))


@pytest.mark.gpu
def test_cpu_generators_with_a_cuda_device_draw_on_the_cpu():
    """diffusers' rule: the same numbers as on a CPU-only machine, moved to the GPU."""
    field = lambda *, x, t: (0.3 - x).to(torch.bfloat16)  # noqa: E731
    fm = FlowMatching("sde", num_inference_steps=3, x_dims=(8, 2))
    gens = lambda: [torch.Generator().manual_seed(5 + i) for i in range(4)]  # noqa: E731
    ours = fm.sample(4, field, device="cuda", generator=gens(), return_info=True)
    ref = spec_sample_rl((8, 2), 4, field, None, "cuda", 3, "sde", generator=gens())
    _assert_same(_returned(ours), ref, "cpu generators on cuda")


def test_a_one_ulp_error_in_the_cuda_sde_step_fails_the_parity_checks(emulated, monkeypatch):
    """The mutation check of the CUDA SDE kernel: its results one ulp up (the emulation's hook)
    must fail the comparison of the rollout and of its log-probabilities."""
    monkeypatch.setenv("FLOWMATCH_FAST_BACKEND", "cuda")
    args = ("sde", [16, 2], 5, 4, torch.bfloat16, "contiguous", torch.device("cpu"), 7)
    _assert_same(*_run_both(*args), "exact")
    emulated.set_host_result_skew(1)
    ours, ref = _run_both(*args)
    for k in (0, 1):  # x, log_prob
        with pytest.raises(pytest.fail.Exception, match="not bitwise equal"):
            assert_bitwise(ours[k], ref[k], "one ulp up")


# ------------------------------------------------------------------------ GPU: captured rollouts
def _rows_cuda(seeds):
    return [torch.Generator("cuda").manual_seed(s) for s in seeds]


@pytest.mark.gpu
@pytest.mark.parametrize("guidance", [False, True], ids=["plain", "guided"])
def test_a_captured_rollout_with_per_row_generators_replays_the_eager_call(guidance):
    """capture(...): initial noise, every step's draws (one generator per row), field calls,
    fused steps and log-prob means in one graph; after the same seeds a replay is bitwise the
    eager call, and the generators end where the eager call leaves them."""
    field = make_field("contiguous", torch.bfloat16, [64, 2], 1)
    unguided = _unguided(make_field("contiguous", torch.bfloat16, [64, 2], 2))
    fm = FlowMatching("sde", "beta", 10, 0.1, 2.5, guidance, x_dims=(64, 2))
    gens = _rows_cuda(range(96))
    sampler = fm.capture(96, field, unguided, "cuda", generator=gens, return_info=True)
    for base in (0, 500):
        for g, s in zip(gens, range(base, base + 96)):
            g.manual_seed(s)
        got = sampler()
        eager_gens = _rows_cuda(range(base, base + 96))
        want = fm.sample(96, field, unguided, "cuda", generator=eager_gens, return_info=True)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, eager_gens))


@pytest.mark.gpu
def test_the_graph_cache_replays_rollouts_with_fresh_generators_and_the_global_rng():
    field = make_field("contiguous", torch.bfloat16, [64, 2], 1)
    fm = FlowMatching("sde", num_inference_steps=10, x_dims=(64, 2), cuda_graph=True)
    eager = FlowMatching("sde", num_inference_steps=10, x_dims=(64, 2))
    for base in range(4):
        seeds = range(100 * base, 100 * base + 12)
        got = fm.sample(12, field, device="cuda", generator=_rows_cuda(seeds), return_info=True)
        want = eager.sample(12, field, device="cuda", generator=_rows_cuda(seeds), return_info=True)
        assert all(torch.equal(got[k], want[k]) for k in want)
    for seed in range(3):  # the global generator: its own signature
        torch.manual_seed(seed)
        got = fm.sample(12, field, device="cuda", return_info=True)
        torch.manual_seed(seed)
        want = eager.sample(12, field, device="cuda", return_info=True)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert fm.graph_stats.captures == 2 and fm.graph_stats.replays == 3


def test_return_info_is_the_sdes_alone():
    """``return_info`` is read by the recipes' SDE branch only: euler and midpoint return what
    ``return_all_steps`` asks for."""
    fm = FlowMatching("euler", num_inference_steps=3, x_dims=(4, 2))
    field = lambda *, x, t: -x  # noqa: E731
    for method in ("euler", "midpoint"):
        states, grid = fm.sample(2, field, int_method=method, return_all_steps=True,
                                 return_info=True)
        assert states.shape == (2, 4, 4, 2) and grid.shape == (4,)
        assert fm.sample(2, field, int_method=method, return_info=True).shape == (2, 4, 2)
