"""The graph cache on the paths that are not the happy one: captures under autocast, captures
that fail, what the cache remembers and for how long, the backend an eager call runs, and what
the key must see. On CPU through ``captures_on_cpu`` (the sampling path of ``cuda_graph=True``
with recording captures) or the cache itself; the GPU tests at the end do it for real.
"""

import gc
import types
import warnings
import weakref

import pytest
import torch

from flowmatch_fast import FlowMatching, alpamayo1_5, backends, sampling
from flowmatch_fast.graph_cache import SIGNATURES_PER_GRAPH, GraphCache, field_key
from flowmatch_fast.kernels import reference
from capture_fakes import captures_on_cpu  # noqa: F401  (a fixture)


def make_field():
    def field(*, x, t):
        return torch.sin(x) * t

    return field


def eager():
    return "eager"


class FakeSampler:
    def __call__(self):
        return "replayed"


# ------------------------------------------------------------------------- autocast (item 4)
@pytest.mark.parametrize("how", ["cache", "capture"])
def test_a_capture_under_autocast_runs_with_the_cast_cache_off(how, captures_on_cpu):
    """Warm-up and capture re-enter the caller's autocast with ``cache_enabled=False``: a graph
    must not read the cast cache's weight copies (freed when the caller's context exits, blind
    to in-place weight updates). Eager calls keep the caller's autocast as it is."""
    seen = []

    def field(*, x, t):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     torch.is_autocast_cache_enabled()))
        return torch.sin(x)

    fm = FlowMatching(x_dims=(3, 2), num_inference_steps=2, cuda_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if how == "cache":
            fm.sample(2, field, device="cuda:0")  # first call: eager
            fm.sample(2, field, device="cuda:0")  # captured
        else:
            fm.sample(2, field, device="cpu", cuda_graph=False)
            fm.capture(2, field, device="cuda:0")
        assert torch.is_autocast_cache_enabled(), "the caller's context is left as it was"
    assert len(captures_on_cpu) == 1
    eager_calls, captured_calls = seen[:2], seen[2:]
    assert eager_calls == [(True, torch.bfloat16, True)] * 2
    assert captured_calls == [(True, torch.bfloat16, False)] * 2


# ------------------------------------------------------------------- failed captures (item 5)
class CaptureError(RuntimeError):
    pass


def failing_build():
    raise CaptureError("operation not permitted when stream is capturing")


def test_a_failed_capture_is_remembered_and_its_signature_runs_eagerly():
    cache = GraphCache(max_graphs=2)
    f = make_field()
    key, watch = field_key(f)
    builds = []

    def build():
        builds.append(1)
        failing_build()

    assert cache.call((key,), watch, build, eager) == "eager"  # first call
    with pytest.warns(RuntimeWarning, match="could not be captured .*CaptureError: operation "
                                            "not permitted when stream is capturing"):
        assert cache.call((key,), watch, build, eager) == "eager"  # the capture fails
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per call
        for _ in range(3):
            assert cache.call((key,), watch, build, eager) == "eager"
    s = cache.stats
    assert len(builds) == 1, "a failed capture must not be retried on every other call"
    assert (s.first_calls, s.failed_captures, s.eager_fallbacks, s.captures) == (1, 1, 3, 0)
    assert len(cache) == 0
    # remembered while the field lives; then forgotten with it
    del f, watch
    gc.collect()
    assert len(cache._failed) == 0


def test_a_failed_capture_on_the_sampling_path_returns_the_eager_result(monkeypatch,
                                                                        captures_on_cpu):
    """Through ``sample``: the call whose capture fails returns what an eager call returns
    (same seed, same bits), as do the later calls of the signature; other signatures capture."""
    def failing_capture(run, *args, **kwargs):
        state = torch.get_rng_state()
        run()  # the warm-up ran, then the capture broke: the generator is set back, as
        torch.set_rng_state(state)  # CapturedSampler does
        failing_build()

    monkeypatch.setattr(sampling, "CapturedSampler", failing_capture)
    fm = FlowMatching(x_dims=(5, 3), num_inference_steps=4, cuda_graph=True)
    field = make_field()
    results = []
    with pytest.warns(RuntimeWarning, match="could not be captured") as record:
        for _ in range(4):
            torch.manual_seed(3)
            results.append(fm.sample(4, field, device="cuda:0", return_all_steps=True))
    assert len([w for w in record if "could not be captured" in str(w.message)]) == 1
    torch.manual_seed(3)
    want = fm.sample(4, field, device="cpu", return_all_steps=True, cuda_graph=False)
    for states, grid in results:
        assert torch.equal(states, want[0]) and torch.equal(grid, want[1])
    s = fm.graph_stats
    assert (s.first_calls, s.failed_captures, s.eager_fallbacks, s.captures) == (1, 1, 2, 0)


def test_an_exception_of_the_field_itself_still_propagates(monkeypatch, captures_on_cpu):
    class FieldError(ValueError):
        pass

    calls = [0]

    def field(*, x, t):
        calls[0] += 1
        if calls[0] > 2:  # fine on the first call, broken afterwards (eagerly too)
            raise FieldError("the expert failed")
        return x

    fm = FlowMatching(x_dims=2, num_inference_steps=2, cuda_graph=True)
    fm.sample(1, field, device="cuda:0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FieldError, match="the expert failed"):
            fm.sample(1, field, device="cuda:0")
    assert not fm.graph_cache._failed, "the field's own error is not a failed capture"


# ------------------------------------------------------------- bounded memory of the cache (6)
def _finalizers() -> int:
    return len(weakref.finalize._registry)


def test_signatures_seen_once_are_bounded_and_registered_on_no_field():
    field = make_field()  # a long-lived expert
    key, watch = field_key(field)
    cache = GraphCache(max_graphs=2)
    bound = SIGNATURES_PER_GRAPH * 2
    finalizers = _finalizers()
    for i in range(2000):  # a per-request value in the key
        assert cache.call((key, i), watch, FakeSampler, eager) == "eager"
    assert len(cache._seen) == bound
    assert weakref.getweakrefcount(field) == bound and _finalizers() == finalizers
    # the most recent are remembered: their second call captures; older ones start over
    assert cache.call((key, 1999), watch, FakeSampler, eager) == "replayed"
    assert cache.call((key, 0), watch, FakeSampler, eager) == "eager"
    assert cache.stats.first_calls == 2001 and cache.stats.captures == 1


def test_a_per_request_temperature_leaves_a_bounded_table(captures_on_cpu):
    expert = make_field()
    fm = alpamayo1_5.FlowMatching(x_dims=(4, 2), num_inference_steps=2, cuda_graph=True,
                                  max_graphs=3)
    for i in range(300):
        fm.sample(2, expert, device="cuda:0", temperature=1.0 + i / 1000)
    bound = SIGNATURES_PER_GRAPH * 3
    assert len(fm.graph_cache._seen) == bound and weakref.getweakrefcount(expert) == bound


def test_dropped_samplers_leave_nothing_registered_on_the_field(captures_on_cpu):
    expert = make_field()
    finalizers = _finalizers()
    for i in range(300):  # a sampler made per request: seen once, or captured, then dropped
        fm = FlowMatching(x_dims=(4, 2), num_inference_steps=2, cuda_graph=True)
        for _ in range(1 + i % 2):
            fm.sample(2, expert, device="cuda:0")
        del fm
    gc.collect()
    captures_on_cpu.clear()
    assert weakref.getweakrefcount(expert) == 0 and _finalizers() == finalizers


# ---------------------------------------------------------------- eager calls resolve (item 7)
def test_eager_calls_resolve_the_backend_as_eager_calls(monkeypatch, captures_on_cpu):
    """A signature's first call, a full cache's fallback and a failed capture's run are eager:
    ``auto`` must weigh Triton's launch cost as for an eager loop (``captured=False``); only
    the capture resolves for a captured loop."""
    resolve = backends.resolve
    as_resolved = {flag: types.SimpleNamespace(**vars(reference)) for flag in (False, True)}
    for flag, module in as_resolved.items():
        module.__name__ = f"resolved-captured={flag}"

    def recording_resolve(name, device, numel=0, captured=True, grid_dtype=torch.float32):
        resolve(name, device, numel, captured, grid_dtype)
        return as_resolved[captured]

    ran = []
    integrate = sampling.integrate

    def recording_integrate(method, x, grid, step_fn, backend, *args):
        ran.append(backend.__name__.split("=")[1])
        return integrate(method, x, grid, step_fn, backend, *args)

    monkeypatch.setattr(backends, "resolve", recording_resolve)
    monkeypatch.setattr(sampling, "integrate", recording_integrate)
    fm = FlowMatching(x_dims=(4, 2), num_inference_steps=2, cuda_graph=True, max_graphs=1)
    field, other = make_field(), make_field()
    for f in (field, field, field, other):  # first call, capture, replay, cache full
        fm.sample(2, f, device="cuda:0")
    assert ran == ["False", "True", "False"], ran
    fm.sample(2, field, device="cuda:0", cuda_graph=False)
    assert ran[-1] == "False"


# --------------------------------------------------------------------------- the key (item 8)
PRECISION_SWITCHES = [
    ("cuda matmul TF32", lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True)),
    ("cudnn TF32", lambda: setattr(torch.backends.cudnn, "allow_tf32", False)),
    ("float32 matmul precision", lambda: torch.set_float32_matmul_precision("medium")),
    ("fp16 reduced-precision reductions",
     lambda: setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)),
    ("bf16 reduced-precision reductions",
     lambda: setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)),
    ("the new TF32 switch", lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")),
]


@pytest.fixture
def restore_precision():
    c = torch._C
    saved = (c._get_cublas_allow_tf32(), c._get_cudnn_allow_tf32(),
             c._get_float32_matmul_precision(),
             c._get_cublas_allow_fp16_reduced_precision_reduction(),
             c._get_cublas_allow_bf16_reduced_precision_reduction(),
             c._get_fp32_precision_getter("cuda", "matmul"))
    state = sampling.precision_state()
    yield
    c._set_cublas_allow_tf32(saved[0])
    c._set_cudnn_allow_tf32(saved[1])
    c._set_float32_matmul_precision(saved[2])
    c._set_cublas_allow_fp16_reduced_precision_reduction(*saved[3])
    c._set_cublas_allow_bf16_reduced_precision_reduction(*saved[4])
    c._set_fp32_precision_setter("cuda", "matmul", saved[5])  # last: the legacy setters set it
    assert sampling.precision_state() == state


@pytest.mark.parametrize("switch", PRECISION_SWITCHES, ids=[s[0] for s in PRECISION_SWITCHES])
def test_key_sees_the_matmul_precision_switches(switch, restore_precision):
    """They change what the field's matmuls compute eagerly, not what a replay runs: a graph
    captured under one setting must not serve a call under another."""
    fm = FlowMatching(x_dims=(4, 2), backend="auto")
    plan = fm._plan(3, "cpu", sampling.Options())
    base = plan.key()
    switch[1]()
    assert plan.key() != base  # read at each call, never raises (the APIs mixed included)


# ----------------------------------------------------------------------------- GPU
def _expert(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.SiLU(),
                               torch.nn.Linear(256, 128)).to("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["cache", "capture"])
def test_gpu_capture_under_autocast_then_in_place_weight_update(how):
    """Capture under autocast, leave the context, update the weights in place, replay: equal
    to the eager call under autocast with the new weights (the graph cast them itself)."""
    net = _expert()

    def field(*, x, t):
        return net(x.flatten(1)).view(x.shape)

    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # its cast cache is freed on exit
        if how == "cache":
            for _ in range(2):
                fm.sample(6, field, device="cuda")
        else:
            sampler = fm.capture(6, field, device="cuda")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-0.5)  # in place: the graph sees the new values
    torch.manual_seed(1)
    if how == "cache":
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the same key: a replay
            got = fm.sample(6, field, device="cuda")
        assert fm.graph_stats.replays == 1
    else:
        got = sampler()
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = fm.sample(6, field, device="cuda", cuda_graph=False)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_a_field_that_synchronises_runs_eagerly_with_one_warning():
    def field(*, x, t):
        if x.abs().max().item() > 1e9:  # a host synchronisation: not capturable
            raise AssertionError("unreachable")
        return torch.sin(x)

    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True)
    results = []
    with pytest.warns(RuntimeWarning, match="could not be captured") as record:
        for _ in range(4):
            torch.manual_seed(2)
            results.append(fm.sample(6, field, device="cuda"))
    assert len([w for w in record if "could not be captured" in str(w.message)]) == 1
    torch.manual_seed(2)
    want = fm.sample(6, field, device="cuda", cuda_graph=False)
    assert all(torch.equal(r, want) for r in results)
    s = fm.graph_stats
    assert (s.first_calls, s.failed_captures, s.eager_fallbacks, s.captures) == (1, 1, 2, 0)


@pytest.mark.gpu
def test_gpu_a_tf32_switch_after_capture_is_another_signature(restore_precision):
    net = _expert()

    def field(*, x, t):
        return net(x.flatten(1)).view(x.shape)

    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    for _ in range(3):
        fm.sample(6, field, device="cuda")
    assert fm.graph_stats.replays == 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(4)
    got = fm.sample(6, field, device="cuda")
    torch.manual_seed(4)
    want = fm.sample(6, field, device="cuda", cuda_graph=False)
    assert fm.graph_stats.replays == 1 and torch.equal(got, want)
