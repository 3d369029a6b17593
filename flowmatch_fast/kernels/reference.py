"""The reference steps: the oracle of the fused kernels and the CPU path (the ``torch`` backend).

``euler_step`` and ``stage_step`` have the signatures of :mod:`.contract`; each op is one PyTorch
kernel with the same rounding the original loop has (``x + dt * v``: the product rounded, then
the sum; PyTorch's mul and add never fuse).
"""

from __future__ import annotations

from typing import Optional

import torch

from .contract import FLOAT_DTYPES, NO_GUIDANCE, Guidance, Stage, TimeGrid, stage_dtype

_F32 = torch.float32


def guided_velocity(v: torch.Tensor, v_uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """``vu + w * (vc - vu)`` in the product dtype ``promote(float32, v.dtype)``."""
    p = torch.promote_types(_F32, v.dtype)
    vc, vu = v.to(p), v_uncond.to(p)
    return vu + weight * (vc - vu)


def mixed_velocity(vg: torch.Tensor, vu: torch.Tensor, weight: float) -> torch.Tensor:
    """Alpamayo 1.5's guidance ``(1 - w) * vu + w * vg``, literally, with ``w`` a Python float.

    PyTorch rounds each product in its own field's dtype (the scalar held in the op's math type:
    float32 for bf16/fp16/fp32 fields, float64 for float64), the sum in the promoted dtype; no
    shortcut at ``w = 1`` or ``w = 0`` (``0 * inf`` is NaN). tests/test_alpamayo1_5.py pins it.
    """
    return (1 - weight) * vu + weight * vg


def guide(v: torch.Tensor, v_uncond: Optional[torch.Tensor], guidance: Guidance):
    """The velocity of one stage: ``v`` itself, or guided (R1 extra's difference form, or 1.5's
    mix of two fields)."""
    if v_uncond is None:
        return v
    if guidance.mode == "mix":
        return mixed_velocity(v, v_uncond, guidance.weight)
    return guided_velocity(v, v_uncond, guidance.weight)


def euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    grid: TimeGrid,
    i: int,
    out: Optional[torch.Tensor] = None,
    traj: Optional[torch.Tensor] = None,
    v_uncond: Optional[torch.Tensor] = None,
    guidance: Guidance = NO_GUIDANCE,
) -> torch.Tensor:
    v = guide(v, v_uncond, guidance)
    # two ops per step, the floor for plain torch (addcmul would fuse: not bitwise)
    return _write_state(x, torch.mul(grid.dt_views[i], v), out, traj)


def _write_state(x: torch.Tensor, prod: torch.Tensor, out: Optional[torch.Tensor],
                 traj: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + prod`` into ``out`` (fresh and contiguous when ``None``; with ``2B`` rows, the same
    state in each block of ``B`` rows) and into the trajectory slot; returns ``out``."""
    rows = x.shape[0]
    if out is None:
        out = torch.add(x, prod)
        if not out.is_contiguous():  # a permuted field can give a permuted sum; values are equal
            out = out.contiguous()
    elif out.shape[0] == rows:
        torch.add(x, prod, out=out)
    else:  # doubled batch (guidance)
        torch.add(x, prod, out=out[:rows])
        out[rows:].copy_(out[:rows])
    if traj is not None:
        traj.copy_(out if out.shape[0] == rows else out[:rows])
    return out


def stage_step(
    x: torch.Tensor,
    k: torch.Tensor,
    grid: TimeGrid,
    i: int,
    stage: Stage,
    acc: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    traj: Optional[torch.Tensor] = None,
    k_uncond: Optional[torch.Tensor] = None,
    guidance: Guidance = NO_GUIDANCE,
):
    """One stage of a fixed-step Runge-Kutta method, in the compute dtype ``C``.

    ``kk = C(k)`` (guided first, in the product dtype), ``s = acc + acc_weight * kk`` (``acc``
    absent: ``acc_weight * kk``), ``h = C(dt_i) * C(coef)``, ``x_out = C(x) + h * (s if from_acc
    else kk)``; every op rounded in ``C`` (so a float64 state gets float64 RK weights).
    Returns ``(x_out, s or None)`` (``s`` when the stage writes the accumulator).
    """
    k = guide(k, k_uncond, guidance)
    c = stage_dtype(x.dtype, k, acc, grid.dtype)
    kk = k.to(c)
    s = kk if stage.acc_weight == 1.0 else kk * stage.acc_weight
    if acc is not None:
        s = acc.to(c) + s
    d = s if stage.from_acc else kk
    h = grid.dt_views[i].to(c)
    if stage.coef != 1.0:
        h = h * stage.coef
    out = _write_state(x.to(c), h * d, out, traj)
    acc_out = None
    if stage.write_acc:  # x-shaped and contiguous, whatever the field's broadcast (as the kernels write it)
        acc_out = s if s.shape == x.shape and s.is_contiguous() else s.expand(x.shape).contiguous()
    return out, acc_out


GRID_DTYPES = FLOAT_DTYPES  # the original's grid under any default dtype


def supports(x, v, acc=None, v_uncond=None, mix=False, out=None, traj=None) -> bool:
    return True  # every input PyTorch itself takes


def unavailable_reason(device: torch.device):
    return None  # plain torch runs wherever torch does
