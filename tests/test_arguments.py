"""Argument handling: our options are type-checked, the original's loose ones keep working."""

import warnings

import numpy as np
import pytest
import torch

from flowmatch_fast import FlowMatching, arguments, sampling
from flowmatch_fast.alpamayo1_5 import FlowMatching as FlowMatching1_5
from oracle import spec_sample, spec_sample_1_5


def field(*, x, t):
    return torch.sin(x) + t


@pytest.mark.parametrize("bad", ["no", 1, None, np.bool_(True)])
def test_cuda_graph_must_be_a_bool(bad):
    with pytest.raises(TypeError, match=f"cuda_graph must be True or False, got {type(bad).__name__}"):
        FlowMatching(x_dims=2, cuda_graph=bad)
    if bad is not None:  # None in sample() means the constructor's setting
        with pytest.raises(TypeError, match="cuda_graph must be True or False"):
            FlowMatching(x_dims=2).sample(2, field, cuda_graph=bad)


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_guidance_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="guidance must be True or False"):
        FlowMatching(x_dims=2).sample(2, field, guidance=bad)


@pytest.mark.parametrize("bad", ["2", True, torch.tensor(2.0), complex(2, 0)])
def test_guidance_weight_must_be_a_real_number(bad):
    with pytest.raises(TypeError, match="guidance_weight must be a real number, got"):
        FlowMatching(x_dims=2).sample(2, field, guidance=True, guidance_weight=bad)
    if not isinstance(bad, torch.Tensor):  # the original's attribute takes a 0-dim tensor
        with pytest.raises(TypeError, match="inference_guidance_weight must be a real number"):
            FlowMatching(x_dims=2, inference_guidance_weight=bad).sample(2, field, guidance=True)


def test_real_numbers_of_any_kind_are_weights():
    fm = FlowMatching(x_dims=2, num_inference_steps=3)
    outs = []
    for w in (2, 2.0, np.float32(2.0), np.int64(2)):
        torch.manual_seed(0)
        outs.append(fm.sample(2, field, guidance=True, guidance_weight=w))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_guidance_weight_attribute_is_only_read_by_guidance():
    fm = FlowMatching(x_dims=2, inference_guidance_weight=None)
    torch.manual_seed(0)
    out = fm.sample(3, lambda *, x, t: -x)
    torch.manual_seed(0)
    assert torch.equal(out, spec_sample(2, 3, lambda *, x, t: -x))


@pytest.mark.parametrize("shift", [1e-30, 1e30, 1e-12])
def test_shift_with_zero_length_steps_is_rejected(shift):
    with pytest.raises(ValueError, match="not strictly increasing"):
        FlowMatching(x_dims=2, num_inference_steps=4).sample(1, field, shift=shift)


def test_extreme_but_usable_and_numpy_shifts():
    fm = FlowMatching(x_dims=2, num_inference_steps=4)
    for shift in (1e3, np.float32(2.0), 1e-3):
        _, grid = fm.sample(1, field, shift=shift, return_all_steps=True)
        assert grid[0] == 0 and grid[-1] == 1 and bool((grid[1:] > grid[:-1]).all())


def test_shift_rejects_non_numbers():
    for bad in ("2", None.__class__, complex(1, 1)):
        with pytest.raises(ValueError, match="shift"):
            FlowMatching(x_dims=2).sample(1, field, shift=bad)


def test_device_none_is_the_default_device():
    fm = FlowMatching(x_dims=(3, 2), num_inference_steps=3)
    torch.manual_seed(4)
    got = fm.sample(2, field, device=None)
    torch.manual_seed(4)
    want = spec_sample((3, 2), 2, field, device=None, steps=3)
    assert got.device == torch.get_default_device() and torch.equal(got, want)


def test_a_misspelt_option_is_accepted_with_one_warning_per_name():
    fm = FlowMatching(x_dims=2, num_inference_steps=2)
    with pytest.warns(UserWarning, match="unknown keyword argument 'cuda_grpah', as the original "
                                         "does; did you mean flowmatch_fast's option 'cuda_graph'"):
        torch.manual_seed(1)
        out = fm.sample(2, field, cuda_grpah=True)
    torch.manual_seed(1)
    assert torch.equal(out, spec_sample(2, 2, field, steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.sample(2, field, cuda_grpah=True)  # once per name
    with pytest.warns(UserWarning, match="FlowMatching ignores .*'backnd'.*'backend'"):
        FlowMatching(x_dims=2, backnd="torch")


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    same = arguments.same_device
    assert same(torch.device("cuda", 1), torch.device("cuda"))
    assert not same(torch.device("cuda", 0), torch.device("cuda"))
    assert not same(torch.device("cuda", 1), torch.device("cuda", 0))
    assert same(torch.device("cpu"), torch.device("cpu"))
    assert not same(torch.device("cpu"), torch.device("cuda"))


def test_numpy_integers_are_ints():
    fm = FlowMatching(x_dims=(np.int64(4), np.int32(2)), num_inference_steps=np.int64(3))
    assert fm.x_dims == [4, 2] and all(type(d) is int for d in fm.x_dims)
    torch.manual_seed(1)
    out = fm.sample(np.int64(5), lambda *, x, t: x * t, inference_step=np.int32(4))
    torch.manual_seed(1)
    assert torch.equal(out, spec_sample((4, 2), 5, lambda *, x, t: x * t, steps=4))
    with pytest.raises(TypeError, match="batch_size must be an int"):
        fm.sample(2.0, lambda *, x, t: x)
    with pytest.raises(TypeError, match="batch_size"):
        fm.sample(True, lambda *, x, t: x)


def test_strided_timesteps_are_copied_not_aliased(device):
    fm = FlowMatching(x_dims=3)
    base = torch.tensor([0.0, 9.0, 0.25, 9.0, 0.5, 9.0, 1.0])
    strided = base[::2]
    torch.manual_seed(0)
    a, grid_a = fm.sample(2, field, device=device, timesteps=strided, return_all_steps=True)
    torch.manual_seed(0)
    b, _ = fm.sample(2, field, device=device, timesteps=strided.contiguous(), return_all_steps=True)
    assert torch.equal(a, b)
    if grid_a.device == base.device:
        assert grid_a.data_ptr() not in range(base.data_ptr(), base.data_ptr() + 7 * 4)
    base.fill_(-1.0)  # the caller changing their tensor later must not change our results
    assert grid_a[0].item() == 0.0


def test_nan_in_timesteps_is_a_clear_error():
    with pytest.raises(ValueError, match="strictly increasing"):
        FlowMatching(x_dims=2).sample(2, field, timesteps=[0.0, float("nan"), 1.0])


def test_explicit_triton_on_a_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(RuntimeError, match="'triton' is not available on cuda"):
        FlowMatching(x_dims=2, backend="triton").sample(2, field, device="cuda")


@pytest.mark.gpu
def test_timesteps_noise_and_generator_on_the_current_device_with_device_cuda():
    fm = FlowMatching(x_dims=(3, 2))
    here = torch.device("cuda", torch.cuda.current_device())
    grid = torch.tensor([0.0, 0.5, 1.0], device=here)
    noise = torch.randn(2, 3, 2, device=here)
    gen = torch.Generator(device=here).manual_seed(0)
    a = fm.sample(2, field, device="cuda", timesteps=grid, noise=noise)
    b = fm.sample(2, field, device="cuda", timesteps=[0.0, 0.5, 1.0], noise=noise)
    assert torch.equal(a, b)
    fm.sample(2, field, device="cuda", generator=gen)


@pytest.mark.gpu(devices=2)
def test_tensors_and_generators_on_another_index_are_refused():
    fm = FlowMatching(x_dims=(3, 2))
    with torch.cuda.device(0):
        with pytest.raises(ValueError, match="generator is on cuda:1"):
            fm.sample(2, field, device="cuda", generator=torch.Generator(device="cuda:1"))
        with pytest.raises(ValueError, match="timesteps is on cuda:1"):
            fm.sample(2, field, device="cuda",
                      timesteps=torch.tensor([0.0, 1.0], device="cuda:1"))
        with pytest.raises(ValueError, match="noise is on cuda:1"):
            fm.sample(2, field, device="cuda", noise=torch.zeros(2, 3, 2, device="cuda:1"))


# ------------------------------------------------------------- Alpamayo 1.5's class
def unguided_field(*, x, t):
    return torch.cos(x) - t


@pytest.mark.parametrize("bad", ["no", 1, np.bool_(True)])
def test_cuda_graph_of_the_1_5_class_must_be_a_bool(bad):
    with pytest.raises(TypeError, match=f"cuda_graph must be True or False, got {type(bad).__name__}"):
        FlowMatching1_5(x_dims=2, cuda_graph=bad)
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        FlowMatching1_5(x_dims=2).sample(2, field, cuda_graph=bad)


@pytest.mark.parametrize("bad", ["hot", True, torch.tensor([0.5]), torch.tensor(1j)])
def test_temperature_and_weight_of_the_1_5_class_must_be_real_numbers(bad):
    fm = FlowMatching1_5(x_dims=2, use_classifier_free_guidance=True)
    with pytest.raises(TypeError, match="temperature must be a real number or a 0-dim tensor, got"):
        fm.sample(2, field, unguided_field, temperature=bad)
    with pytest.raises(TypeError, match="inference_guidance_weight must be a real number or a "
                                        "0-dim tensor, got"):
        fm.sample(2, field, unguided_field, inference_guidance_weight=bad)


def test_a_misspelt_option_of_the_1_5_class_is_accepted_with_one_warning_per_name():
    fm = FlowMatching1_5("euler", 2, 2.5, 2, True)
    with pytest.warns(UserWarning, match="alpamayo1_5.FlowMatching.sample ignores the unknown "
                                         "keyword argument 'cuda_grpah'") as record:
        torch.manual_seed(1)
        out = fm.sample(2, field, unguided_field, cuda_grpah=True)
    assert record[0].filename == __file__  # points at the caller
    torch.manual_seed(1)
    assert torch.equal(out, spec_sample_1_5(2, 2, field, unguided_field, steps=2, guidance=True,
                                            weight=2.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.sample(2, field, unguided_field, cuda_grpah=True)  # once per name
    with pytest.warns(UserWarning, match="alpamayo1_5.FlowMatching ignores the unknown keyword "
                                         "argument 'max_graph'") as record:
        FlowMatching1_5("euler", 2, 1.0, 2, max_graph=1)
    assert record[0].filename == __file__


def test_device_none_is_the_default_device_for_the_1_5_class():
    fm = FlowMatching1_5("euler", 3, 2.5, (3, 2), True)
    torch.manual_seed(4)
    got = fm.sample(2, field, unguided_field, device=None)
    torch.manual_seed(4)
    want = spec_sample_1_5((3, 2), 2, field, unguided_field, None, 3, guidance=True, weight=2.5)
    assert got.device == torch.get_default_device() and torch.equal(got, want)


def test_the_1_5_class_rejects_a_shift_with_zero_length_steps():
    with pytest.raises(ValueError, match="not strictly increasing"):
        FlowMatching1_5("euler", 4, 1.0, 2).sample(1, field, shift=1e30)
