"""What the originals accept is accepted, with their meaning (issue 21, SPEC "Deliberate
differences"): ``inference_step=0`` / ``int_method=""`` mean the attribute, 0-dim tensor
temperatures and weights, fields returning Python numbers, Alpamayo 1.5's fields of two shapes,
configurations the originals construct; keys another Alpamayo variant knows pass silently.

Each case runs the SPEC's stand-in of the original class (``oracle.OriginalR1`` /
``oracle.Original1_5``) with the same arguments, and compares bitwise, on every backend pass
(plain torch, the Triton interpreter, the emulated CUDA kernels: ``fused_launches`` checks the
updates the kernels should take did run there).
"""

import warnings

import numpy as np
import pytest
import torch

from flowmatch_fast import FlowMatching
from flowmatch_fast.alpamayo1_5 import FlowMatching as FlowMatching1_5
from bitwise import assert_bitwise
from fields import smooth
from oracle import Original1_5, OriginalR1


def field(*, x, t):
    return smooth(x, t)


def unguided(*, x, t):
    return smooth(0.25 - 0.8 * x, t)


def _same(ours, original, seed, *args, **kwargs):
    """``sample(*args, **kwargs)`` of ours and of the original's stand-in, after the same seed."""
    results = []
    for fm in (ours, original):
        torch.manual_seed(seed)
        results.append(fm.sample(*args, **kwargs))
    assert_bitwise(results[0], results[1], f"seed={seed} {args[2:]} {kwargs}", nan_equal=True)
    return results[0]


def _pair(cls_ours, cls_original, *args, **kwargs):
    return cls_ours(*args, **kwargs), cls_original(*args, **kwargs)


# ------------------------------------------------------------- the originals' `or` fall-backs
@pytest.mark.parametrize("inference_step, int_method", [
    (0, None), (None, ""), (0, ""), (np.int64(0), None), (False, None), (3, "")])
def test_falsy_step_count_and_method_mean_the_attribute(device, inference_step, int_method,
                                                        case_rng, fused_launches):
    steps, seed = case_rng.randint(1, 5), case_rng.randrange(2**31)
    r1 = _pair(FlowMatching, OriginalR1, num_inference_steps=steps, x_dims=(5, 3))
    states, grid = _same(*r1, seed, 4, field, device, True, inference_step, int_method)
    assert grid.numel() == (inference_step or steps) + 1
    v15 = _pair(FlowMatching1_5, Original1_5, "euler", steps, 2.5, (5, 3), True)
    _same(*v15, seed, 4, field, unguided, device, False, inference_step, int_method)
    fused_launches.expect(2 * (inference_step or steps), f"seed={seed}")


def test_a_configuration_the_original_constructs_fails_only_where_it_is_used():
    # each of these constructs in the original; it fails (or not) where the value is used
    fm = FlowMatching(x_dims=2, int_method="sde", num_inference_steps=10.0,
                      train_timestep_sampler="logit_normal")
    with pytest.raises(ValueError, match="int_method must be one of .*got 'sde'"):
        fm.sample(2, field)
    with pytest.raises(TypeError, match="num_inference_steps must be an int, got float"):
        fm.sample(2, field, int_method="euler")
    with pytest.raises(ValueError, match="train_timestep_sampler must be one of .*'logit_normal'"):
        fm.construct_training_data(torch.zeros(2, 2))
    original = OriginalR1(x_dims=2, int_method="sde", num_inference_steps=10.0,
                          train_timestep_sampler="logit_normal")
    _same(fm, original, 3, 2, field, "cpu", False, 3, "euler")  # where nothing fails
    assert not hasattr(fm, "beta_dist") and fm.num_inference_steps == 10.0
    v15 = _pair(FlowMatching1_5, Original1_5, "sde", 0, x_dims=2)
    with pytest.raises(ValueError, match="int_method"):
        v15[0].sample(2, field)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        v15[0].sample(2, field, int_method="euler")
    _same(*v15, 4, 2, field, None, "cpu", True, 2, "euler")


def test_negative_counts_and_wrong_types_of_our_options_still_raise():
    fm = FlowMatching1_5(x_dims=2, num_inference_steps=-3)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got -3"):
        fm.sample(2, field)
    with pytest.raises(ValueError, match="inference_step must be >= 1, got -1"):
        fm.sample(2, field, inference_step=-1)
    with pytest.raises(TypeError, match="inference_step must be an int, got float"):
        fm.sample(2, field, inference_step=2.0)
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        FlowMatching(x_dims=2, cuda_graph="yes")
    with pytest.raises(ValueError, match="backend must be one of"):
        FlowMatching1_5(x_dims=2, backend="opencl")


# -------------------------------------------------------------- 0-dim tensors as scalars
TEMPERATURES = [torch.tensor(0.8), torch.tensor(0.8, dtype=torch.float64),
                torch.tensor(0.8, dtype=torch.bfloat16), torch.tensor(2), np.float32(0.8)]


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=repr)
def test_temperature_may_be_a_0_dim_tensor(device, temperature, case_rng, fused_launches):
    seed = case_rng.randrange(2**31)
    v15 = _pair(FlowMatching1_5, Original1_5, "euler", 3, 1.0, (5, 3))
    _same(*v15, seed, 4, field, None, device, True, temperature=temperature)
    fused_launches.expect(3, f"seed={seed}")


# Weights that are not Python floats: the original rounds `1 - w` in their own dtype.
WEIGHTS = [torch.tensor(0.1), torch.tensor(2.5), torch.tensor(-0.7, dtype=torch.bfloat16),
           torch.tensor(1 / 3, dtype=torch.float64), np.float32(0.1), torch.tensor(3)]
FIELD_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64),
                (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("weight", WEIGHTS, ids=repr)
@pytest.mark.parametrize("dtypes", FIELD_DTYPES, ids=lambda p: f"{p[0]}-{p[1]}")
def test_guidance_weight_may_be_a_0_dim_tensor(device, weight, dtypes, case_rng, fused_launches):
    seed = case_rng.randrange(2**31)
    vg = lambda *, x, t: field(x=x, t=t).to(dtypes[0])  # noqa: E731
    vu = lambda *, x, t: unguided(x=x, t=t).to(dtypes[1])  # noqa: E731
    v15 = _pair(FlowMatching1_5, Original1_5, "euler", 4, weight, (5, 3), True)
    ours = _same(*v15, seed, 4, vg, vu, device, True)
    fused_launches.expect(4, f"seed={seed}: the update of the mixed velocity")  # fused
    if weight is WEIGHTS[0] and dtypes[0] == torch.float64:  # the case tells the two apart
        torch.manual_seed(seed)
        as_float = Original1_5("euler", 4, float(weight), (5, 3), True).sample(4, vg, vu, device,
                                                                                True)
        assert not torch.equal(ours[0], as_float[0])


def test_r1_guidance_weight_attribute_may_be_a_0_dim_tensor():
    """R1's original never reads it; our guidance=True reads it as the number it holds."""
    outs = []
    for w in (torch.tensor(2.5), 2.5):
        torch.manual_seed(0)
        outs.append(FlowMatching(x_dims=3, inference_guidance_weight=w).sample(
            2, field, guidance=True))
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------ fields returning numbers
@pytest.mark.parametrize("number", [2.5, -3, 0.1, True], ids=repr)
def test_a_field_may_return_a_python_number(device, number, case_rng):
    seed = case_rng.randrange(2**31)
    r1 = _pair(FlowMatching, OriginalR1, x_dims=(5, 3), num_inference_steps=3)
    _same(*r1, seed, 4, lambda *, x, t: number, device, True)
    v15 = _pair(FlowMatching1_5, Original1_5, "euler", 3, 2.5, (5, 3))
    _same(*v15, seed, 4, lambda *, x, t: number, None, device, True)


@pytest.mark.parametrize("which", ["guided", "unguided", "both"])
@pytest.mark.parametrize("weight", [2.5, torch.tensor(0.1)], ids=repr)
def test_guidance_with_fields_returning_numbers(device, which, weight, case_rng):
    seed = case_rng.randrange(2**31)
    vg = (lambda *, x, t: 0.3) if which != "unguided" else field
    vu = (lambda *, x, t: -1.25) if which != "guided" else unguided
    v15 = _pair(FlowMatching1_5, Original1_5, "euler", 3, weight, (5, 3), True)
    _same(*v15, seed, 4, vg, vu, device, True)


# --------------------------------------------------------- Alpamayo 1.5's fields of two shapes
def _batch_independent(fn):
    """The field at the first row only: shape [1, *x_dims], broadcast over the batch."""
    return lambda *, x, t: fn(x=x[:1], t=t[:1])


@pytest.mark.parametrize("shapes", ["full-row", "row-full", "full-dims", "row-row"])
@pytest.mark.parametrize("dtypes", FIELD_DTYPES, ids=lambda p: f"{p[0]}-{p[1]}")
def test_guidance_fields_of_two_shapes_broadcast_as_the_original(device, shapes, dtypes,
                                                                 case_rng, fused_launches):
    x_dims = [case_rng.randint(1, 7) for _ in range(case_rng.randint(1, 3))]
    batch, steps = case_rng.randint(2, 6), case_rng.randint(1, 4)
    weight = case_rng.choice((2.5, 0.0, -0.7, 1.0))
    seed = case_rng.randrange(2**31)
    forms = {"full": lambda f: f, "row": _batch_independent,
             "dims": lambda f: (lambda *, x, t: f(x=x[0], t=t[0]))}  # [*x_dims], no batch dim
    g, u = shapes.split("-")
    vg = forms[g](lambda *, x, t: field(x=x, t=t).to(dtypes[0]))
    vu = forms[u](lambda *, x, t: unguided(x=x, t=t).to(dtypes[1]))
    v15 = _pair(FlowMatching1_5, Original1_5, "euler", steps, weight, x_dims, True)
    _same(*v15, seed, batch, vg, vu, device, True)
    # one launch a step: the fused mix of two fields of one shape and dtype, or the fused update
    # of the velocity PyTorch mixed (two shapes or dtypes)
    fused_launches.expect(steps, f"x_dims={x_dims} batch={batch} seed={seed}")


def test_a_mix_that_would_change_the_state_shape_raises():
    fm = FlowMatching1_5("euler", 2, 2.5, (4, 2), True)
    with pytest.raises(ValueError, match=r"step_fn returned a tensor of shape \(2, 2, 4, 2\)"):
        fm.sample(2, lambda *, x, t: x.expand(2, *x.shape), unguided)


@pytest.mark.gpu
def test_a_0_dim_cpu_tensor_field_on_a_cuda_state_is_a_scalar():
    r1 = _pair(FlowMatching, OriginalR1, x_dims=(5, 3), num_inference_steps=3)
    _same(*r1, 0, 4, lambda *, x, t: torch.tensor(0.5, dtype=torch.float64), "cuda", True)


# ---------------------------------------------------------------- keys, warnings (item 2)
def test_keys_any_alpamayo_variant_knows_pass_silently():
    rl_sample = dict(noise_level=0.7, samples_list=None, sde_type="sde", return_info=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r1 = _pair(FlowMatching, OriginalR1, x_dims=(5, 3), use_classifier_free_guidance=True,
                   some_config_key=1, temperature=0.5)
        _same(*r1, 1, 3, field, unguided_step_fn=unguided, dtype=torch.bfloat16,
              inference_guidance_weight=2.0, **rl_sample)
        v15 = _pair(FlowMatching1_5, Original1_5, "euler", 3, 1.5, (5, 3), True,
                    train_timestep_sampler="beta", train_ignore_guidance_rate=0.1, graph=None)
        _same(*v15, 1, 3, field, unguided, dtype=torch.bfloat16, train_timestep_sampler="beta",
              guidance_scale=3.0, **rl_sample)


@pytest.mark.parametrize("name, option", [("guidence", "guidance"), ("noises", "noise"),
                                          ("time_steps", "timesteps"), ("warm_up", "warmup")])
def test_a_keyword_close_to_an_option_of_ours_warns_once(name, option):
    fm = FlowMatching(x_dims=2, num_inference_steps=2)
    with pytest.warns(UserWarning, match=f"FlowMatching.sample ignores .*'{name}'.*'{option}'"):
        fm.sample(2, field, **{name: 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.sample(2, field, **{name: 1})
