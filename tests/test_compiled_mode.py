"""``compile=True``: the whole sampling call as one ``torch.compile`` region, bitwise the original.

Each real compile costs seconds on CPU (Inductor's C++ backend), so each case compiles one
signature and checks several things with it; the cache's policy (fresh fields, the bound, the
repeat path) is checked with a stand-in region that runs eagerly. The region always runs the
plain-torch updates (Inductor fuses them), so this file runs in the plain-torch pass only
(the Makefile's kernel passes skip it).
"""

import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from bitwise import assert_bitwise
from fields import smooth
from flowmatch_fast import FlowMatching, alpamayo1_5, compiled
from flowmatch_fast._original import original_sample
from oracle import spec_sample, spec_sample_1_5

DIMS, B = (16, 2), 5


def elementwise(*, x, t):
    return smooth(x, t).to(torch.bfloat16)


_W = (torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) / 4).to(torch.bfloat16)


def tanh_matmul(*, x, t):
    return torch.tanh((x.flatten(1) + t.flatten(1)).to(torch.bfloat16) @ _W).view(x.shape)


class SiLUMLP(torch.nn.Module):
    """A small bf16 MLP with biases and a sin/cos time embedding."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        torch.manual_seed(3)
        self.inp = torch.nn.Linear(d + 2, hidden)
        self.out = torch.nn.Linear(hidden, d)
        self.to(torch.bfloat16)

    def forward(self, *, x, t):
        tt = t.flatten(1).float()
        h = torch.cat([x.flatten(1), tt.sin(), tt.cos()], dim=1).to(torch.bfloat16)
        return self.out(torch.nn.functional.silu(self.inp(h))).view(x.shape)


def layer_norm_field(*, x, t):
    """Inductor reduces the LayerNorm in its own order: its compiled form is not bitwise."""
    h = torch.nn.functional.layer_norm(x.flatten(1) + t.flatten(1), (32,))
    return (h @ _W.float()).view(x.shape)


def unique_graphs():
    return counters["stats"]["unique_graphs"]


def configs():
    import torch._dynamo.config
    import torch._inductor.config

    return torch._inductor.config.get_config_copy(), torch._dynamo.config.get_config_copy()


# ------------------------------------------------------------------------ bitwise, one compile each
def test_elementwise_field_50_steps_compiles_once_bitwise_and_leaves_global_config_alone():
    before = configs()
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=50, compile=True)
    graphs = unique_graphs()
    for seed in range(4):  # eager, compiles, then the repeat path twice
        torch.manual_seed(seed)
        got = fm.sample(B, elementwise)
        torch.manual_seed(seed)
        assert_bitwise(got, spec_sample(DIMS, B, elementwise, steps=50), f"call {seed}")
    s = fm.compile_stats
    assert (s.first_calls, s.compiles, s.compiled_calls, s.failed_compiles) == (1, 1, 3, 0)
    assert s.compile_seconds > 0
    assert unique_graphs() == graphs + 1, "a repeated call recompiled"
    assert configs() == before, "the global Inductor or Dynamo config changed"


def test_tanh_matmul_field_with_noise_and_all_steps_is_bitwise_and_hands_out_fresh_tensors():
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=10, compile=True)
    for seed in range(3):
        torch.manual_seed(seed)
        noise = torch.randn(B, *DIMS)
        kept = noise.clone()
        got = fm.sample(B, tanh_matmul, noise=noise, return_all_steps=True)
        torch.manual_seed(seed)
        want = spec_sample(DIMS, B, tanh_matmul, steps=10, return_all_steps=True)
        assert_bitwise(got, want, f"call {seed}")
        assert torch.equal(noise, kept)
        got[0].fill_(7.0)  # ours to keep: a later call must not read or write them
        got[1].fill_(7.0)
    assert fm.compile_stats.compiles == 1


def test_silu_mlp_with_generator_is_bitwise_and_checked_mode_stays_quiet():
    """``generator=`` draws where the eager call draws; ``"checked"`` per call wins over the
    constructor's ``False`` and finds nothing to report on a bitwise field."""
    fm, mlp = FlowMatching(x_dims=DIMS, num_inference_steps=10), SiLUMLP()
    for i, mode in enumerate([True, "checked", True]):
        gen = torch.Generator().manual_seed(i)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = fm.sample(B, mlp, generator=gen, compile=mode)
        torch.manual_seed(i)
        assert_bitwise(got, spec_sample(DIMS, B, mlp, steps=10), f"call {i}")
        assert torch.equal(gen.get_state(), torch.get_rng_state()), "the generator drew otherwise"
    s = fm.compile_stats
    assert (s.compiles, s.compiled_calls, s.checked_mismatches) == (1, 2, 0)


def test_alpamayo1_5_guided_sampling_with_temperature_is_bitwise():
    fm = alpamayo1_5.FlowMatching("euler", 10, 2.5, DIMS, True, compile=True)
    mlp = SiLUMLP()
    for seed in range(3):
        torch.manual_seed(seed)
        got = fm.sample(B, mlp, elementwise, temperature=0.8)
        torch.manual_seed(seed)
        want = spec_sample_1_5(DIMS, B, mlp, elementwise, steps=10, guidance=True, weight=2.5,
                               temperature=0.8)
        assert_bitwise(got, want, f"call {seed}")
    assert fm.compile_stats.compiles == 1


def test_rk4_stages_guidance_and_shifted_grid_compile_bitwise_to_eager():
    opts = dict(int_method="rk4", guidance=True, guidance_weight=2.0, shift=3.0)
    eager = FlowMatching(x_dims=DIMS, num_inference_steps=4)
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=4, compile=True)
    for seed in range(3):
        torch.manual_seed(seed)
        got = fm.sample(B, elementwise, **opts)
        torch.manual_seed(seed)
        assert_bitwise(got, eager.sample(B, elementwise, **opts), f"call {seed}")
    assert fm.compile_stats.compiles == 1


def test_a_field_compiled_otherwise_gets_no_difference_from_the_loop_and_checked_warns():
    """LayerNorm: the compiled call is not the eager one, but it is exactly the original loop
    run with the same field compiled alone (same options): the loop adds nothing."""
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=10, compile="checked")
    torch.manual_seed(0)
    eager = fm.sample(B, layer_norm_field)  # a signature's first call: eager
    torch.manual_seed(0)
    assert_bitwise(eager, original_sample(list(DIMS), B, layer_norm_field, "cpu", 10), "eager")
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match=r"differs from the eager one \(max abs difference "):
        first = fm.sample(B, layer_norm_field)
    torch.manual_seed(1)
    second = fm.sample(B, layer_norm_field)
    field = torch.compile(layer_norm_field, options=dict(compiled.OPTIONS), dynamic=False)
    torch.manual_seed(1)
    want = original_sample(list(DIMS), B, field, "cpu", 10)
    assert_bitwise(first, want, "checked call")
    assert_bitwise(second, want, "compiled call")
    torch.manual_seed(1)
    assert not torch.equal(first, original_sample(list(DIMS), B, layer_norm_field, "cpu", 10))
    assert fm.compile_stats.checked_mismatches == 1


def test_region_goes_with_its_field_and_holds_nothing_of_it():
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=2, compile=True)
    field = SiLUMLP()
    for _ in range(3):
        fm.sample(B, field)
    assert len(fm._compiled) == 1 and fm.compile_stats.compiled_calls == 2
    ref = weakref.ref(field)
    del field
    gc.collect()
    assert ref() is None, "the compiled region keeps its field alive"
    assert len(fm._compiled) == 0 and fm.compile_stats.evictions == 1


# ------------------------------------------------------------------------ errors
def test_compile_option_is_type_checked():
    with pytest.raises(TypeError, match="compile must be False, True or 'checked'; got int"):
        FlowMatching(x_dims=DIMS, compile=1)
    with pytest.raises(ValueError, match="got 'yes'"):
        alpamayo1_5.FlowMatching(x_dims=DIMS, compile="yes")
    fm = FlowMatching(x_dims=DIMS)
    with pytest.raises(TypeError, match="got int"):
        fm.sample(B, elementwise, compile=0)
    with pytest.raises(ValueError, match="got 'always'"):
        fm.sample(B, elementwise, compile="always")
    with pytest.raises(TypeError, match="got float"):
        fm.capture(B, elementwise, compile=1.0)
    assert fm.compile_stats == compiled.CompileStats()


def test_unusable_torch_compile_raises_a_clear_error_on_the_first_call(monkeypatch):
    from torch._dynamo import eval_frame

    def unsupported():
        raise RuntimeError("Python 3.15+ not yet supported for torch.compile")

    monkeypatch.setattr(eval_frame, "check_if_dynamo_supported", unsupported)
    fm = FlowMatching(x_dims=DIMS, compile=True)
    with pytest.raises(RuntimeError, match=r"compile=True needs torch.compile, which cannot run "
                                           r"here \(Python 3.15\+ .*compile=False"):
        fm.sample(B, elementwise)
    assert fm.sample(B, elementwise, compile=False).shape == (B, *DIMS)


def test_inductor_failure_is_named_and_counted(monkeypatch):
    import torch._inductor.compile_fx

    def broken(*args, **kwargs):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=2, compile=True)
    torch.manual_seed(0)
    want = fm.sample(B, elementwise)  # eager: a signature's first call
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="could not be compiled.*Inductor could not compile "
                                            "this sampling call.*no C.*run eagerly from now on"):
        got = fm.sample(B, elementwise)  # the compile fails: the eager result, one warning
    assert torch.equal(got, want)
    assert fm.compile_stats.failed_compiles == 1 and len(fm._compiled) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second try, no second warning
        fm.sample(B, elementwise)
    assert fm.compile_stats.failed_compiles == 1


# ------------------------------------------------------------------------ the cache's policy
@pytest.fixture
def eager_regions(monkeypatch):
    """``compiled.region`` as a plain function (no Inductor): the policy, in milliseconds."""
    built = []

    def region(run, template, names):
        def fn(fields, *tensors):
            fn.calls += 1
            return run(template._replace(**dict(zip(names, tensors))), *fields)

        fn.calls = 0
        built.append(fn)
        return fn

    monkeypatch.setattr(compiled, "region", region)
    return built


def test_fields_made_afresh_per_call_are_never_compiled(eager_regions):
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=3, compile=True)
    for _ in range(4):
        fm.sample(B, lambda *, x, t: x * t)
    gc.collect()
    assert not eager_regions and len(fm._compiled) == 0
    assert (fm.compile_stats.first_calls, fm.compile_stats.compiles) == (4, 0)


def test_past_the_bound_new_signatures_run_eagerly(eager_regions):
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=3, compile=True, max_graphs=1)
    for field in (elementwise, tanh_matmul):
        for seed in range(3):
            torch.manual_seed(seed)
            got = fm.sample(B, field)
            torch.manual_seed(seed)
            assert_bitwise(got, spec_sample(DIMS, B, field, steps=3), f"call {seed}")
    s = fm.compile_stats
    assert [r.calls for r in eager_regions] == [2]
    assert (s.first_calls, s.compiles, s.compiled_calls, s.eager_fallbacks) == (1, 1, 2, 3)


def test_repeated_calls_skip_planning_and_any_change_is_a_new_signature(eager_regions,
                                                                         monkeypatch):
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=3, compile=True)
    plans = []
    plan = fm._plan
    monkeypatch.setattr(fm, "_plan", lambda *a, **k: plans.append(1) or plan(*a, **k))
    for _ in range(4):
        fm.sample(1, elementwise, guidance=True, guidance_weight=0.0)
    assert len(plans) == 2 and eager_regions[0].calls == 3  # eager, compile, then no planning
    first_calls = fm.compile_stats.first_calls
    fm.sample(1, elementwise, guidance=True, guidance_weight=-0.0)  # other bits: other call
    assert fm.compile_stats.first_calls == first_calls + 1
    with pytest.raises(TypeError, match="batch_size must be an int, got True"):
        fm.sample(True, elementwise, guidance=True, guidance_weight=0.0)
    fm.num_inference_steps = 4  # the attribute is read by each call
    torch.manual_seed(0)
    got = fm.sample(1, elementwise, guidance=True, guidance_weight=0.0)
    torch.manual_seed(0)
    want = FlowMatching(x_dims=DIMS, num_inference_steps=4).sample(
        1, elementwise, guidance=True, guidance_weight=0.0)
    assert_bitwise(got, want, "after num_inference_steps changed")


def test_every_signature_compiles_past_dynamo_s_recompile_limit(monkeypatch):
    """Each region has a code object of its own: ten signatures (more than Dynamo's limit of 8
    compiles per code object) all compile, none falls back to eager. Dynamo's ``eager`` backend
    stands in for Inductor here (the same guards and limits, milliseconds a compile)."""
    import torch._dynamo.config

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager",
                                                                dynamic=kw["dynamic"]))
    assert torch._dynamo.config.recompile_limit < 10
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=2, compile=True, max_graphs=10)
    graphs = unique_graphs()
    for batch in range(1, 11):
        for _ in range(3):
            fm.sample(batch, elementwise)
    assert unique_graphs() == graphs + 10
    assert fm.compile_stats.compiles == 10


def test_copies_start_empty_and_keep_the_mode(eager_regions):
    """deepcopy / pickle of a sampler with compiled regions: same mode, nothing compiled, zeroed
    stats; the option lives in ``compile_mode`` (``nn.Module.compile`` stays the method)."""
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=3, compile="checked")
    for _ in range(3):
        fm.sample(B, elementwise)
    assert len(fm._compiled) == 1
    for twin in (copy.deepcopy(fm), pickle.loads(pickle.dumps(fm))):
        assert twin.compile_mode == "checked" and len(twin._compiled) == 0
        assert twin.compile_stats == compiled.CompileStats()
        assert fm.state_dict() == {} == twin.state_dict()
        torch.manual_seed(0)
        got = twin.sample(B, elementwise)
        torch.manual_seed(0)
        assert_bitwise(got, fm.sample(B, elementwise), "copy")
    assert callable(fm.compile) and fm.compile.__func__ is torch.nn.Module.compile


class ReplayedOnCPU:
    """Stands in for ``CapturedSampler`` on CPU: ``warmup`` calls, the RNG put back as a capture
    does, then each call reruns the sampling call (as a replay reruns its kernels)."""

    def __init__(self, run, device, warmup=2, generators=(), static_inputs=(), **kw):
        states = [g.get_state() for g in generators] or [torch.get_rng_state()]
        for _ in range(warmup):
            run()
        for set_state, state in zip([g.set_state for g in generators] or [torch.set_rng_state],
                                    states):
            set_state(state)
        self.run, self.static_inputs = run, static_inputs

    def __call__(self):
        return self.run()


@pytest.mark.parametrize("draw", ["global", "generator", "noise"])
def test_the_region_a_cuda_graph_captures_draws_per_replay(eager_regions, monkeypatch, draw):
    """What ``capture(..., compile=...)`` and the graph cache capture, run on CPU: each replay
    draws fresh noise where the eager call draws it (``generator=`` inside the graph), reads a
    ``noise=`` tensor in place, and the sampler holds the region (the cache drops ``run``)."""
    from flowmatch_fast.sampling import Options

    monkeypatch.setattr(compiled, "CapturedSampler", ReplayedOnCPU)
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=4)
    gen, eager_gen = (torch.Generator().manual_seed(5) for _ in range(2))
    noise = torch.randn(B, *DIMS)
    extra = {"global": {}, "generator": {"generator": gen}, "noise": {"noise": noise}}[draw]
    plan = fm._plan(B, torch.device("cpu"), Options(**extra), captured=True)
    torch.manual_seed(3)
    sampler = fm._compiled.captured(fm._run, (elementwise,), plan, "checked", warmup=2)
    assert any(isinstance(held, compiled._Region) for held in sampler.static_inputs)
    for i in range(3):
        if draw == "noise":
            noise.copy_(torch.randn(B, *DIMS))  # in place, as the caller of a graph does
        state = torch.get_rng_state()
        got = sampler()
        torch.set_rng_state(state)
        kw = {"generator": eager_gen} if draw == "generator" else extra
        assert_bitwise(got, fm.sample(B, elementwise, **kw), f"replay {i}")
    assert fm.compile_stats.compiles == 1 and fm.compile_stats.checked_mismatches == 0


# ------------------------------------------------------------------------ GPU: inside our graph
def _compiled_alone(field):
    """The field compiled by itself with the region's options: the reference a compiled region
    equals whatever Inductor does to the field's own numbers (Triton's SiLU, say)."""
    return torch.compile(field, options=dict(compiled.OPTIONS), dynamic=False)


@pytest.mark.gpu
def test_compiled_region_is_what_our_cuda_graph_captures():
    """``compile=True, cuda_graph=True``: the second call compiles in the capture's warm-up (no
    compile inside the capture or after it), and every compiled call is bitwise the original
    loop with the field compiled alone (the first, eager call: the original itself)."""
    mlp = SiLUMLP().cuda()
    alone = _compiled_alone(mlp)
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=10, compile=True, cuda_graph=True)
    graphs = None
    for seed in range(4):
        torch.manual_seed(seed)
        got = fm.sample(B, mlp, device="cuda")
        torch.manual_seed(seed)
        want = original_sample(list(DIMS), B, mlp if seed == 0 else alone, "cuda", 10)
        assert_bitwise(got, want, f"call {seed}")
        if seed == 1:
            graphs = unique_graphs()
    assert unique_graphs() == graphs, "compiled after the capture"
    assert (fm.graph_stats.captures, fm.graph_stats.replays) == (1, 2)
    assert fm.compile_stats.compiles == 1


@pytest.mark.gpu
def test_capture_of_the_compiled_region_with_a_generator_replays_bitwise():
    """``capture(..., compile="checked", generator=g)``: each replay draws from ``g`` and equals
    our eager loop with the field compiled alone, drawing from a generator seeded alike."""
    mlp = SiLUMLP().cuda()
    alone = _compiled_alone(mlp)
    fm = FlowMatching(x_dims=DIMS, num_inference_steps=10)
    gen = torch.Generator("cuda").manual_seed(5)
    sampler = fm.capture(B, mlp, device="cuda", generator=gen, compile="checked")
    eager_gen = torch.Generator("cuda").manual_seed(5)
    for i in range(3):
        want = fm.sample(B, alone, device="cuda", generator=eager_gen)
        assert_bitwise(sampler(), want, f"replay {i}")
    assert fm.compile_stats.compiles == 1
