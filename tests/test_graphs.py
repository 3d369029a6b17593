"""CUDA-graph capture: options on CPU, the captured samplers (GPU). The cache's bookkeeping:
tests/test_graph_cache.py."""

import gc
import warnings

import pytest
import torch

from flowmatch_fast import FlowMatching
from flowmatch_fast.graph import capture_callable


def test_graph_options_on_cpu():
    fm = FlowMatching(x_dims=(4, 2), cuda_graph=True)
    field = lambda *, x, t: torch.sin(x) + t  # noqa: E731
    with pytest.warns(RuntimeWarning, match="ignored on device 'cpu'"):
        torch.manual_seed(0)
        a = fm.sample(3, field)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per sampler, not per call
        torch.manual_seed(0)
        b = fm.sample(3, field)
    assert torch.equal(a, b) and fm.graph_stats.captures == 0
    with pytest.raises(RuntimeError, match="needs a CUDA device; got 'cpu'"):
        fm.capture(3, field, device="cpu")


def test_capture_callable_needs_a_cuda_device():
    with pytest.raises(RuntimeError, match="needs a CUDA device; got device 'cpu'"):
        capture_callable(lambda: None, "cpu")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_capture_callable_warms_up_on_a_side_stream_then_replays_into_its_output():
    streams = []
    x = torch.zeros(4, device="cuda")

    def fn():
        streams.append(torch.cuda.current_stream())
        return x + 1

    graph, out = capture_callable(fn, "cuda", warmup=2)
    assert len(streams) == 3  # two warm-up calls, then the captured one
    assert len(set(streams)) == 1 and streams[0] != torch.cuda.current_stream()
    x.fill_(5.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full((4,), 6.0, device="cuda"))


def _mlp_field(dims, device, dtype=torch.bfloat16, hidden=256, seed=0):
    """A small MLP in bf16 on a float32 state, like Alpamayo's action expert in miniature."""
    gen = torch.Generator().manual_seed(seed)
    d = int(torch.Size(dims).numel())
    w1 = (torch.randn(d + 1, hidden, generator=gen) / (d + 1) ** 0.5).to(device, dtype)
    w2 = (torch.randn(hidden, d, generator=gen) / hidden ** 0.5).to(device, dtype)
    cond = torch.zeros(1, hidden, device=device, dtype=dtype)

    def field(*, x, t):
        h = torch.cat([x.flatten(1), t.flatten(1)], dim=1).to(dtype) @ w1
        return (torch.nn.functional.silu(h + cond) @ w2).view(x.shape)

    field.cond = cond
    return field


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("return_all_steps", [False, True])
def test_replay_is_bitwise_eager(backend, return_all_steps):
    from flowmatch_fast import backends as b

    reason = b.unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    fm = FlowMatching(x_dims=(64, 2), backend=backend)
    field = _mlp_field((64, 2), "cuda")
    sampler = fm.capture(6, field, device="cuda", return_all_steps=return_all_steps)
    for seed in (1, 2):
        torch.manual_seed(seed)
        eager = fm.sample(6, field, device="cuda", return_all_steps=return_all_steps)
        torch.manual_seed(seed)
        replay = sampler()
        eager = eager if return_all_steps else (eager,)
        replay = replay if return_all_steps else (replay,)
        for e, r in zip(eager, replay):
            assert torch.equal(e, r)
    a, b2 = sampler(), sampler()
    a, b2 = (a[0], b2[0]) if return_all_steps else (a, b2)
    assert not torch.equal(a, b2), "each replay must draw fresh noise"


@pytest.fixture
def w1_capture():
    """(sampler, field, ``fm.capture(6, field)``) at Alpamayo's shape (64, 2), bf16 MLP field."""
    fm = FlowMatching(x_dims=(64, 2))
    field = _mlp_field((64, 2), "cuda")
    return fm, field, fm.capture(6, field, device="cuda")


@pytest.mark.gpu
def test_replays_keep_memory_flat_and_static_output(w1_capture):
    _, _, sampler = w1_capture
    for _ in range(10):
        sampler()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        out = sampler()
    del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    static = sampler(static_output=True)
    assert static is sampler.outputs


@pytest.mark.gpu
def test_conditioning_updated_in_place_between_replays(w1_capture):
    fm, field, sampler = w1_capture
    for value in (0.0, 0.5, -1.0):
        field.cond.fill_(value)
        torch.manual_seed(7)
        eager = fm.sample(6, field, device="cuda")
        torch.manual_seed(7)
        assert torch.equal(sampler(), eager)


@pytest.mark.gpu
def test_automatic_cache_bound_and_stats():
    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True, max_graphs=2)
    field = _mlp_field((64, 2), "cuda")
    for batch in (6, 6, 6, 6, 3, 3, 9, 9):  # a signature is captured on its second call
        torch.manual_seed(batch)
        got = fm.sample(batch, field, device="cuda")
        torch.manual_seed(batch)
        want = fm.sample(batch, field, device="cuda", cuda_graph=False)
        assert torch.equal(got, want)
    stats = fm.graph_stats
    assert (stats.first_calls, stats.captures, stats.replays, stats.eager_fallbacks) == (2, 2, 2, 2)
    assert len(fm.graph_cache) == 2
    fm.clear_cuda_graphs()
    assert len(fm.graph_cache) == 0


@pytest.mark.gpu
def test_cached_graph_of_an_explicit_grid_replays_after_the_call_that_made_it_is_gone():
    """The grid of ``timesteps=[...]`` is copied to the device before the capture and read by
    every replay: were the cache not holding it, its block would go back to the allocator and
    the fresh tensors of its size made between the calls would take it."""
    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True)
    field = _mlp_field((64, 2), "cuda")
    grid = [0.0, 0.1, 0.35, 0.7, 1.0]
    filler = []
    for seed in (1, 2, 3):  # eager, capture, replay
        torch.manual_seed(seed)
        got = fm.sample(6, field, device="cuda", timesteps=grid)
        torch.manual_seed(seed)
        want = fm.sample(6, field, device="cuda", timesteps=grid, cuda_graph=False)
        assert torch.equal(got, want), f"call {seed}"
        gc.collect()
        # the grid's size (5 float32), NaN-filled: a replay reading a freed grid gives NaN
        filler = [torch.full((len(grid),), float("nan"), device="cuda") for _ in range(256)]
    del filler
    stats = fm.graph_stats
    assert (stats.first_calls, stats.captures, stats.replays) == (1, 1, 1)


@pytest.mark.gpu
def test_exception_during_capture_propagates_and_next_call_works():
    class FieldError(Exception):
        pass

    calls = {"n": 0}

    def flaky(*, x, t):
        calls["n"] += 1
        if torch.cuda.is_current_stream_capturing():
            raise FieldError("raised by the user's field during capture")
        return torch.sin(x)

    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True)
    fm.sample(6, flaky, device="cuda")  # first call: eager
    with pytest.raises(FieldError, match="during capture"):
        fm.sample(6, flaky, device="cuda")
    assert len(fm.graph_cache) == 0 and fm.graph_stats.failed_captures == 1
    field = _mlp_field((64, 2), "cuda")
    torch.manual_seed(3)
    got = fm.sample(6, field, device="cuda")
    torch.manual_seed(3)
    assert torch.equal(got, fm.sample(6, field, device="cuda", cuda_graph=False))


@pytest.mark.gpu
def test_sample_inside_a_user_graph_and_without_host_syncs():
    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True)
    field = _mlp_field((64, 2), "cuda")
    fm.sample(6, field, device="cuda", cuda_graph=False)  # warm-up (JIT compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fm.sample(6, field, device="cuda", cuda_graph=False)
        fm.sample(6, field, device="cuda", return_all_steps=True, cuda_graph=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # cuda_graph=True is bypassed while capturing: the warm-up call is the signature's first
    # (eager), so the captured call would be the one the cache captures on
    g, out = capture_callable(lambda: fm.sample(6, field, device="cuda"), "cuda", warmup=1)
    assert fm.graph_stats.captures == 0 and len(fm.graph_cache) == 0
    torch.manual_seed(11)
    g.replay()
    torch.manual_seed(11)
    assert torch.equal(out, fm.sample(6, field, device="cuda", cuda_graph=False))


@pytest.mark.gpu
def test_capture_with_methods_guidance_grid_noise_and_generator():
    fm = FlowMatching(x_dims=(64, 2))
    field = _mlp_field((64, 2), "cuda")
    opts = dict(int_method="rk4", guidance=True, guidance_weight=2.0,
                timesteps=[0.0, 0.1, 0.3, 0.6, 1.0])
    sampler = fm.capture(6, field, device="cuda", return_all_steps=True, **opts)
    torch.manual_seed(1)
    replay = sampler()
    torch.manual_seed(1)
    eager = fm.sample(6, field, device="cuda", return_all_steps=True, **opts)
    assert torch.equal(replay[0], eager[0]) and torch.equal(replay[1], eager[1])

    noise = torch.randn(6, 64, 2, device="cuda")
    from_noise = fm.capture(6, field, device="cuda", noise=noise, int_method="heun")
    for _ in range(2):
        noise.normal_()  # updated in place: the graph reads it on every replay
        assert torch.equal(from_noise(), fm.sample(6, field, device="cuda", noise=noise,
                                                   int_method="heun"))

    gen = torch.Generator(device="cuda").manual_seed(5)
    from_gen = fm.capture(6, field, device="cuda", generator=gen)
    gen.manual_seed(5)
    twin = torch.Generator(device="cuda").manual_seed(5)
    for _ in range(2):
        assert torch.equal(from_gen(), fm.sample(6, field, device="cuda", generator=twin))


def _replay_kernels(replay) -> int:
    """The kernels (and memory ops) the device ran for one ``replay()``, as the profiler sees
    them (CUPTI reports a graph's kernels one by one)."""
    from torch.profiler import ProfilerActivity, profile

    replay()  # warm: lazy inits stay out of the count
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("how", ["capture", "cache"])
def test_a_w1_replay_runs_the_field_the_noise_draw_and_one_update_per_step(backend, how):
    """W1 (R1 class, Euler, 10 steps, batch 6): nothing else in the graph, the time grid
    included (built once before the capture), and the replay is the eager ``sample``."""
    from flowmatch_fast import backends as b
    from flowmatch_fast.kernels.contract import TimeGrid

    reason = b.unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    steps, batch = 10, 6
    fm = FlowMatching(x_dims=(64, 2), backend=backend, num_inference_steps=steps)
    field = _mlp_field((64, 2), "cuda")
    t_views = TimeGrid(torch.linspace(0.0, 1.0, steps + 1, device="cuda"), batch, 3).t_views
    # The floor: the noise draw and the field's calls, alone in a graph. Drawing in both graphs
    # also makes the RNG's per-replay bookkeeping (outside the graph) the same in both counts.
    def noise_and_field():
        x = torch.randn(batch, 64, 2, device="cuda")
        return [field(x=x, t=t) for t in t_views]

    floor, _ = capture_callable(noise_and_field)
    floor_kernels = _replay_kernels(floor.replay)
    if floor_kernels == 0:
        pytest.skip("this profiler does not see the kernels inside a CUDA graph replay")
    if how == "capture":
        sampler = fm.capture(batch, field, device="cuda")
        ours = _replay_kernels(lambda: sampler(static_output=True))
        replay = sampler
    else:
        def replay():
            return fm.sample(batch, field, device="cuda", cuda_graph=True)
        replay(), replay()  # eager, then captured
        assert fm.graph_stats.captures == 1
        ours = _replay_kernels(replay) - 1  # the copy of the graph's output the caller gets
    assert ours == floor_kernels + steps, "beyond the noise and the field: one update per step"
    for seed in (3, 4):
        torch.manual_seed(seed)
        want = fm.sample(batch, field, device="cuda")
        torch.manual_seed(seed)
        assert torch.equal(replay(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("shift", [None, 3.0])
def test_replays_of_both_classes_with_a_held_grid_are_bitwise_eager(shift):
    from flowmatch_fast import alpamayo1_5

    field = _mlp_field((64, 2), "cuda")
    for fm in (FlowMatching(x_dims=(64, 2)), alpamayo1_5.FlowMatching(x_dims=(64, 2))):
        opts = dict(shift=shift, return_all_steps=True, inference_step=7)
        captured = fm.capture(6, field, device="cuda", **opts)
        for seed in (1, 2, 3):  # the cache: eager, capture, replay; the explicit capture
            torch.manual_seed(seed)
            want = fm.sample(6, field, device="cuda", cuda_graph=False, **opts)
            for got_of in (lambda: fm.sample(6, field, device="cuda", cuda_graph=True, **opts),
                           captured):
                torch.manual_seed(seed)
                got = got_of()
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                got[1].fill_(0.5)  # the caller's own copy: later replays keep their grid
        assert fm.graph_stats.captures == 1 and fm.graph_stats.replays == 1
