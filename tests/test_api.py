"""The drop-in surface: constructor, attributes, module behaviour, errors, training helpers."""

import inspect

import pytest
import torch

from flowmatch_fast import BaseDiffusion, FlowMatching, StepFn
from oracle import spec_sample, spec_training_data


def test_public_names():
    assert issubclass(FlowMatching, BaseDiffusion)
    assert issubclass(FlowMatching, torch.nn.Module)
    assert getattr(StepFn, "_is_protocol", False)


def test_constructor_positional_order_and_attributes():
    fm = FlowMatching("euler", "uniform", 7, 0.2, 3.5, x_dims=(64, 2))
    assert fm.int_method == "euler"
    assert fm.train_timestep_sampler == "uniform"
    assert fm.num_inference_steps == 7
    assert fm.train_ignore_guidance_rate == 0.2
    assert fm.inference_guidance_weight == 3.5
    assert fm.x_dims == [64, 2]
    defaults = FlowMatching(x_dims=128)
    assert (defaults.int_method, defaults.train_timestep_sampler, defaults.num_inference_steps) == (
        "euler", "beta", 10)
    assert defaults.train_ignore_guidance_rate == 0.1 and defaults.inference_guidance_weight == 1.0
    assert defaults.x_dims == [128]
    assert FlowMatching(x_dims=[4, 4, 3]).x_dims == [4, 4, 3]


def test_sample_signature_matches_original():
    params = list(inspect.signature(FlowMatching.sample).parameters)
    assert params[:7] == ["self", "batch_size", "step_fn", "device", "return_all_steps",
                          "inference_step", "int_method"]
    sig = inspect.signature(FlowMatching.sample)
    assert sig.parameters["device"].default == torch.device("cpu")
    assert sig.parameters["return_all_steps"].default is False


def test_module_has_no_state_and_ignores_dtype_casts():
    fm = FlowMatching(x_dims=(8, 2))
    assert dict(fm.state_dict()) == {}
    assert list(fm.parameters()) == [] and list(fm.buffers()) == []
    field = lambda *, x, t: torch.cos(x) + t  # noqa: E731
    torch.manual_seed(1)
    before = fm.sample(3, field)
    fm.to(dtype=torch.bfloat16)
    torch.manual_seed(1)
    after = fm.sample(3, field)
    assert torch.equal(before, after) and after.dtype == torch.float32
    host = torch.nn.Module()
    host.diffusion = FlowMatching(x_dims=(8, 2))
    host.load_state_dict({}, strict=True)


def test_sampling_does_not_track_gradients():
    fm = FlowMatching(x_dims=4)
    w = torch.ones(4, requires_grad=True)
    out = fm.sample(2, lambda *, x, t: x * w)
    assert not out.requires_grad


def test_no_tensor_handed_out_is_written_again():
    """States given to step_fn and tensors returned are never mutated afterwards."""
    seen = []

    def field(*, x, t):
        assert x.is_contiguous()
        seen.append((x, x.clone(), t, t.clone()))
        return torch.sin(x)

    fm = FlowMatching(x_dims=(5, 3), num_inference_steps=6)
    states, grid = fm.sample(4, field, return_all_steps=True)
    snapshot = (states.clone(), grid.clone())
    fm.sample(4, field, return_all_steps=True)  # another call must not touch the first's results
    for x, x0, t, t0 in seen:
        assert torch.equal(x, x0) and torch.equal(t, t0)
    assert torch.equal(states, snapshot[0]) and torch.equal(grid, snapshot[1])


def test_time_argument_shape_and_dtype():
    shapes = []
    fm = FlowMatching(x_dims=(3, 4, 5), num_inference_steps=4)
    fm.sample(6, lambda *, x, t: shapes.append((tuple(t.shape), t.dtype, t[0].item())) or x)
    assert [s[:2] for s in shapes] == [((6, 1, 1, 1), torch.float32)] * 4
    assert [s[2] for s in shapes] == torch.linspace(0, 1, 5)[:-1].tolist()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("x_dims", [[], (), [4, 0], 0, -3])
def test_bad_x_dims(x_dims):
    with pytest.raises(ValueError, match="x_dims"):
        FlowMatching(x_dims=x_dims)


def test_bad_counts():
    fm = FlowMatching(x_dims=2, num_inference_steps=0)  # the original constructs it too
    field = lambda *, x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        fm.sample(2, field)  # where it is used
    with pytest.raises(ValueError, match="inference_step must be >= 1, got -1"):
        fm.sample(2, field, inference_step=-1)
    with pytest.raises(ValueError, match="batch_size must be >= 0, got -1"):
        fm.sample(-1, field, inference_step=2)


def test_bad_int_method():
    fm = FlowMatching(x_dims=2, int_method="sde")  # the original constructs it, fails to sample
    with pytest.raises(ValueError, match="int_method must be one of .*; got 'sde'"):
        fm.sample(2, lambda *, x, t: x)
    with pytest.raises(ValueError, match="'bogus'"):
        FlowMatching(x_dims=2).sample(2, lambda *, x, t: x, int_method="bogus")


def test_bad_backend_name(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        FlowMatching(x_dims=2, backend="opencl")
    monkeypatch.setenv("FLOWMATCH_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="FLOWMATCH_FAST_BACKEND"):
        FlowMatching(x_dims=2)


def test_field_returning_non_tensor():
    fm = FlowMatching(x_dims=2)
    with pytest.raises(TypeError, match="must return a torch.Tensor or a real number, got list"):
        fm.sample(2, lambda *, x, t: [0.0, 1.0])


@pytest.mark.parametrize("shape", [(3, 2), (2, 1, 2), (2, 4)])
def test_field_with_wrong_shape(shape):
    fm = FlowMatching(x_dims=2)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)") as err:
        fm.sample(2, lambda *, x, t: torch.zeros(shape))
    assert str(tuple(shape)) in str(err.value)


def test_field_broadcast_shapes_accepted():
    fm = FlowMatching(x_dims=(4, 2), num_inference_steps=2)
    for shape in [(1, 4, 2), (4, 2), (2,), (1, 1, 1)]:
        torch.manual_seed(0)
        out = fm.sample(3, lambda *, x, t: torch.ones(shape))
        torch.manual_seed(0)
        ref = spec_sample((4, 2), 3, lambda *, x, t: torch.ones(shape), steps=2)
        assert torch.equal(out, ref)


def test_field_on_wrong_device():
    fm = FlowMatching(x_dims=2)
    with pytest.raises(ValueError, match="meta.*cpu"):
        fm.sample(2, lambda *, x, t: torch.zeros(2, 2, device="meta"))


def test_nan_and_inf_propagate():
    fm = FlowMatching(x_dims=3, num_inference_steps=2)
    out = fm.sample(2, lambda *, x, t: torch.tensor([float("nan"), float("inf"), 1.0]))
    assert out[:, 0].isnan().all() and out[:, 1].isinf().all() and out[:, 2].isfinite().all()


def test_unavailable_backend_is_an_error_with_the_fix(monkeypatch):
    monkeypatch.delenv("FLOWMATCH_FAST_CUDA_EMULATE", raising=False)  # the emulated pass sets it
    fm = FlowMatching(x_dims=2, backend="cuda")
    with pytest.raises(RuntimeError, match="'cuda' is not available on cpu"):
        fm.sample(2, lambda *, x, t: x)


# ----------------------------------------------------------------------------- training helpers
@pytest.mark.parametrize("sampler", ["beta", "uniform"])
@pytest.mark.parametrize("shape", [(5, 64, 2), (3, 7), (2, 4, 4, 3)])
def test_construct_training_data_reproduces_the_original(sampler, shape):
    fm = FlowMatching(train_timestep_sampler=sampler, x_dims=shape[1:])
    x = torch.randn(shape)
    torch.manual_seed(11)
    data = fm.construct_training_data(x)
    torch.manual_seed(11)
    t, noise, noisy = spec_training_data(x, sampler)
    assert set(data) == {"x", "noisy_x", "timesteps", "noise", "is_drop_guidance"}
    assert data["is_drop_guidance"] is None and data["x"] is x
    assert data["timesteps"].shape == (shape[0],) + (1,) * (len(shape) - 1)
    assert torch.equal(data["timesteps"], t)
    assert torch.equal(data["noise"], noise) and torch.equal(data["noisy_x"], noisy)
    if sampler == "beta":
        assert ((t > 0) & (t <= 0.999)).all()


def test_compute_loss_from_pred():
    fm = FlowMatching(x_dims=(4, 2))
    x = torch.randn(3, 4, 2)
    data = fm.construct_training_data(x)
    pred = torch.randn(3, 4, 2, dtype=torch.bfloat16, requires_grad=True)
    loss = fm.compute_loss_from_pred(data, pred)
    target = (data["x"] - data["noise"]).to(torch.bfloat16)
    assert torch.equal(loss, torch.nn.functional.mse_loss(target, pred))
    loss.backward()
    assert pred.grad is not None
