"""The torch.library ops of every fused backend (flowmatch_fast/ops.py) pass
``torch.library.opcheck`` (schema, fake, autograd registration, AOT dispatch), as
pytorch/extension-cpp tests its ops; their fakes reject buffers the kernels cannot write.

Run wherever the backend runs on CPU tensors: Triton under TRITON_INTERPRET=1, the CUDA kernels
under their host emulation (the extension built); on a GPU the same cases on CUDA tensors.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flowmatch_fast import backends, ops
from flowmatch_fast.kernels.cuda.loader import EMULATE_ENV


@pytest.fixture(params=[pytest.param((name, dev), id=f"{name}-{dev}",
                                     marks=[pytest.mark.gpu] if dev == "cuda" else [])
                        for name in sorted(ops.LAUNCHERS) for dev in ("cpu", "cuda")])
def op_target(request, monkeypatch):
    name, dev = request.param
    if name == "cuda" and dev == "cpu":
        monkeypatch.setenv(EMULATE_ENV, "1")
    reason = backends.unavailable_reason(name, torch.device(dev))
    if reason is not None:
        pytest.skip(reason)
    return name, torch.device(dev)


def _euler_args(device, guidance, rows=3, dims=(5, 2)):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, *dims, generator=gen).to(device)
    v = torch.randn(rows, *dims, generator=gen).to(device, torch.bfloat16)
    vu = torch.randn(rows, *dims, generator=gen).to(device, torch.bfloat16) if guidance else None
    out_rows = 2 * rows if guidance == "batch" else rows
    out = torch.empty(out_rows, *dims, device=device)
    traj = torch.empty(rows, 4, *dims, device=device)[:, 2]
    values = torch.linspace(0, 1, 4, device=device)
    return x, v, vu, values, 1, out, traj, 2.5, guidance == "mix"


@pytest.mark.parametrize("guidance", [None, "batch", "mix"])
def test_euler_ops_pass_opcheck(op_target, guidance):
    name, device = op_target
    op = getattr(torch.ops.flowmatch_fast, f"{name}_euler_step")
    torch.library.opcheck(op, _euler_args(device, guidance))


@pytest.mark.parametrize("guidance", [None, "mix"])
def test_stage_ops_pass_opcheck(op_target, guidance):
    name, device = op_target
    x, k, ku, values, step, out, traj, w, mix = _euler_args(device, guidance)
    acc = torch.randn(x.shape).to(device)
    acc_out = torch.empty(x.shape, device=device)
    op = getattr(torch.ops.flowmatch_fast, f"{name}_stage_step")
    torch.library.opcheck(op, (x, k, ku, acc, values, step, 0.5, 2.0, False, out, acc_out, traj,
                               w, mix))


@pytest.mark.parametrize("name", sorted(ops.LAUNCHERS))
def test_fakes_reject_buffers_the_kernels_cannot_write(name):
    assert ops.REGISTERED
    euler = getattr(torch.ops.flowmatch_fast, f"{name}_euler_step")
    stage = getattr(torch.ops.flowmatch_fast, f"{name}_stage_step")
    with FakeTensorMode():
        x, v, vu, values, step, out, traj, w, mix = _euler_args("cpu", None)
        euler(x, v, vu, values, step, out, traj, w, mix)  # the contract's buffers: accepted
        with pytest.raises(ValueError, match="1 or 2 copies of the state"):
            euler(x, v, vu, values, step, torch.empty(3 * x.shape[0], *x.shape[1:]), traj, w, mix)
        with pytest.raises(ValueError, match="float32/float64"):
            euler(x, v, vu, values, step, out.to(torch.bfloat16), traj, w, mix)
        with pytest.raises(ValueError, match="the state's shape"):
            stage(x, v, vu, x[:1], values, step, 0.5, 1.0, False, out, None, traj, w, mix)


@pytest.mark.parametrize("guidance", [None, "mix"])
@pytest.mark.parametrize("replay", [False, True])
def test_sde_ops_pass_opcheck(op_target, guidance, replay):
    from flowmatch_fast.sde import sde_grid

    name, device = op_target
    x, v, vu, _values, _step, out, traj, w, mix = _euler_args(device, guidance)
    table = sde_grid([0.0, 0.25, 0.6, 1.0], 0.7, device).table
    noise = torch.randn(x.shape).to(device)
    lp = torch.empty(x.shape, device=device)
    op = getattr(torch.ops.flowmatch_fast, f"{name}_sde_step")
    torch.library.opcheck(op, (x, v, vu, table, 1, noise, replay, None if replay else out, traj,
                               lp, w, mix))


def test_every_op_is_registered():
    """Each fused backend's three launch ops and the two eager-numerics ops of the compiled RL
    rollout (a registration that raises leaves the rest unregistered, with one warning)."""
    assert ops.REGISTERED
    names = ["row_mean", "sde_log_prob"] + [f"{b}_{k}_step" for b in sorted(ops.LAUNCHERS)
                                            for k in ("euler", "stage", "sde")]
    for name in names:
        assert hasattr(torch.ops.flowmatch_fast, name), name
