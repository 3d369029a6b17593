"""How the tests compare our results with the oracle's: bitwise, with shape, dtype and device."""

import pytest
import torch

from fields import make_field
from flowmatch_fast import FlowMatching
from oracle import spec_sample


def assert_bitwise(ours, ref, msg, nan_equal=False):
    """``ours`` equals ``ref`` bit for bit (a ``(states, grid)`` pair: both parts, the states
    contiguous). ``nan_equal``: NaN in the same places counts as equal (for inf/NaN fields)."""
    if isinstance(ref, tuple):
        assert isinstance(ours, tuple) and len(ours) == 2, msg
        assert ours[0].is_contiguous(), msg
        assert_bitwise(ours[1], ref[1], msg + " (grid)", nan_equal)
        ours, ref = ours[0], ref[0]
    assert ours.shape == ref.shape, f"{msg}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{msg}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.device == ref.device, f"{msg}: device {ours.device} != {ref.device}"
    if nan_equal:
        nan = ours.isnan()
        assert torch.equal(nan, ref.isnan()), f"{msg}: NaNs in other places"
        ours, ref = ours.masked_fill(nan, 0), ref.masked_fill(nan, 0)
    if not torch.equal(ours, ref):
        diff = (ours.double() - ref.double()).abs().nan_to_num(0, 0, 0).max().item()
        pytest.fail(f"{msg}: not bitwise equal (max abs diff {diff:.3g})")


def sample_both(x_dims, batch, steps, layout, dtype, device, seed, return_all_steps):
    """(ours, the SPEC's) ``sample`` under the same seed, each with a fresh ``make_field``."""
    fm = FlowMatching(x_dims=x_dims, num_inference_steps=steps)
    torch.manual_seed(seed)
    ours = fm.sample(batch, make_field(layout, dtype, fm.x_dims, seed), device=device,
                     return_all_steps=return_all_steps)
    torch.manual_seed(seed)
    ref = spec_sample(x_dims, batch, make_field(layout, dtype, fm.x_dims, seed), device=device,
                      steps=steps, return_all_steps=return_all_steps)
    return ours, ref
