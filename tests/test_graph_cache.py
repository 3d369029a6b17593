"""The automatic CUDA-graph cache's policy and bookkeeping, checked on CPU with stand-in samplers
(the captured samplers themselves: tests/test_graphs.py, on a GPU)."""

import collections
import gc
import random
import threading
import time
import weakref

import pytest
import torch

from flowmatch_fast import FlowMatching, alpamayo1_5, arguments, flow_matching, sampling
from flowmatch_fast.graph_cache import GraphCache, field_key
from capture_fakes import OpRecorder, captures_on_cpu  # noqa: F401  (a fixture)


class FakeSampler:
    """Stands in for a CapturedSampler: a call is a 'replay'."""

    def __call__(self):
        return "replayed"


def eager():
    return "eager"


def make_field():
    def field(*, x, t):
        return x

    return field


def test_second_call_captures_then_replays_bound_and_eviction_on_collection():
    cache = GraphCache(max_graphs=2)
    f1, f2, f3 = make_field(), make_field(), make_field()
    (k1, w1), (k2, w2), (k3, w3) = field_key(f1), field_key(f2), field_key(f3)
    assert cache.call((k1, 6), w1, FakeSampler, eager) == "eager"  # first call of the signature
    assert cache.call((k1, 6), w1, FakeSampler, eager) == "replayed"  # captured, replayed
    assert cache.call((k1, 6), w1, FakeSampler, eager) == "replayed"
    assert cache.call((k1, 7), w1, FakeSampler, eager) == "eager"  # another signature
    for _ in range(2):
        cache.call((k2, 6), w2, FakeSampler, eager)
    assert len(cache) == 2
    for _ in range(2):  # full: runs eagerly, evicts nothing
        assert cache.call((k3, 6), w3, FakeSampler, eager) == "eager"
    s = cache.stats
    assert (s.first_calls, s.captures, s.replays, s.eager_fallbacks) == (3, 2, 1, 2)
    del f2, w2
    gc.collect()
    assert len(cache) == 1 and cache.stats.evictions == 1
    assert cache.keys() == [(k1, 6)]
    cache.clear()
    assert len(cache) == 0 and cache.stats.evictions == 2
    assert cache.call((k1, 6), w1, FakeSampler, eager) == "eager"  # clear() forgot it too


def test_fields_made_afresh_per_call_never_capture():
    cache = GraphCache(max_graphs=4)
    builds = []
    for _ in range(6):
        field = lambda *, x, t: x  # noqa: E731  (a new object each call, as in a serving loop)
        key, watch = field_key(field)
        assert cache.call((key, 6), watch, lambda: builds.append(1) or FakeSampler(), eager) == "eager"
        del field, watch
    assert not builds and len(cache) == 0
    assert cache.stats.first_calls == 6 and cache.stats.captures == 0
    assert not cache._seen, "a collected field must be forgotten (no growth, no reused id)"


def test_a_field_that_raises_also_eagerly_propagates_and_nothing_is_remembered():
    """A capture failing with the field's own exception: the eager run raises it too, so it
    propagates (not swallowed into an eager fallback) and the signature is not marked failed."""
    cache = GraphCache(max_graphs=2)

    class Boom(Exception):
        pass

    def build():
        raise Boom("inside step_fn")

    def eager_raises():
        raise Boom("inside step_fn")

    f = make_field()
    key, watch = field_key(f)
    cache.call((key,), watch, build, eager)
    with pytest.raises(Boom):
        cache.call((key,), watch, build, eager_raises)
    assert len(cache) == 0 and cache.stats.failed_captures == 1 and cache.stats.captures == 0
    assert (key,) not in cache._failed


def test_bound_methods_share_one_key():
    class Model:
        def step(self, *, x, t):
            return x

    m = Model()
    assert field_key(m.step)[0] == field_key(m.step)[0]
    assert field_key(m.step)[0] != field_key(Model().step)[0]


def test_bad_max_graphs():
    with pytest.raises(ValueError, match="max_graphs"):
        FlowMatching(x_dims=2, max_graphs=-1)


def test_fields_that_cannot_be_weakly_referenced_are_pinned():
    class SlotField:
        __slots__ = ("scale",)

        def __init__(self, scale):
            self.scale = scale

        def __call__(self, *, x, t):
            return self.scale * x

    cache = GraphCache(max_graphs=4)
    f = SlotField(1.0)
    key, watch = field_key(f)
    # its death cannot be observed, so it is captured on its first call and held
    assert cache.call((key,), watch, FakeSampler, eager) == "replayed"
    fid = id(f)
    del f, watch
    gc.collect()
    assert len(cache) == 1  # kept (and its field with it), so its id cannot be reused
    assert any(id(v) == fid for v in cache._pinned.values())
    cache.clear()
    assert len(cache) == 0 and not cache._pinned


def test_finalizers_hold_the_cache_weakly():
    field = make_field()  # a field that outlives the sampler that cached it
    cache = GraphCache(max_graphs=2)
    key, watch = field_key(field)
    for _ in range(2):
        cache.call((key,), watch, FakeSampler, eager)
    assert len(cache) == 1
    alive = weakref.ref(cache)
    del cache
    gc.collect()
    assert alive() is None, "dropping the sampler must free its graphs while the field lives"
    del field, watch  # the finalizer of a dead cache is a no-op
    gc.collect()


def test_one_capture_per_signature_bound_and_no_overlapping_replays_under_threads():
    cache = GraphCache(max_graphs=3)
    fields = [make_field() for _ in range(6)]
    keys = [field_key(f) for f in fields]
    builds = {}
    active = [0, 0]  # replays in progress, most ever at once

    class SlowSampler:
        def __call__(self):
            active[0] += 1
            active[1] = max(active[1], active[0])
            time.sleep(0.0005)
            active[0] -= 1
            return "replayed"

    def build_for(key):
        def build():
            time.sleep(0.005)  # a capture takes a while: room for a second thread to miss too
            builds[key] = builds.get(key, 0) + 1
            return SlowSampler()
        return build

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(40):
            fkey, watch = keys[rng.randrange(len(keys))]
            cache.call((fkey, 6), watch, build_for((fkey, 6)), eager)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = cache.stats
    assert len(cache) == 3 and s.captures == 3 and all(n == 1 for n in builds.values())
    assert active[1] == 1, "replays of graphs sharing buffers must not overlap"
    assert s.first_calls + s.captures + s.replays + s.eager_fallbacks == 8 * 40


def test_a_cached_graph_keeps_its_explicit_grid_alive(monkeypatch, captures_on_cpu):
    """A graph captured by the cache for ``timesteps=[...]`` reads that call's grid tensor on
    every replay: the cache entry must hold it after the call that made it is gone."""
    grids = []  # a weak reference to each call's device grid, as the plan got it
    check_timesteps = arguments.check_timesteps

    def recording_check(timesteps, device, dtype):
        values, key = check_timesteps(timesteps, device, dtype)
        grids.append(weakref.ref(values))
        return values, key

    monkeypatch.setattr(arguments, "check_timesteps", recording_check)
    fm = FlowMatching(x_dims=(5, 3), cuda_graph=True)
    field = make_field()
    for _ in range(3):  # eager, capture, replay (return_all_steps=False: the grid is no output)
        fm.sample(4, field, device="cuda:0", timesteps=[0.0, 0.1, 0.35, 0.7, 1.0])
        gc.collect()
    stats = fm.graph_stats
    assert (stats.first_calls, stats.captures, stats.replays) == (1, 1, 1)
    eager_grid, captured_grid, replay_grid = grids
    assert eager_grid() is None and replay_grid() is None, "an uncaptured call keeps nothing"
    assert captured_grid() is not None, "the cached graph's grid was freed: replays read freed memory"
    fm.clear_cuda_graphs()
    captures_on_cpu.clear()
    gc.collect()
    assert captured_grid() is None, "the grid goes with its graph"


def _default_grid_ops(steps, shift):
    """The ops of the default grid as SPEC builds it: linspace, then the shift formula."""
    with OpRecorder() as recorder:
        values = torch.linspace(0.0, 1.0, steps + 1)
        if shift is not None:
            arguments.shifted_grid(values, shift)
    return collections.Counter(recorder.ops)


def _sampler_classes():
    return [pytest.param(FlowMatching, id="r1"), pytest.param(alpamayo1_5.FlowMatching, id="1.5")]


@pytest.mark.parametrize("cls", _sampler_classes())
@pytest.mark.parametrize("how", ["cache", "capture"])
@pytest.mark.parametrize("shift", [None, 3.0])
def test_a_captured_run_builds_no_grid_the_graph_holds_it(cls, how, shift, captures_on_cpu):
    """The default (or shifted) grid never changes between replays: it is built once before the
    capture and held by the graph, so the captured run is the eager run less the grid's ops."""
    fm = cls(x_dims=(5, 3), cuda_graph=True)
    field = make_field()
    for _ in range(2 if how == "cache" else 0):  # eager, then captured
        fm.sample(4, field, device="cuda:0", shift=shift, cuda_graph=True)
    if how == "capture":
        fm.capture(4, field, device="cuda:0", shift=shift)
    (graph,) = captures_on_cpu
    with OpRecorder() as recorder:
        fm.sample(4, field, device="cpu", shift=shift, cuda_graph=False)
    eager, captured = collections.Counter(recorder.ops), collections.Counter(graph.ops)
    assert "aten.linspace" in eager and "aten.linspace" not in captured
    assert not captured - eager and eager - captured == _default_grid_ops(10, shift)
    held = weakref.ref(graph._static_inputs[0])
    if how == "cache":
        gc.collect()
        assert held() is not None, "the graph's grid must live as long as the graph"
        fm.clear_cuda_graphs()
        del graph
        captures_on_cpu.clear()
        gc.collect()
        assert held() is None, "the grid goes with its graph"


@pytest.mark.parametrize("cls", _sampler_classes())
@pytest.mark.parametrize("steps", [1, 7, 10, 33])
@pytest.mark.parametrize("shift", [None, 0.3, 3.0])
def test_a_held_grid_is_the_eager_grid_bitwise_and_returned_as_the_callers(cls, steps, shift,
                                                                          captures_on_cpu):
    fm = cls(x_dims=(2, 3), cuda_graph=True)
    field = make_field()
    opts = dict(inference_step=steps, shift=shift, return_all_steps=True)
    _, want = fm.sample(3, field, device="cpu", cuda_graph=False, **opts)
    grids = [fm.sample(3, field, device="cuda:0", **opts)[1] for _ in range(3)]
    grids.append(fm.capture(3, field, device="cuda:0", **opts)()[1])
    assert len(captures_on_cpu) == 2  # the cache's graph, then the explicit capture
    for graph in captures_on_cpu:
        assert torch.equal(graph._static_inputs[0], want)
    for grid in grids:  # eager, capture, replay; explicit capture's replay
        assert torch.equal(grid, want) and grid.dtype == torch.float32
        assert all(grid.data_ptr() != g._static_inputs[0].data_ptr() for g in captures_on_cpu)
        grid.fill_(0.5)  # the caller's own: the next replay's grid is unchanged
    assert torch.equal(fm.sample(3, field, device="cuda:0", **opts)[1], want)


@pytest.mark.parametrize("cls", _sampler_classes())
@pytest.mark.parametrize("timesteps", [None, [0.0, 0.1, 0.35, 0.7, 1.0]])
def test_a_static_output_grid_is_not_the_grid_the_graph_reads(cls, timesteps, captures_on_cpu):
    """``sampler(static_output=True)`` hands out the graph's own output buffers: with
    ``return_all_steps`` the grid among them must be a copy made inside the run, not the held
    grid every replay reads, or a write into it would change every later call."""
    fm = cls(x_dims=(2, 3))
    fm.capture(3, make_field(), device="cuda:0", return_all_steps=True, timesteps=timesteps)
    graph, = captures_on_cpu
    states, grid = graph.outputs  # what static_output=True returns
    held = graph._static_inputs[0]
    assert torch.equal(grid, held) and grid.data_ptr() != held.data_ptr()


def _key(fm, **opts):
    """A call's cache key: the R1 class's ``guidance=`` / ``guidance_weight=`` as its ``sample``
    takes them, the 1.5 class's plan options (``guidance="mix"``, ``weight``) as they are."""
    if isinstance(fm, FlowMatching):
        options = flow_matching._r1_options(fm, **opts)
    else:
        options = flow_matching.Options(**opts)
    return fm._plan(3, "cpu", options).key()


def test_key_sees_x_dims_default_dtype_and_autocast():
    fm = FlowMatching(x_dims=(4, 2), backend="auto")  # every backend's key: auto takes any grid
    base = _key(fm)
    fm.x_dims = [8, 2]  # a plain attribute: a graph of the old shape must not be replayed
    assert _key(fm) != base
    fm.x_dims = [4, 2]
    assert _key(fm) == base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _key(fm) != base
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the noise and the grid follow it
    try:
        assert _key(fm) != base
    finally:
        torch.set_default_dtype(previous)
    assert _key(fm) == base


def test_key_compares_floats_by_bits():
    fm = FlowMatching(x_dims=2)
    nan_a, nan_b = float("nan"), float("nan")
    assert nan_a is not nan_b
    assert _key(fm, guidance=True, guidance_weight=nan_a) == _key(fm, guidance=True,
                                                                  guidance_weight=nan_b)
    # -0.0 == 0.0, but w * (vc - vu) differs in sign, and so can the result
    assert _key(fm, guidance=True, guidance_weight=-0.0) != _key(fm, guidance=True,
                                                                 guidance_weight=0.0)
    assert (_key(fm, timesteps=[-0.0, 0.5, 1.0]) != _key(fm, timesteps=[0.0, 0.5, 1.0])
            == _key(fm, timesteps=torch.tensor([0.0, 0.5, 1.0])))


def test_key_of_the_1_5_class_sees_temperature_and_the_mix_weight_by_bits():
    fm = alpamayo1_5.FlowMatching(x_dims=2)
    nan_a, nan_b = float("nan"), float("nan")
    assert _key(fm, temperature=nan_a) == _key(fm, temperature=nan_b)
    assert _key(fm, temperature=-0.0) != _key(fm, temperature=0.0)  # x * -0.0 is -0.0
    assert _key(fm, temperature=0.5) != _key(fm)
    mix = dict(guidance="mix", weight=2.5)
    assert _key(fm, **mix) != _key(fm) and _key(fm, **mix) != _key(fm, guidance="mix", weight=2.0)
    # the same weight under the R1 extra's doubled batch is another graph
    assert _key(fm, **mix) != _key(fm, guidance="batch", weight=2.5)
    assert (_key(fm, guidance="mix", weight=-0.0) != _key(fm, guidance="mix", weight=0.0))


# ----------------------------------------------------------------------------- GPU


def smooth_field(*, x, t):
    return torch.sin(1.7 * x) - 0.5 * x * t


@pytest.mark.gpu
def test_fresh_fields_and_nan_weights_on_a_gpu():
    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True)
    for _ in range(4):
        fm.sample(6, lambda *, x, t: torch.sin(x), device="cuda")  # noqa: E731
    assert fm.graph_stats.captures == 0 and fm.graph_stats.first_calls == 4
    assert len(fm.graph_cache) == 0
    for _ in range(3):
        fm.sample(6, smooth_field, device="cuda", guidance=True, guidance_weight=float("nan"))
    assert fm.graph_stats.captures == 1 and fm.graph_stats.replays == 1


@pytest.mark.gpu
def test_threads_sharing_one_sampler_get_their_own_results():
    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True, max_graphs=2)
    # Captures run in CUDA's global capture mode, where other threads' CUDA calls fail: capture
    # the signatures from one thread first (README, "CUDA graphs").
    for batch in (6, 3):
        for _ in range(2):
            fm.sample(batch, smooth_field, device="cuda", return_all_steps=True)
    results = []

    def worker(batch, own_stream):
        stream = torch.cuda.Stream() if own_stream else torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            for _ in range(25):
                results.append(fm.sample(batch, smooth_field, device="cuda",
                                         return_all_steps=True)[0])
        stream.synchronize()

    threads = [threading.Thread(target=worker, args=(b, s)) for b in (6, 3) for s in (False, True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 100 and fm.graph_stats.captures == 2
    for states in results:  # each result is one whole trajectory, from its own noise
        want, _ = fm.sample(states.shape[0], smooth_field, device="cuda", return_all_steps=True,
                            noise=states[:, 0].contiguous(), cuda_graph=False)
        assert torch.equal(states, want)


def test_a_guided_signature_is_keyed_on_both_fields_and_forgotten_when_either_dies():
    cache = GraphCache(max_graphs=4)
    guided, unguided, other = make_field(), make_field(), make_field()
    (kg, wg), (ku, wu), (ko, wo) = field_key(guided), field_key(unguided), field_key(other)
    for want in ("eager", "replayed", "replayed"):
        assert cache.call((kg, ku, 6), (wg, wu), FakeSampler, eager) == want
    # the same guided field with another unguided one is another graph
    assert cache.call((kg, ko, 6), (wg, wo), FakeSampler, eager) == "eager"
    assert len(cache) == 1 and len(cache._seen) == 1
    del other, wo  # a signature seen once goes with either of its fields
    gc.collect()
    assert not cache._seen and len(cache) == 1
    del unguided, wu
    gc.collect()
    assert len(cache) == 0 and cache.stats.evictions == 1
    assert not cache._watchers, "the guided field's watcher of a dead entry is detached"
    assert weakref.getweakrefcount(guided) == 0


def test_a_guided_entry_pins_the_field_that_cannot_be_weakly_referenced():
    class SlotField:
        __slots__ = ()

        def __call__(self, *, x, t):
            return x

    cache = GraphCache(max_graphs=4)
    guided, unguided = make_field(), SlotField()
    (kg, wg), (ku, wu) = field_key(guided), field_key(unguided)
    # one death cannot be observed: captured on its first call, that field held
    assert cache.call((kg, ku), (wg, wu), FakeSampler, eager) == "replayed"
    assert not cache._seen and cache._pinned[(kg, ku)] is unguided
    del guided, wg  # the other field's death still evicts it, and lets the pinned one go
    gc.collect()
    assert len(cache) == 0 and not cache._pinned
