"""The integration loops: plain Euler (the drop-in path) and guided / higher-order methods.

Each method is a table of stages (:data:`METHODS`); each stage is one field call and one update
(``euler_step`` or ``stage_step``). :func:`choose` is the one place that falls back from a
backend's fused step to the reference, on the backend's own ``supports(...)``. Every state
handed to ``step_fn`` is a fresh contiguous buffer that is never written again.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .kernels import reference
from .kernels.contract import (METHODS, NO_GUIDANCE, Guidance, Stage, TimeGrid, kernel_readable,
                               product_dtype, result_dtype, stage_dtype, step_views)

__all__ = ["METHODS", "Stage", "Trajectory", "choose", "euler_step", "stage_step", "integrate"]


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
        self.slots = _slot_views(self.states)
        self.slots[0].copy_(x0)
        self.dtype = x0.dtype

    def slot(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """The view ``states[:, i]``, in ``dtype`` (upgrading the buffer when needed)."""
        if dtype is not self.dtype:
            wider = torch.empty(self.states.shape, dtype=dtype, device=self.states.device)
            wider[:, :i].copy_(self.states[:, :i])
            self.states = wider
            self.slots = _slot_views(wider)
            self.dtype = dtype
        return self.slots[i]


def _slot_views(states: torch.Tensor):
    """``states[:, i]`` for every ``i``, made as :func:`step_views` makes them (one unbind call
    per chunk instead of one view per step; memory flat in the step count)."""
    return step_views(lambda lo, hi: states[:, lo:hi].unbind(1), states.shape[1])


def euler_loop(x, grid: TimeGrid, step_fn, backend, trajectory: Optional[Trajectory] = None):
    """Plain Euler: one field call and one fused update per step. Returns the last state.

    The loop body is kept lean on purpose: on CPU it runs in a few microseconds per step.
    """
    t_views = grid.t_views
    fused = backend.euler_step
    supports = backend.supports
    plain = reference.euler_step
    has_kernel = fuses(backend)
    g = grid.dtype
    for i in range(grid.steps):
        v = step_fn(x=x, t=t_views[i])
        if type(v) is not torch.Tensor or v.shape != x.shape or v.device != x.device:
            check_field(v, x)
        slot = None if trajectory is None else trajectory.slot(i + 1, result_dtype(x.dtype, v, g))
        if has_kernel and supports(x, v, None, None, False, None, slot):  # choose(), inlined
            x = fused(x, kernel_readable(v), grid, i, None, slot)
        else:
            x = plain(x, v, grid, i, None, slot)
    return x


def fuses(backend) -> bool:
    """Whether ``backend`` has fused steps to offer here: not the reference, and under
    torch.compile only when its ops are registered (else the reference ops are traced)."""
    return backend is not reference and (ops.REGISTERED or not torch.compiler.is_compiling())


def choose(backend, x, v, acc=None, v_uncond=None, mix=False, out=None, traj=None):
    """The one fallback decision: ``(step module, v, v_uncond)`` for one update.

    The backend's fused step where its ``supports(...)`` takes the call (the fields made
    readable as raw strided memory), else the reference step, which computes everything the
    kernels leave out (e.g. Alpamayo 1.5's mix of fields of two dtypes) in plain torch.
    """
    if fuses(backend) and backend.supports(x, v, acc, v_uncond, mix, out, traj):
        return backend, kernel_readable(v), None if v_uncond is None else kernel_readable(v_uncond)
    return reference, v, v_uncond


def euler_step(backend, x, v, grid: TimeGrid, i, out=None, traj=None, v_uncond=None,
               guidance: Guidance = NO_GUIDANCE):
    """One Euler update through :func:`choose` (arguments as the contract's ``euler_step``)."""
    step, v, v_uncond = choose(backend, x, v, None, v_uncond, guidance.mix, out, traj)
    return step.euler_step(x, v, grid, i, out, traj, v_uncond, guidance)


def stage_step(backend, x, k, grid: TimeGrid, i, stage: Stage, acc=None, out=None, traj=None,
               k_uncond=None, guidance: Guidance = NO_GUIDANCE):
    """One Runge-Kutta stage through :func:`choose`; returns ``(x_out, acc_out or None)``."""
    step, k, k_uncond = choose(backend, x, k, acc, k_uncond, guidance.mix, out, traj)
    return step.stage_step(x, k, grid, i, stage, acc, out, traj, k_uncond, guidance)


def integrate(method: str, x, grid: TimeGrid, step_fn, backend, trajectory=None,
              guidance: Guidance = NO_GUIDANCE, unguided_fn=None):
    """Any method, with the velocity of :class:`Guidance`. Returns the last state ``[B, ...]``.

    ``"batch"``: the field sees the doubled batch ``[x; x]``; with ``w == 1`` the velocity is
    ``vc`` itself, so the result is bitwise that of plain sampling with the conditional field.
    ``"mix"``: ``vg = step_fn(x, t)`` first, then ``vu = unguided_fn(x, t)``.
    """
    mix = guidance.mode == "mix"
    guided = guidance.mode == "batch"
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
                    v = v.to(product_dtype(v, grid.dtype))
                if v.shape != xs.shape:
                    v = v.expand(xs.shape)
                v, vu = v[:rows], v[rows:]
                if guidance.weight == 1.0:
                    vu = None
            acc_in = acc if st.uses_acc else None
            if mix and vu.dtype != v.dtype:  # the update's dtype follows the mixed velocity's
                like = torch.empty((1,) * min(v.dim(), 1), dtype=torch.promote_types(v.dtype, vu.dtype))
            else:
                like = v
            dtype = (result_dtype(x.dtype, like, grid.dtype) if method == "euler"
                     else stage_dtype(x.dtype, like, acc_in, grid.dtype))
            out = torch.empty((2 * rows, *x.shape[1:]), dtype=dtype, device=x.device) if guided else None
            slot = trajectory.slot(i + 1, dtype) if trajectory is not None and j == last else None
            if method == "euler":
                xs = euler_step(backend, x, v, grid, i, out, slot, vu, guidance)
            else:
                xs, acc = stage_step(backend, x, v, grid, i, st, acc_in, out, slot, vu, guidance)
        x_in = xs
        x = xs[:rows] if guided else xs
    return x
