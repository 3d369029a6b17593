"""Every ``torch.library`` op of flowmatch_fast, with its fake, registered one way.

Dynamo cannot trace into a kernel launch (Triton's launcher, the extension's raw pointers), so
under ``torch.compile`` each fused backend's two launches are custom ops,
``flowmatch_fast::<backend>_euler_step`` and ``<backend>_stage_step``: opaque calls that write the
buffers they are given and return nothing. The outputs are allocated before the op, outside
it, so the graph knows their shapes and dtypes; a fake checks the buffers against the contract
(:mod:`flowmatch_fast.kernels.contract`) and writes nothing. Eager calls skip the op dispatch
(it costs microseconds per step) and call the same launch function.

``custom_op`` rather than ``triton_op`` for Triton too: registering a ``triton_op`` imports
torch._inductor (1.7 s at import); Inductor keeps a ``custom_op`` opaque. Registered at import,
cheaply: neither Triton, the extension nor a GPU is needed until an op runs. Tested with
``torch.library.opcheck`` (tests/test_ops.py).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from .kernels.cuda import launch as cuda_launch
from .kernels.triton import launch as triton_launch
from .kernels.contract import KERNEL_STATE_DTYPES

# backend name -> the module whose launch_euler / launch_stage the ops call
LAUNCHERS = {"triton": triton_launch, "cuda": cuda_launch}
REGISTERED = False  # False on a torch without custom_op (< 2.4): compiled code traces the reference


def _check_buffers(x: Tensor, out: Tensor, traj: Optional[Tensor], *extra: Optional[Tensor]):
    """What every launch relies on and the graph cannot change afterwards (the fakes' check)."""
    rows = x.shape[0]
    if out.dtype not in KERNEL_STATE_DTYPES or out.shape[1:] != x.shape[1:] or (
            out.shape[0] not in (rows, 2 * rows)):
        raise ValueError(f"out must be a float32/float64 buffer of 1 or 2 copies of the state "
                         f"{tuple(x.shape)}; got {out.dtype} {tuple(out.shape)}")
    for t in (traj, *extra):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"traj, acc and acc_out must have the state's shape {tuple(x.shape)};"
                             f" got {tuple(t.shape)}")


def _euler_op(launcher):
    def euler_step(x: Tensor, v: Tensor, v_uncond: Optional[Tensor], grid_values: Tensor,
                   step: int, out: Tensor, traj: Optional[Tensor], guidance_weight: float,
                   mix: bool) -> None:
        launcher.launch_euler(x, v, v_uncond, grid_values, step, out, traj, guidance_weight, mix)

    def fake(x, v, v_uncond, grid_values, step, out, traj, guidance_weight, mix) -> None:
        _check_buffers(x, out, traj)

    return euler_step, fake


def _stage_op(launcher):
    def stage_step(x: Tensor, k: Tensor, k_uncond: Optional[Tensor], acc: Optional[Tensor],
                   grid_values: Tensor, step: int, coef: float, acc_weight: float,
                   from_acc: bool, out: Tensor, acc_out: Optional[Tensor],
                   traj: Optional[Tensor], guidance_weight: float, mix: bool) -> None:
        launcher.launch_stage(x, k, k_uncond, acc, grid_values, step, coef, acc_weight, from_acc,
                              out, acc_out, traj, guidance_weight, mix)

    def fake(x, k, k_uncond, acc, grid_values, step, coef, acc_weight, from_acc, out, acc_out,
             traj, guidance_weight, mix) -> None:
        _check_buffers(x, out, traj, acc, acc_out)

    return stage_step, fake


def _sde_op(launcher):
    def sde_step(x: Tensor, v: Tensor, v_uncond: Optional[Tensor], table: Tensor, step: int,
                 noise: Tensor, replay: bool, out: Optional[Tensor], traj: Optional[Tensor],
                 lp: Tensor, guidance_weight: float, mix: bool) -> None:
        launcher.launch_sde(x, v, v_uncond, table, step, noise, replay, out, traj, lp,
                            guidance_weight, mix)

    def fake(x, v, v_uncond, table, step, noise, replay, out, traj, lp, guidance_weight,
             mix) -> None:
        _check_buffers(x, lp, traj, noise, None if replay else out)

    return sde_step, fake


def row_mean(x: Tensor) -> Tensor:
    """The mean over every dim but the first (the RL log-probabilities' per-row mean), as eager
    PyTorch computes it; an opaque op under torch.compile, so that Inductor does not sum in
    another order (its reductions differ from eager's in the last bits)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _row_mean_fake(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:1])


def sde_log_prob(nxt: Tensor, mean: Tensor, denom: Tensor, log_s: Tensor,
                 log_sqrt_2pi: Tensor) -> Tensor:
    """The RL recipes' per-element log-probability ``-((next - mean) ** 2) / denom - log s -
    log sqrt(2 pi)`` as eager PyTorch computes it; an opaque op under torch.compile, so that the
    division is IEEE whatever Inductor emits for one (an approximate division in its Triton code
    without its division-rounding option, which older releases lack)."""
    d = nxt - mean
    return d.mul_(d).neg_().div_(denom).sub_(log_s).sub_(log_sqrt_2pi)


def _sde_log_prob_fake(nxt, mean, denom, log_s, log_sqrt_2pi) -> Tensor:
    return torch.empty(torch.broadcast_shapes(nxt.shape, mean.shape),
                       dtype=torch.promote_types(nxt.dtype, mean.dtype), device=mean.device)


def _register() -> None:
    global REGISTERED
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:  # pragma: no cover - torch < 2.4
        return
    try:
        for name, impl, fake in (("row_mean", row_mean, _row_mean_fake),
                                 ("sde_log_prob", sde_log_prob, _sde_log_prob_fake)):
            op = custom_op(f"flowmatch_fast::{name}", impl, mutates_args=())
            op.register_fake(fake)
        for name, launcher in LAUNCHERS.items():
            for kind, make, mutates in (("euler", _euler_op, ("out", "traj")),
                                        ("stage", _stage_op, ("out", "acc_out", "traj")),
                                        ("sde", _sde_op, ("out", "traj", "lp"))):
                impl, fake = make(launcher)
                op = custom_op(f"flowmatch_fast::{name}_{kind}_step", impl, mutates_args=mutates)
                op.register_fake(fake)
    except Exception as exc:  # pragma: no cover - depends on the torch version
        logging.getLogger("flowmatch_fast").warning(
            "flowmatch_fast: ops not registered (%s: %s); torch.compile traces the reference "
            "steps instead", type(exc).__name__, exc)
        return
    REGISTERED = True


_register()
