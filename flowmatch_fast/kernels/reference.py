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


def _ops():
    from .. import ops  # (ops imports the fused backends, which import this module's siblings)

    return ops


def supports(x, v, acc=None, v_uncond=None, mix=False, out=None, traj=None) -> bool:
    return True  # every input PyTorch itself takes


def supports_sde(x, v, v_uncond, noise, traj) -> bool:
    return True


def unavailable_reason(device: torch.device):
    return None  # plain torch runs wherever torch does


def sde_step(x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor],
             guidance: Guidance, table: torch.Tensor, i: int, noise: torch.Tensor, replay: bool,
             out: Optional[torch.Tensor] = None, traj: Optional[torch.Tensor] = None,
             lp: Optional[torch.Tensor] = None):
    """One step of the RL recipes' SDE with its log-probability, as the recipes compute it.

    ``table[i]`` holds the step's float32 scalars (:class:`flowmatch_fast.sde.SdeGrid`):
    ``a = 1 - std**2 / (2 sigma) * dt``, ``c1 = 1 + std**2 (1 - sigma) / (2 sigma)``, ``dt``,
    ``s = std * sqrt(dt)``, ``denom = 2 s**2``, ``log s`` and ``log sqrt(2 pi)``. In float32:
    ``mean = x * a + (v * c1) * dt``; ``next = mean + s * noise`` (``noise`` the step's draw), or
    with ``replay`` ``next = noise`` (the stored sample); per element
    ``lp = -((next - mean) ** 2) / denom - log s - log sqrt(2 pi)``. Returns ``(next, lp)``,
    also written into ``out``, the trajectory slot ``traj`` and ``lp`` when given.
    """
    v = guide(v, v_uncond, guidance).float()
    a, c1, dt, s, denom, log_s, const = table[i].unbind()
    # The recipes' ops in their order, in place on the fresh results (the CPU path: ~25 % less
    # time than one new tensor per op at W6's 12,288 elements): mean = x * a + (v * c1) * dt;
    # next = mean + s * noise; lp = -((next - mean) ** 2) / denom - log s - log sqrt(2 pi).
    mean = x.float() * a
    mean += torch.mul(v, c1).mul_(dt)
    if replay:
        nxt = noise
    else:
        nxt = torch.mul(noise, s)  # s * noise: a batch-1 field's noise broadcasts in the sum
        nxt = nxt.add_(mean) if nxt.shape == mean.shape else mean + nxt
    if torch.compiler.is_compiling() and _ops().REGISTERED:  # eager's IEEE division there
        log_prob = torch.ops.flowmatch_fast.sde_log_prob(nxt, mean, denom, log_s, const)
    else:
        d = nxt - mean
        log_prob = d.mul_(d).neg_().div_(denom).sub_(log_s).sub_(const)
    if out is not None and not replay:
        nxt = out.copy_(nxt)
    if traj is not None:
        traj.copy_(nxt)
    if lp is not None:
        log_prob = lp.copy_(log_prob)
    return nxt, log_prob
