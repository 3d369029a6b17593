"""Plain-torch Euler update: the oracle of the fused kernels and the CPU path.

Each op here is one PyTorch kernel with the same rounding the original loop has
(``x + dt * v``: the product rounded, then the sum; PyTorch's mul and add never fuse).
"""

from __future__ import annotations

from typing import Optional

import torch

_F32 = torch.float32
_KERNEL_FIELD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_STATE_DTYPES = (torch.float32, torch.float64)


class TimeGrid:
    """The time grid of one sampling call: ``values`` (float32 ``[T+1]``) and derived views.

    ``t_views[i]`` is ``values[i]`` viewed as ``[B, 1, ..., 1]`` (what the field receives);
    ``dt_views[i]`` is ``values[i+1] - values[i]`` viewed as ``[1, ..., 1]``, computed once per
    call in one subtraction (the same float32 subtraction the original does per step).
    """

    __slots__ = ("values", "t_views", "_dt_views", "_ndim", "_batch", "_cache")

    def __init__(self, values: torch.Tensor, batch_size: int, ndim: int):
        self.values = values
        self._ndim = ndim  # number of dims of the state, batch included
        self._batch = batch_size  # rows of the field's input (2B under guidance)
        self._cache = {}
        self.t_views = self._time_views(values[:-1])
        self._dt_views = None

    def _time_views(self, times: torch.Tensor):
        ones = [1] * (self._ndim - 1)
        n = times.numel()
        return times.view(n, 1, *ones).expand(n, self._batch, *ones).unbind(0)

    def stage_t_views(self, where: str):
        """Field times of a stage: ``"start"`` t_i, ``"half"`` t_i + 0.5 * dt_i, ``"next"`` t_{i+1}."""
        if where == "start":
            return self.t_views
        key = ("t", where)
        if key not in self._cache:
            if where == "half":
                times = self.values[:-1] + (self.values[1:] - self.values[:-1]) * 0.5
            elif where == "next":
                times = self.values[1:]
            else:
                raise ValueError(where)
            self._cache[key] = self._time_views(times)
        return self._cache[key]

    @property
    def steps(self) -> int:
        return self.values.numel() - 1

    @property
    def dt_views(self):
        if self._dt_views is None:
            dts = self.values[1:] - self.values[:-1]
            self._dt_views = dts.view(self.steps, *([1] * self._ndim)).unbind(0)
        return self._dt_views


_PROMOTION_CACHE: dict = {}


def result_dtype(x_dtype: torch.dtype, v: torch.Tensor) -> torch.dtype:
    """dtype of ``x + dt * v`` under PyTorch's promotion, ``dt`` a float32 tensor."""
    if v.dim() == 0:  # a 0-dim field does not take part in promotion against a dimensioned dt
        prod = torch.result_type(torch.empty(1, dtype=_F32), v)
        return torch.promote_types(x_dtype, prod)
    key = (x_dtype, v.dtype)
    s = _PROMOTION_CACHE.get(key)
    if s is None:
        s = torch.promote_types(x_dtype, torch.promote_types(_F32, v.dtype))
        _PROMOTION_CACHE[key] = s
    return s


def kernel_supports(x: torch.Tensor, v: torch.Tensor) -> bool:
    """True when a fused kernel covers this (state, field) pair, given the field as
    :func:`kernel_readable` makes it; else the reference op runs (e.g. a sparse field)."""
    return (x.dtype in _KERNEL_STATE_DTYPES and v.dtype in _KERNEL_FIELD_DTYPES and v.dim() > 0
            and v.layout == torch.strided)


def kernel_readable(v: torch.Tensor) -> torch.Tensor:
    """The field as raw strided memory, as the kernels read it: a view with PyTorch's lazy
    negation or conjugation bit (``torch.complex(0 * v, v).conj().imag`` is ``-v`` stored as
    ``v``) is materialised (a copy, for such views only); any other tensor is returned as is.
    Resolved rather than tested, since torch.compile cannot trace ``is_neg()``."""
    return v.resolve_neg().resolve_conj()


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


def guide(v: torch.Tensor, v_uncond: Optional[torch.Tensor], weight: float, mix: bool):
    """The velocity of one stage: ``v`` itself, or guided (R1 extra's difference form, or 1.5's
    mix of two fields when ``mix``)."""
    if v_uncond is None:
        return v
    return mixed_velocity(v, v_uncond, weight) if mix else guided_velocity(v, v_uncond, weight)


def euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    grid: TimeGrid,
    i: int,
    out: Optional[torch.Tensor] = None,
    traj: Optional[torch.Tensor] = None,
    v_uncond: Optional[torch.Tensor] = None,
    guidance_weight: float = 1.0,
    mix: bool = False,
) -> torch.Tensor:
    v = guide(v, v_uncond, guidance_weight, mix)
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


def stage_dtype(x_dtype, k: torch.Tensor, acc: Optional[torch.Tensor]) -> torch.dtype:
    """Compute dtype of a multi-stage method's stage: float64 if anything is, else float32."""
    c = torch.promote_types(x_dtype, torch.promote_types(_F32, k.dtype))
    return c if acc is None else torch.promote_types(c, acc.dtype)


def stage_step(
    x: torch.Tensor,
    k: torch.Tensor,
    grid: TimeGrid,
    i: int,
    coef: float,
    acc: Optional[torch.Tensor] = None,
    acc_weight: float = 1.0,
    write_acc: bool = False,
    from_acc: bool = False,
    out: Optional[torch.Tensor] = None,
    traj: Optional[torch.Tensor] = None,
    k_uncond: Optional[torch.Tensor] = None,
    guidance_weight: float = 1.0,
    mix: bool = False,
):
    """One stage of a fixed-step Runge-Kutta method, in the compute dtype ``C``.

    ``kk = C(k)`` (guided first, in the product dtype), ``s = acc + acc_weight * kk`` (``acc``
    absent: ``acc_weight * kk``), ``h = C(dt_i) * C(coef)``, ``x_out = C(x) + h * (s if from_acc
    else kk)``; every op rounded in ``C`` (so a float64 state gets float64 RK weights).
    Returns ``(x_out, s or None)``.
    """
    k = guide(k, k_uncond, guidance_weight, mix)
    c = stage_dtype(x.dtype, k, acc)
    kk = k.to(c)
    s = kk if acc_weight == 1.0 else kk * acc_weight
    if acc is not None:
        s = acc.to(c) + s
    d = s if from_acc else kk
    h = grid.dt_views[i].to(c)
    if coef != 1.0:
        h = h * coef
    out = _write_state(x.to(c), h * d, out, traj)
    acc_out = None
    if write_acc:  # x-shaped and contiguous, whatever the field's broadcast (as the kernels write it)
        acc_out = s if s.shape == x.shape and s.is_contiguous() else s.expand(x.shape).contiguous()
    return out, acc_out


def unavailable_reason(device: torch.device):
    return None  # plain torch runs wherever torch does
