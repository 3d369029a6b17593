"""Fields the fused kernels cannot read as raw strided memory take the reference op and match
the original: lazily negated views, sparse tensors, views spanning 2**31 elements or more."""

import pytest
import torch

from flowmatch_fast import FlowMatching, integrators
from flowmatch_fast.alpamayo1_5 import FlowMatching as FlowMatching1_5
from flowmatch_fast.kernels import reference
from flowmatch_fast.kernels.triton import launch as triton_euler
from flowmatch_fast.kernels.contract import Guidance, Stage, TimeGrid, kernel_readable, kernel_supports
from oracle import spec_sample, spec_sample_1_5


def negated_view(*, x, t):
    v = torch.sin(x) + t
    return torch.complex(0 * v, v).conj().imag  # -v, stored as v with the negative bit set


def sparse_field(*, x, t):
    return (torch.sin(x) * t).to_sparse()


def test_kernels_get_negated_views_resolved_and_no_sparse_fields():
    v = torch.randn(2, 3)
    x = torch.zeros(2, 3)
    neg = torch.complex(0 * v, v).conj().imag
    assert neg.is_neg() and torch.equal(neg, -v)
    readable = kernel_readable(neg)
    assert not readable.is_neg() and torch.equal(readable, -v)
    assert kernel_readable(v) is v  # no copy for an ordinary field
    assert kernel_supports(x, v) and not kernel_supports(x, v.to_sparse())


def _check_euler_matches_the_original(field, device, return_all_steps):
    fm = FlowMatching(x_dims=(5, 3), num_inference_steps=4)
    torch.manual_seed(0)
    got = fm.sample(4, field, device=device, return_all_steps=return_all_steps)
    torch.manual_seed(0)
    want = spec_sample((5, 3), 4, field, device=device, steps=4, return_all_steps=return_all_steps)
    for g, w in zip(got, want) if return_all_steps else [(got, want)]:
        assert g.layout == torch.strided and torch.equal(g, w)


@pytest.mark.parametrize("return_all_steps", [False, True])
def test_negated_views_match_the_original(device, return_all_steps):
    _check_euler_matches_the_original(negated_view, device, return_all_steps)


@pytest.mark.parametrize("return_all_steps", [False, True])
def test_sparse_fields_match_the_original(return_all_steps):
    # CPU only: PyTorch's own CUDA sparse ops are not the subject here, the layout check is
    _check_euler_matches_the_original(sparse_field, "cpu", return_all_steps)


@pytest.mark.parametrize("method", ["midpoint", "rk4"])
def test_negated_views_in_stages_and_guidance_match_plain_torch(device, method):
    opts = dict(device=device, int_method=method, guidance=True, guidance_weight=2.5)

    def plain_field(*, x, t):
        return -(torch.sin(x) + t)

    torch.manual_seed(1)
    got = FlowMatching(x_dims=(5, 3), num_inference_steps=3).sample(4, negated_view, **opts)
    torch.manual_seed(1)
    want = FlowMatching(x_dims=(5, 3), num_inference_steps=3, backend="torch").sample(
        4, plain_field, **opts)
    assert torch.equal(got, want)


def test_guided_weight_one_with_a_zero_dim_float64_field(device):
    fm = FlowMatching(x_dims=(3, 2), num_inference_steps=3)
    field = lambda *, x, t: torch.tensor(0.75, dtype=torch.float64, device=x.device)  # noqa: E731
    torch.manual_seed(2)
    plain = fm.sample(4, field, device=device)
    torch.manual_seed(2)
    guided = fm.sample(4, field, device=device, guidance=True, guidance_weight=1.0)
    assert plain.dtype == guided.dtype == torch.float32 and torch.equal(plain, guided)


def test_offset_rule_counts_a_field_view_by_its_extent():
    out = torch.empty(2, 8, device="meta")
    wide = torch.empty_strided((2, 8), (2**31 // 2, 1), device="meta")  # 16 elements, 2**31 apart
    assert triton_euler.extent(wide) == 2**30 + 8 and triton_euler.offsets_fit_int32(out, None, wide)
    wider = torch.empty_strided((2, 8), (2**31, 1), device="meta")
    assert not triton_euler.offsets_fit_int32(out, None, wider)
    assert not triton_euler.offsets_fit_int32(out, None, None, wider)  # e.g. an accumulator
    traj = torch.empty_strided((2, 8), (2**31, 1), device="meta")
    assert not triton_euler.offsets_fit_int32(out, traj)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a field past the 32-bit offset limit was handed to the kernel")


def test_fields_past_the_offset_limit_take_the_reference(monkeypatch):
    monkeypatch.setattr(triton_euler, "_INT32_LIMIT", 1000)  # stands for 2**31
    monkeypatch.setattr(triton_euler, "_kernels", lambda: (_NoLaunch(), _NoLaunch()))
    x = torch.randn(2, 8)
    v = torch.randn(2, 800)[:, ::100]  # 16 elements spanning 1501
    grid = TimeGrid(torch.linspace(0, 1, 3), 2, x.dim())
    assert torch.equal(integrators.euler_step(triton_euler, x, v, grid, 1),
                       reference.euler_step(x, v, grid, 1))
    got = integrators.stage_step(triton_euler, x, v, grid, 1, Stage("start", 0.5, write_acc=True))
    want = reference.stage_step(x, v, grid, 1, Stage("start", 0.5, write_acc=True))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_an_unguided_field_past_the_offset_limit_takes_the_reference_mix(monkeypatch):
    monkeypatch.setattr(triton_euler, "_INT32_LIMIT", 1000)  # stands for 2**31
    monkeypatch.setattr(triton_euler, "_kernels", lambda: (_NoLaunch(), _NoLaunch()))
    x = torch.randn(2, 8)
    v = torch.randn(2, 8, dtype=torch.bfloat16)
    vu = torch.randn(2, 800, dtype=torch.bfloat16)[:, ::100]  # 16 elements spanning 1501
    grid = TimeGrid(torch.linspace(0, 1, 3), 2, x.dim())
    for w in (2.5, 1.0):
        assert torch.equal(
            integrators.euler_step(triton_euler, x, v, grid, 1, None, None, vu, Guidance("mix", w)),
            reference.euler_step(x, v, grid, 1, None, None, vu, Guidance("mix", w)))
        stage = Stage("start", 0.5, write_acc=True)
        got = integrators.stage_step(triton_euler, x, v, grid, 1, stage, k_uncond=vu,
                                     guidance=Guidance("mix", w))
        want = reference.stage_step(x, v, grid, 1, stage, k_uncond=vu, guidance=Guidance("mix", w))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_negated_and_sparse_fields_under_1_5_guidance_match_the_original(device, method):
    """Either field of Alpamayo 1.5's mix may be a view the kernels cannot read as it is."""
    def smooth(*, x, t):
        return torch.sin(x) + t

    pairs = [(negated_view, smooth), (smooth, negated_view)]
    if device.type == "cpu":  # PyTorch's own CUDA sparse ops are not the subject here
        pairs.append((sparse_field, smooth))
    for vg, vu in pairs:
        fm = FlowMatching1_5(method, 3, 2.5, (5, 3), True)
        torch.manual_seed(0)
        got = fm.sample(4, vg, vu, device)
        torch.manual_seed(0)
        if method == "euler":
            want = spec_sample_1_5((5, 3), 4, vg, vu, device, 3, guidance=True, weight=2.5)
        else:  # the other methods: against plain torch's reference ops
            want = FlowMatching1_5(method, 3, 2.5, (5, 3), True, backend="torch").sample(
                4, vg, vu, device)
        assert got.layout == torch.strided and torch.equal(got, want), (vg, vu)


def test_a_sparse_unguided_field_fails_as_in_the_original():
    """``(1 - w) * vu + w * vg`` with ``vu`` sparse is PyTorch's error in the original: ours takes
    the same reference expression (no fused kernel reads a sparse tensor)."""
    def smooth(*, x, t):
        return torch.sin(x) + t

    for run in ("ours", "spec"):
        with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
            if run == "ours":
                FlowMatching1_5("euler", 3, 2.5, (5, 3), True).sample(4, smooth, sparse_field)
            else:
                spec_sample_1_5((5, 3), 4, smooth, sparse_field, steps=3, guidance=True,
                                weight=2.5)
