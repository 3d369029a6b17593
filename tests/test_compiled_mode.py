"""``compile=True``: the whole sampling call as one ``torch.compile`` region, bitwise the original.

Each real compile costs seconds on CPU (Inductor's C++ backend), so each case compiles one
signature and checks several things with it; the cache's policy (fresh fields, the bound, the
repeat path) is checked with a stand-in region that runs eagerly. The region always runs the
plain-torch updates (Inductor fuses them), so this file runs in the plain-torch pass only
(the Makefile's kernel passes skip it).
"""

import gc
import warnings
import weakref

import pytest
import torch

from bitwise import assert_bitwise
from flowmatch_fast import FlowMatching, alpamayo1_5, compiled
from flowmatch_fast._original import original_sample
from oracle import spec_sample, spec_sample_1_5

from compiled_fields import (B, DIMS, SiLUMLP, configs, elementwise, layer_norm_field,
                             tanh_matmul, unique_graphs)


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
    field = torch.compile(layer_norm_field, options=dict(compiled.compile_options()), dynamic=False)
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


# ------------------------------------------------------------------------ GPU: inside our graph
def _compiled_alone(field):
    """The field compiled by itself with the region's options: the reference a compiled region
    equals whatever Inductor does to the field's own numbers (Triton's SiLU, say)."""
    return torch.compile(field, options=dict(compiled.compile_options()), dynamic=False)


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


def test_rl_sde_rollouts_compile_bitwise_and_replays_or_generator_draws_run_eagerly():
    """The RL recipes' SDE as one region: bitwise the eager rollout (log-probs included: their
    division and per-row means stay eager PyTorch's, opaque ops to Inductor), guided; a replay
    of stored samples and a rollout drawing from generators run eagerly, compiling nothing."""
    from flowmatch_fast.alpamayo1_x_rl import FlowMatching as RLFlowMatching

    fm = RLFlowMatching("sde", num_inference_steps=4, inference_guidance_weight=2.5,
                        use_classifier_free_guidance=True, x_dims=DIMS)
    unguided = lambda *, x, t: elementwise(x=0.5 * x, t=t)  # noqa: E731
    results = []
    for compile_ in (False, True, True):  # eager, then a first call (eager) and its compile
        torch.manual_seed(3)
        results.append(fm.sample(B, elementwise, unguided, compile=compile_, return_info=True,
                                 noise_level=0.9))
    for k in results[0]:
        assert_bitwise(results[2][k], results[0][k], k)
    assert fm.compile_stats.compiles == 1
    stored = list(results[0]["all_steps"].unbind(1))
    for kw in (dict(samples_list=stored),
               dict(generator=[torch.Generator().manual_seed(s) for s in range(B)])):
        for _ in range(2):
            fm.sample(B, elementwise, unguided, compile=True, return_info=True, **kw)
    assert fm.compile_stats.compiles == 1
