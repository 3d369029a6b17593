"""The integration loops: plain Euler (the drop-in path) and guided / higher-order methods.

Each method is a table of stages; each stage is one field call and one fused update launch
(``euler_step`` or ``stage_step`` of the backend). Every state handed to ``step_fn`` is a fresh
contiguous buffer that is never written again.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .kernels import reference
from .kernels.reference import (TimeGrid, kernel_readable, kernel_supports, result_dtype,
                                stage_dtype)


def check_field(v, x: torch.Tensor) -> torch.Tensor:
    """Validate what ``step_fn`` returned against its input ``x`` (the SPEC's error cases)."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"step_fn must return a torch.Tensor, got {type(v).__name__}")
    if v.shape != x.shape:
        try:
            shape = torch.broadcast_shapes(v.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(
                f"step_fn returned a tensor of shape {tuple(v.shape)}; expected one that broadcasts "
                f"to the state's shape {tuple(x.shape)} without changing it"
            )
    if v.device != x.device:
        raise ValueError(
            f"step_fn returned a tensor on {v.device}; expected it on the sampling device {x.device}"
        )
    return v


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating-point"
    return "complex" if dtype.is_complex else "integer/bool"


def check_unguided(vu, vg: torch.Tensor) -> torch.Tensor:
    """Validate what ``unguided_step_fn`` returned against the guided field ``vg`` of the same step."""
    if not isinstance(vu, torch.Tensor):
        raise TypeError(f"unguided_step_fn must return a torch.Tensor, got {type(vu).__name__}")
    if (vu.shape != vg.shape or vu.device != vg.device
            or _dtype_class(vu.dtype) != _dtype_class(vg.dtype)):
        raise ValueError(
            f"unguided_step_fn returned a {_dtype_class(vu.dtype)} tensor of shape "
            f"{tuple(vu.shape)} ({vu.dtype}) on {vu.device}; expected what step_fn returned: a "
            f"{_dtype_class(vg.dtype)} tensor of shape {tuple(vg.shape)} ({vg.dtype}) on {vg.device}"
        )
    return vu


class Trajectory:
    """The contiguous ``[B, T+1, *x_dims]`` output, written one slot per step (no final stack).

    Its dtype follows the states' promotion: a float64 field turns a float32 trajectory into a
    float64 one (the slots written so far are copied over exactly), as ``torch.stack`` would.
    """

    __slots__ = ("states", "slots", "dtype")

    def __init__(self, x0: torch.Tensor, steps: int):
        b, *dims = x0.shape
        self.states = torch.empty((b, steps + 1, *dims), dtype=x0.dtype, device=x0.device)
        self.slots = self.states.unbind(1)  # all views at once: one call instead of one per step
        self.slots[0].copy_(x0)
        self.dtype = x0.dtype

    def slot(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """The view ``states[:, i]``, in ``dtype`` (upgrading the buffer when needed)."""
        if dtype is not self.dtype:
            wider = torch.empty(self.states.shape, dtype=dtype, device=self.states.device)
            wider[:, :i].copy_(self.states[:, :i])
            self.states = wider
            self.slots = wider.unbind(1)
            self.dtype = dtype
        return self.slots[i]


def euler_loop(x, grid: TimeGrid, step_fn, backend, trajectory: Optional[Trajectory] = None):
    """Plain Euler: one field call and one fused update per step. Returns the last state.

    The loop body is kept lean on purpose: on CPU it runs in a few microseconds per step.
    """
    t_views = grid.t_views
    fused = backend.euler_step
    plain = reference.euler_step
    has_kernel = fused is not plain
    for i in range(grid.steps):
        v = step_fn(x=x, t=t_views[i])
        if type(v) is not torch.Tensor or v.shape != x.shape or v.device != x.device:
            check_field(v, x)
        slot = None if trajectory is None else trajectory.slot(i + 1, result_dtype(x.dtype, v))
        if has_kernel and kernel_supports(x, v):
            x = fused(x, kernel_readable(v), grid, i, None, slot)
        else:
            x = plain(x, v, grid, i, None, slot)
    return x


class Stage(NamedTuple):
    """One stage: field time, ``x_out = x + (dt * coef) * (acc if from_acc else k)``."""

    time: str  # "start" (t_i), "half" (t_i + dt/2), "next" (t_{i+1})
    coef: float
    acc_weight: float = 1.0  # acc <- acc + acc_weight * k
    write_acc: bool = False
    from_acc: bool = False
    uses_acc: bool = False


# Butcher tableaux as stage programs. Orders: euler 1, midpoint 2, heun 2, rk4 4
# (tests/test_methods.py fits the slopes).
METHODS = {
    "euler": (Stage("start", 1.0),),
    "midpoint": (Stage("start", 0.5), Stage("half", 1.0)),
    "heun": (Stage("start", 1.0, write_acc=True),
             Stage("next", 0.5, from_acc=True, uses_acc=True)),
    "rk4": (Stage("start", 0.5, write_acc=True),
            Stage("half", 0.5, acc_weight=2.0, write_acc=True, uses_acc=True),
            Stage("half", 1.0, acc_weight=2.0, write_acc=True, uses_acc=True),
            Stage("next", 1.0 / 6.0, from_acc=True, uses_acc=True)),
}


def fused_ok(backend, x, k, acc=None, k_uncond=None, mix=False) -> bool:
    """The one decision between the backend's fused step and the reference step.

    Alpamayo 1.5's mix ``(1 - w) * vu + w * vg`` is fused only by a backend that says so
    (``FUSES_MIX_GUIDANCE``: Triton and the CUDA extension) and only for two strided fields
    of one dtype (mixed dtypes round each product in its own dtype: the reference computes
    those; a sparse unguided field gets PyTorch's own error there, as in the original).
    """
    if mix and not (getattr(backend, "FUSES_MIX_GUIDANCE", False) and k_uncond.dtype == k.dtype
                    and k_uncond.layout == torch.strided):
        return False
    return kernel_supports(x, k) and (acc is None or acc.dtype in (torch.float32, torch.float64))


def integrate(method: str, x, grid: TimeGrid, step_fn, backend, trajectory=None,
              guided: bool = False, weight: float = 1.0, unguided_fn=None):
    """Any method, optionally with classifier-free guidance. Returns the last state ``[B, ...]``.

    ``guided`` (our R1 extra): the field sees the doubled batch ``[x; x]`` (rows ``:B``
    conditional, ``B:`` unconditional) and the velocity is ``vu + w * (vc - vu)``; with
    ``w == 1`` it is ``vc`` itself, so the result is bitwise that of plain sampling with the
    conditional field. ``unguided_fn`` (Alpamayo 1.5): ``vg = step_fn(x, t)`` first, then
    ``vu = unguided_fn(x, t)``, and the velocity is ``(1 - w) * vu + w * vg``.
    """
    mix = unguided_fn is not None
    if method == "euler" and not guided and not mix:
        return euler_loop(x, grid, step_fn, backend, trajectory)
    stages = METHODS[method]
    rows = x.shape[0]
    x_in = torch.cat([x, x]) if guided else x
    last = len(stages) - 1
    for i in range(grid.steps):
        acc = None
        xs = x_in
        for j, st in enumerate(stages):
            t = grid.stage_t_views(st.time)[i]
            v = step_fn(x=xs, t=t)
            check_field(v, xs)
            vu = None
            if mix:
                vu = check_unguided(unguided_fn(x=xs, t=t), v)
            elif guided:
                if v.dim() == 0:  # a 0-dim field is a scalar to PyTorch's promotion: keep that
                    v = v.to(result_dtype(torch.float32, v))
                if v.shape != xs.shape:
                    v = v.expand(xs.shape)
                v, vu = v[:rows], v[rows:]
                if weight == 1.0:
                    vu = None
            acc_in = acc if st.uses_acc else None
            fused = fused_ok(backend, x, v, acc_in, vu, mix)
            if mix and not fused:  # the reference mix, then the plain step (fused if it can be)
                v, vu = reference.mixed_velocity(v, vu, weight), None
                fused = fused_ok(backend, x, v, acc_in)
            dtype = (result_dtype(x.dtype, v) if method == "euler"
                     else stage_dtype(x.dtype, v, acc_in))
            out = torch.empty((2 * rows, *x.shape[1:]), dtype=dtype, device=x.device) if guided else None
            slot = trajectory.slot(i + 1, dtype) if trajectory is not None and j == last else None
            mix_kw = {"mix": True} if vu is not None and mix else {}  # only fusing backends take it
            if fused:
                v = kernel_readable(v)
                vu = None if vu is None else kernel_readable(vu)
            if method == "euler":
                step = backend.euler_step if fused else reference.euler_step
                xs = step(x, v, grid, i, out, slot, vu, weight, **mix_kw)
            else:
                step = backend.stage_step if fused else reference.stage_step
                xs, acc = step(x, v, grid, i, st.coef, acc_in, st.acc_weight, st.write_acc,
                               st.from_acc, out, slot, vu, weight, **mix_kw)
        x_in = xs
        x = xs[:rows] if guided else xs
    return x
