"""``flowmatch_fast.convert(model)`` (issue 21, item 4): every Alpamayo sampler inside a model that
was built with the originals (``self.diffusion = instantiate(config.diffusion_cfg, x_dims=...)``
inside the model's constructor) is replaced by ours, in place, recognised by class name and
module without importing Alpamayo. The originals here are the SPEC's stand-ins
(``oracle.OriginalR1``, ``oracle.Original1_5``: same class name, module and attributes)."""

import copy
import sys
import warnings

import pytest
import torch

import flowmatch_fast
from flowmatch_fast import FlowMatching
from flowmatch_fast.alpamayo1_5 import FlowMatching as FlowMatching1_5
from bitwise import assert_bitwise
from fields import smooth
from oracle import Original1_5, OriginalR1, Policy


def field(*, x, t):
    return smooth(x, t).to(torch.bfloat16)


def unguided(*, x, t):
    return smooth(0.25 - 0.8 * x, t).to(torch.bfloat16)


def _public(module):
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


def _r1():
    return OriginalR1("euler", "uniform", 4, 0.2, 3.0, x_dims=(5, 3))


def _v15():
    return Original1_5("euler", 3, 2.5, (5, 3), True)


def test_convert_replaces_the_samplers_in_place():
    model = torch.nn.Module()
    model.policy = Policy(_r1())
    model.heads = torch.nn.ModuleDict({"nav": Policy(_v15()),
                                       "stack": torch.nn.Sequential(_v15(), torch.nn.ReLU())})
    model.policy.diffusion.eval()
    model.policy.diffusion.note = "set by the user"
    originals = [model.policy.diffusion, model.heads["nav"].diffusion, model.heads["stack"][0]]
    linear = model.policy.action_out_proj
    assert flowmatch_fast.convert(model) is model
    converted = [model.policy.diffusion, model.heads["nav"].diffusion, model.heads["stack"][0]]
    assert [type(m) for m in converted] == [FlowMatching, FlowMatching1_5, FlowMatching1_5]
    assert model.policy.action_out_proj is linear
    for old, new in zip(originals, converted):
        for key, value in _public(old).items():  # the same attributes (and the user's)
            assert getattr(new, key) == value or key == "beta_dist", key
        assert new.training == old.training
    assert not hasattr(converted[0], "beta_dist")  # "uniform", as the original: none


@pytest.mark.parametrize("make, fields", [(_r1, (field,)), (_v15, (field, unguided))],
                         ids=["r1", "1.5"])
def test_a_converted_sampler_samples_bitwise_as_the_original(make, fields, device, case_rng,
                                                             fused_launches):
    seed = case_rng.randrange(2**31)
    model = Policy(make())
    original = copy.deepcopy(model.diffusion)
    flowmatch_fast.convert(model)
    results = []
    for fm in (model.diffusion, original):
        torch.manual_seed(seed)
        results.append(fm.sample(4, *fields, device=device, return_all_steps=True))
    assert_bitwise(results[0], results[1], f"seed={seed}")
    fused_launches.expect(len(results[0][1]) - 1, f"seed={seed}")


def test_a_sampler_passed_directly_comes_back_converted():
    original = _v15()
    new = flowmatch_fast.convert(original)
    assert type(new) is FlowMatching1_5 and type(original) is Original1_5
    assert (new.x_dims, new.use_classifier_free_guidance, new.inference_guidance_weight) == (
        [5, 3], True, 2.5)


def test_convert_is_idempotent():
    model = Policy(_r1())
    flowmatch_fast.convert(model)
    ours = model.diffusion
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flowmatch_fast.convert(model) is model and model.diffusion is ours
        assert flowmatch_fast.convert(ours) is ours


def test_our_options_pass_through():
    model = Policy(_r1())
    flowmatch_fast.convert(model, backend="torch", cuda_graph=True, max_graphs=3)
    fm = model.diffusion
    assert (fm.backend, fm.cuda_graph, fm.graph_cache.max_graphs) == ("torch", True, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        flowmatch_fast.convert(Policy(_r1()), backend="opencl")
    with pytest.raises(TypeError, match="unexpected keyword argument 'cuda_grpah'"):
        flowmatch_fast.convert(Policy(_r1()), cuda_grpah=True)


def test_the_checkpoint_still_loads_strictly():
    model = Policy(_v15())
    state = copy.deepcopy(model.state_dict())
    flowmatch_fast.convert(model)
    assert model.state_dict().keys() == state.keys()
    model.load_state_dict(state, strict=True)


def test_a_shared_sampler_stays_shared():
    shared = _r1()
    model = torch.nn.ModuleList([Policy(shared), Policy(shared)])
    flowmatch_fast.convert(model)
    assert model[0].diffusion is model[1].diffusion and type(model[0].diffusion) is FlowMatching


def test_a_class_of_that_name_with_state_is_left_with_a_warning():
    class FlowMatching(OriginalR1):  # a fork's sampler that learns something
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("sigma", torch.ones(1))

    FlowMatching.__module__ = OriginalR1.__module__
    model = Policy(FlowMatching(x_dims=3))
    with pytest.warns(UserWarning, match="holds parameters, buffers or submodules"):
        flowmatch_fast.convert(model)
    assert type(model.diffusion) is FlowMatching


def test_other_classes_are_not_touched_and_alpamayo_is_not_imported():
    class FlowMatchingLike(torch.nn.Module):
        __module__ = "alpamayo_r1.diffusion.other"

    model = torch.nn.Sequential(FlowMatchingLike(), FlowMatching1_5(x_dims=2))
    kept = list(model)
    flowmatch_fast.convert(model)
    assert list(model) == kept
    assert not any(name.split(".")[0] in ("alpamayo_r1", "alpamayo1_5") for name in sys.modules)
