"""``compile=True``'s cache of compiled regions: its policy (a field made afresh per call never
compiles, the bound, the repeat path that skips planning, Dynamo's recompile limit), copies of
the sampler, and what a CUDA graph captures of a region (on CPU, with a stand-in). Checked with a
stand-in region that runs eagerly where a real compile would only cost time. Plain-torch pass
only, as tests/test_compiled_mode.py.
"""

import copy
import gc
import pickle

import pytest
import torch

from bitwise import assert_bitwise
from compiled_fields import B, DIMS, elementwise, tanh_matmul, unique_graphs
from flowmatch_fast import FlowMatching, compiled
from oracle import spec_sample


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
