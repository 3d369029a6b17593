"""The originals' private helpers that third-party code calls and wraps (issue 21, item 3):
``_euler`` on both classes and Alpamayo 1.5's static ``_guided_v``, with the originals'
signatures and results; ``sample`` runs an ``_euler`` replaced on the instance or a subclass (the
wrapper sees the original's arguments), and keeps its fast path when nothing is replaced.

Compared bitwise with the SPEC's stand-ins of the originals (``oracle.OriginalR1``,
``oracle.Original1_5``) carrying the very same wrappers.
"""

import inspect
import sys

import pytest
import torch

from flowmatch_fast import FlowMatching
from flowmatch_fast.alpamayo1_5 import FlowMatching as FlowMatching1_5
from bitwise import assert_bitwise
from fields import smooth
from oracle import Original1_5, OriginalR1

CLASSES = [(FlowMatching, OriginalR1), (FlowMatching1_5, Original1_5)]
IDS = ["r1", "1.5"]


def field(*, x, t):
    return smooth(x, t).to(torch.bfloat16)


def unguided(*, x, t):
    return smooth(0.25 - 0.8 * x, t).to(torch.bfloat16)


def _make(cls, steps=3):
    if issubclass(cls, (FlowMatching, OriginalR1)):
        return cls(x_dims=(5, 3), num_inference_steps=steps)
    return cls("euler", steps, 2.5, (5, 3), True)


def _fields(fm):
    return (field,) if isinstance(fm, (FlowMatching, OriginalR1)) else (field, unguided)


def _parameters(fn):
    """A signature without its annotations: names, kinds and defaults."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _both(run, ours, original, seed, msg=""):
    results = []
    for fm in (ours, original):
        torch.manual_seed(seed)
        results.append(run(fm))
    assert_bitwise(results[0], results[1], f"seed={seed} {msg}")
    return results[0]


@pytest.mark.parametrize("ours, original", CLASSES, ids=IDS)
def test_euler_has_the_originals_signature(ours, original):
    assert _parameters(ours._euler) == _parameters(original._euler)


def test_guided_v_is_a_static_method_with_the_originals_signature():
    assert isinstance(inspect.getattr_static(FlowMatching1_5, "_guided_v"), staticmethod)
    assert _parameters(FlowMatching1_5._guided_v) == _parameters(Original1_5._guided_v)


@pytest.mark.parametrize("weight", [2.5, -0.7, torch.tensor(0.1)], ids=repr)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64),
                                    (torch.float16, torch.float32)], ids=str)
def test_guided_v_calls_the_guided_field_first_and_mixes_as_the_original(weight, dtypes):
    calls = []
    x, t = torch.randn(3, 5, 2), torch.full((3, 1, 1), 0.25)

    def vg(*, x, t):
        calls.append("guided")
        return smooth(x, t).to(dtypes[0])

    def vu(*, x, t):
        calls.append("unguided")
        return smooth(-x, t).to(dtypes[1])

    got = FlowMatching1_5._guided_v(step_fn=vg, x=x, t=t, unguided_step_fn=vu,
                                    inference_guidance_weight=weight)
    assert calls == ["guided", "unguided"]
    want = Original1_5._guided_v(vg, x, t, vu, weight)
    assert_bitwise(got, want, f"w={weight} {dtypes}")


@pytest.mark.parametrize("ours, original", CLASSES, ids=IDS)
def test_euler_called_directly_is_the_originals(ours, original, device, case_rng, fused_launches):
    seed, steps = case_rng.randrange(2**31), case_rng.randint(1, 5)
    extra = {} if ours is FlowMatching else dict(unguided_step_fn=unguided, temperature=0.5,
                                                 use_classifier_free_guidance=True,
                                                 inference_guidance_weight=2.5)
    _both(lambda fm: fm._euler(batch_size=4, step_fn=field, device=device, return_all_steps=True,
                               inference_step=steps, **extra),
          _make(ours), _make(original), seed)
    fused_launches.expect(steps, f"seed={seed}")


def _recording_wrapper(fm, seen):
    """A profiler's wrapper: records the arguments, calls the ``_euler`` it replaced."""
    inner = fm._euler

    def wrapper(*args, **kwargs):
        seen.append(kwargs)
        return inner(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("ours, original", CLASSES, ids=IDS)
def test_sample_runs_a_wrapper_installed_on_the_instance(ours, original, device, case_rng,
                                                          fused_launches):
    seed = case_rng.randrange(2**31)
    pair, seen = (_make(ours), _make(original)), ([], [])
    for fm, record in zip(pair, seen):
        fm._euler = _recording_wrapper(fm, record)
    _both(lambda fm: fm.sample(4, *_fields(fm), device=device, return_all_steps=True,
                               inference_step=0), *pair, seed)
    assert len(seen[0]) == 1 and seen[0] == seen[1]  # the original's arguments, as it passes them
    fused_launches.expect(3, f"seed={seed}: the fast path inside the wrapped _euler")


@pytest.mark.parametrize("ours, original", CLASSES, ids=IDS)
def test_a_subclass_or_a_patched_class_euler_runs(ours, original, monkeypatch, case_rng):
    seed = case_rng.randrange(2**31)
    seen = []

    def euler(self, *args, **kwargs):  # e.g. a step cache's: here, four more steps
        seen.append(type(self))
        return type(self).__mro__[1]._euler(self, *args, **{**kwargs, "inference_step": 4})

    subclasses = [type("Sub", (cls,), {"_euler": euler}) for cls in (ours, original)]
    _both(lambda fm: fm.sample(2, *_fields(fm), return_all_steps=True),
          _make(subclasses[0]), _make(subclasses[1]), seed)
    assert seen == subclasses
    monkeypatch.setattr(ours, "_euler", lambda self, **kwargs: "patched")
    assert _make(ours).sample(2, *_fields(_make(ours))) == "patched"


def _step_cache_wrapper(diffusion):
    """A third-party step cache written for the 1.5 release without ``generator``: replaces
    ``_euler`` with its own loop (the field once, then reused), calling ``diffusion._guided_v``."""

    def euler(batch_size, step_fn, unguided_step_fn=None, device=torch.device("cpu"),
              return_all_steps=False, inference_step=None, inference_guidance_weight=None,
              use_classifier_free_guidance=None, temperature=1.0):
        x = torch.randn(batch_size, *diffusion.x_dims, device=device) * temperature
        grid = torch.linspace(0.0, 1.0, inference_step + 1, device=device)
        shape = (batch_size, *[1] * len(diffusion.x_dims))
        v = None
        for i in range(inference_step):
            t = grid[i].view(1, *shape[1:]).expand(shape)
            if v is None:
                v = (diffusion._guided_v(step_fn=step_fn, x=x, t=t,
                                         unguided_step_fn=unguided_step_fn,
                                         inference_guidance_weight=inference_guidance_weight)
                     if use_classifier_free_guidance else step_fn(x=x, t=t))
            x = x + (grid[i + 1] - grid[i]).view(1, *shape[1:]).expand(shape) * v
        return x

    return euler


def test_a_step_cache_for_the_release_without_generator_runs(device, case_rng):
    seed = case_rng.randrange(2**31)
    pair = (_make(FlowMatching1_5, 4), _make(Original1_5, 4))
    for fm in pair:
        fm._euler = _step_cache_wrapper(fm)
    _both(lambda fm: fm.sample(3, field, unguided, device), *pair, seed)


def test_our_options_reach_our_euler_through_a_wrapper(case_rng):
    seed, seen = case_rng.randrange(2**31), []
    opts = dict(timesteps=[0.0, 0.25, 0.5, 0.75, 1.0],
                generator=torch.Generator().manual_seed(seed))
    plain, wrapped = _make(FlowMatching), _make(FlowMatching)
    wrapped._euler = _recording_wrapper(wrapped, seen)
    want = plain.sample(2, field, return_all_steps=True, **opts)
    opts["generator"].manual_seed(seed)
    assert_bitwise(wrapped.sample(2, field, return_all_steps=True, **opts), want, "timesteps=")
    assert len(seen) == 1 and "timesteps" not in seen[0] and seen[0]["inference_step"] == 4
    v15, v15_wrapped, seen = _make(FlowMatching1_5), _make(FlowMatching1_5), []
    v15_wrapped._euler = _recording_wrapper(v15_wrapped, seen)
    noise = torch.randn(2, 5, 3)
    assert_bitwise(v15_wrapped.sample(2, field, unguided, shift=3.0, noise=noise),
                   v15.sample(2, field, unguided, shift=3.0, noise=noise), "shift=, noise=")
    assert len(seen) == 1 and "generator" not in seen[0]  # only when one is given


@pytest.mark.parametrize("ours", [FlowMatching, FlowMatching1_5], ids=IDS)
def test_unwrapped_sample_keeps_the_fast_path(ours, fused_launches):
    fm, entered = _make(ours), []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is ours._euler.__code__:
            entered.append(frame)

    sys.setprofile(profile)
    try:
        fm.sample(4, *_fields(fm))
    finally:
        sys.setprofile(None)
    assert entered == []
    fused_launches.expect(3, "one fused update a step")


def test_a_subclass_guided_v_makes_the_velocity(case_rng):
    seed = case_rng.randrange(2**31)

    @staticmethod
    def rescaled(step_fn, x, t, unguided_step_fn, inference_guidance_weight):
        vg, vu = step_fn(x=x, t=t), unguided_step_fn(x=x, t=t)
        return vg + inference_guidance_weight * (vg - vu) * 0.5

    pair = [type("Sub", (cls,), {"_guided_v": rescaled})("euler", 3, 2.5, (5, 3), True)
            for cls in (FlowMatching1_5, Original1_5)]
    ours = _both(lambda fm: fm.sample(2, field, unguided), *pair, seed)
    torch.manual_seed(seed)
    assert not torch.equal(ours, _make(FlowMatching1_5).sample(2, field, unguided))
