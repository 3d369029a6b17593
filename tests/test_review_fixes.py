"""Edge cases found in review: each was a real defect once."""

import gc

import numpy as np
import pytest
import torch

from flowmatch_fast import FlowMatching
from flowmatch_fast.graph import GraphCache, field_key
from oracle import spec_sample


def test_strided_timesteps_are_copied_not_aliased(device):
    fm = FlowMatching(x_dims=3)
    base = torch.tensor([0.0, 9.0, 0.25, 9.0, 0.5, 9.0, 1.0])
    strided = base[::2]
    field = lambda *, x, t: torch.sin(x) + t  # noqa: E731
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
        FlowMatching(x_dims=2).sample(2, lambda *, x, t: x, timesteps=[0.0, float("nan"), 1.0])


def test_guidance_weight_attribute_is_only_read_by_guidance():
    fm = FlowMatching(x_dims=2, inference_guidance_weight=None)
    torch.manual_seed(0)
    out = fm.sample(3, lambda *, x, t: -x)
    torch.manual_seed(0)
    assert torch.equal(out, spec_sample(2, 3, lambda *, x, t: -x))


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


def test_extreme_and_numpy_shift():
    fm = FlowMatching(x_dims=2, num_inference_steps=4)
    for shift in (1e39, np.float32(2.0), 1e-30):
        _, grid = fm.sample(1, lambda *, x, t: x, shift=shift, return_all_steps=True)
        assert torch.isfinite(grid).all() and grid[0] == 0 and grid[-1] == 1
        assert bool((grid[1:] >= grid[:-1]).all())


def test_guided_weight_one_with_a_zero_dim_float64_field(device):
    fm = FlowMatching(x_dims=(3, 2), num_inference_steps=3)
    field = lambda *, x, t: torch.tensor(0.75, dtype=torch.float64, device=x.device)  # noqa: E731
    torch.manual_seed(2)
    plain = fm.sample(4, field, device=device)
    torch.manual_seed(2)
    guided = fm.sample(4, field, device=device, guidance=True, guidance_weight=1.0)
    assert plain.dtype == guided.dtype == torch.float32 and torch.equal(plain, guided)


def test_cache_pins_fields_that_cannot_be_weakly_referenced():
    class SlotField:
        __slots__ = ("scale",)

        def __init__(self, scale):
            self.scale = scale

        def __call__(self, *, x, t):
            return self.scale * x

    cache = GraphCache(max_graphs=4)
    f = SlotField(1.0)
    key, watch = field_key(f)
    cache.add((key,), watch, object)
    fid = id(f)
    del f, watch
    gc.collect()
    assert len(cache) == 1  # kept (and its field with it), so its id cannot be reused
    assert any(id(v) == fid for v in cache._pinned.values())
    cache.clear()
    assert len(cache) == 0 and not cache._pinned


def test_explicit_triton_on_a_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(RuntimeError, match="'triton' is not available on cuda"):
        FlowMatching(x_dims=2, backend="triton").sample(2, lambda *, x, t: x, device="cuda")


def test_shift_rejects_non_numbers():
    for bad in ("2", None.__class__, complex(1, 1)):
        with pytest.raises(ValueError, match="shift"):
            FlowMatching(x_dims=2).sample(1, lambda *, x, t: x, shift=bad)
