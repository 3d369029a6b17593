"""The RL recipes' class where real code uses it: its private helpers (``_euler``, ``_midpoint``,
``_sde``, the static ``_guided_v``) with the recipes' signatures and results, ``sample`` calling a
replacement of them as the recipes call it, the fast path when nothing is replaced, and
``flowmatch_fast.convert`` of a loaded model holding the recipes' sampler. Compared bitwise with
the SPEC's stand-in of the recipes' class (``oracle.OriginalRL``), carrying the same wrappers."""

import inspect
import sys

import pytest
import torch

import flowmatch_fast
from flowmatch_fast.alpamayo1_x_rl import FlowMatching
from bitwise import assert_bitwise
from fields import smooth
from oracle import OriginalRL, Policy

HELPERS = ("_euler", "_midpoint", "_sde", "_guided_v")
CALLS = [dict(int_method="euler", return_all_steps=True),
         dict(int_method="midpoint", use_classifier_free_guidance=True),
         dict(int_method="sde", return_info=True, noise_level=0.9),
         dict(int_method="sde", use_classifier_free_guidance=True, timesteps=[0.0, 0.4, 0.7, 1.0],
              generator=[torch.Generator().manual_seed(s) for s in range(4)])]
IDS = ["euler", "midpoint-guided", "sde", "sde-guided-grid-rows"]


def field(*, x, t):
    return smooth(x, t).to(torch.bfloat16)


def unguided(*, x, t):
    return smooth(0.25 - 0.8 * x, t).to(torch.bfloat16)


def _pair(**kw):
    args = ("euler", "beta", 3, 0.1, 2.5, False)
    return FlowMatching(*args, x_dims=(5, 3), **kw), OriginalRL(*args, x_dims=(5, 3))


def _call(fm, opts, seed):
    opts = dict(opts)
    if "generator" in opts:  # fresh generators per run, same seeds
        opts["generator"] = [torch.Generator().manual_seed(seed + k) for k in range(4)]
    torch.manual_seed(seed)
    return fm.sample(4, field, unguided, **opts)


def _same(a, b, msg):
    if isinstance(b, dict):
        assert set(a) == set(b), msg
        for k in b:
            assert_bitwise(a[k], b[k], f"{msg}: {k}")
    else:
        assert_bitwise(a, b, msg)


@pytest.mark.parametrize("name", HELPERS)
def test_private_helpers_have_the_recipes_signatures(name):
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(FlowMatching, name)) == params(getattr(OriginalRL, name))
    assert isinstance(inspect.getattr_static(FlowMatching, "_guided_v"), staticmethod)


@pytest.mark.parametrize("opts", CALLS, ids=IDS)
def test_sample_equals_the_stand_in(opts, case_rng, fused_launches):
    seed = case_rng.randrange(2**31)
    ours, original = _pair()
    _same(_call(ours, opts, seed), _call(original, opts, seed), f"seed={seed}")


@pytest.mark.parametrize("opts", CALLS, ids=IDS)
def test_wrappers_installed_on_the_instance_run_and_see_the_recipes_arguments(opts, case_rng):
    """A profiler's or step cache's wrapper of ``_euler`` / ``_midpoint`` / ``_sde`` /
    ``_guided_v``: called by ``sample`` with the recipes' arguments, same result as on theirs."""
    seed = case_rng.randrange(2**31)
    results, seen = [], []
    for fm in _pair():
        name = "_" + opts["int_method"]
        for helper in (name, "_guided_v"):
            inner = getattr(fm, helper)

            def wrapper(*args, __inner=inner, __helper=helper, **kwargs):
                seen.append((type(fm).__module__, __helper, len(args), sorted(kwargs)))
                return __inner(*args, **kwargs)

            setattr(fm, helper, wrapper)
        results.append(_call(fm, opts, seed))
    _same(*results, f"seed={seed}")
    ours = [s[1:] for s in seen if s[0].startswith("flowmatch_fast")]
    theirs = [s[1:] for s in seen if not s[0].startswith("flowmatch_fast")]
    assert ours == theirs and ours[0][0] == "_" + opts["int_method"]


def test_unwrapped_sample_never_enters_the_private_helpers(fused_launches):
    fm = FlowMatching("sde", num_inference_steps=4, x_dims=(5, 3))
    entered = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name in HELPERS:
            entered.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fm.sample(3, field, return_info=True)
    finally:
        sys.setprofile(None)
    assert entered == []
    fused_launches.expect(4, "one fused SDE launch per step")


def test_a_subclass_guided_v_makes_the_velocity():
    class Scaled(FlowMatching):
        @staticmethod
        def _guided_v(step_fn, x, t, unguided_step_fn, inference_guidance_weight):
            return 0.5 * step_fn(x=x, t=t)

    class ScaledOriginal(OriginalRL):
        _guided_v = staticmethod(Scaled._guided_v)

    args = ("sde", "beta", 3, 0.1, 2.0, True)
    results = []
    for cls in (Scaled, ScaledOriginal):
        torch.manual_seed(3)
        results.append(cls(*args, x_dims=(5, 3)).sample(2, field, unguided, return_info=True))
    _same(*results, "subclass _guided_v")


def test_convert_replaces_the_recipes_sampler_in_place(case_rng):
    original = OriginalRL("sde", "uniform", 4, 0.2, 1.5, True, x_dims=(5, 3))
    model = Policy(original)
    assert flowmatch_fast.convert(model, backend="torch") is model
    ours = model.diffusion
    assert isinstance(ours, FlowMatching) and ours.backend == "torch"
    for k in ("x_dims", "int_method", "train_timestep_sampler", "num_inference_steps",
              "train_ignore_guidance_rate", "inference_guidance_weight",
              "use_classifier_free_guidance"):
        assert getattr(ours, k) == getattr(original, k), k
    seed = case_rng.randrange(2**31)
    results = []
    for fm in (ours, original):
        torch.manual_seed(seed)
        results.append(fm.sample(3, field, unguided, return_info=True))
    _same(*results, f"seed={seed}")
    assert flowmatch_fast.convert(model) is model and model.diffusion is ours  # idempotent
