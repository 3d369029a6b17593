"""The integration loops: plain Euler (the drop-in path) and guided / higher-order methods.

Each method is a table of stages (:data:`METHODS`); each stage is one field call and one update
(``euler_step`` or ``stage_step``). :func:`choose` is the one place that falls back from a
backend's fused step to the reference, on the backend's own ``supports(...)``. Every state
handed to ``step_fn`` is a fresh contiguous buffer that is never written again.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import ops
from .kernels import reference
from .kernels.contract import (METHODS, NO_GUIDANCE, Guidance, Stage, TimeGrid, kernel_readable,
                               product_dtype, result_dtype, stage_dtype, step_views)

__all__ = ["METHODS", "Stage", "Trajectory", "choose", "euler_step", "stage_step", "integrate"]


def check_field(v, x: torch.Tensor, name: str = "step_fn"):
    """Validate what a field returned against its input ``x`` (the SPEC's error cases) and
    return it unchanged: a tensor that broadcasts to ``x``'s shape without changing it, on
    ``x``'s device (or a 0-dim CPU tensor, a scalar to PyTorch), or a Python real number
    (the original computes ``x + dt * number``)."""
    if not isinstance(v, torch.Tensor):
        if isinstance(v, numbers.Real):
            return v
        raise TypeError(f"{name} must return a torch.Tensor or a real number, got {type(v).__name__}")
    if v.shape != x.shape:
        try:
            shape = torch.broadcast_shapes(v.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(
                f"{name} returned a tensor of shape {tuple(v.shape)}; expected one that broadcasts "
                f"to the state's shape {tuple(x.shape)} without changing it"
            )
    if v.device != x.device and not (v.dim() == 0 and v.device.type == "cpu"):
        raise ValueError(
            f"{name} returned a tensor on {v.device}; expected it on the sampling device {x.device}"
        )
    return v


def as_tensor(v) -> torch.Tensor:
    """A field's value as a tensor: a Python number as the 0-dim CPU tensor that gives
    ``dt * v`` the same result (float64 for a float: cast to ``dt``'s dtype as PyTorch casts
    the number; int64 or bool else, which never widen a float ``dt``)."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, numbers.Integral):
        return torch.tensor(bool(v)) if isinstance(v, bool) else torch.tensor(int(v))
    return torch.tensor(float(v), dtype=torch.float64)


def mixed_field(vg, vu, weight) -> Optional[torch.Tensor]:
    """Alpamayo 1.5's velocity where the guided update cannot take the two fields, else
    ``None``: ``(1 - w) * vu + w * vg`` literally, as PyTorch evaluates the original's
    expression with these very values (Python numbers, fields of two shapes or dtypes, a weight
    that is not a Python float), as a tensor; its update is then a plain one. The guided update
    (the fused kernels' mix) takes two tensors of one shape and dtype and a float weight."""
    if (isinstance(vg, torch.Tensor) and isinstance(vu, torch.Tensor) and vg.shape == vu.shape
            and vg.dtype == vu.dtype and isinstance(weight, float)):
        return None
    return as_tensor(reference.mixed_velocity(vg, vu, weight))


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
            v = as_tensor(check_field(v, x))
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


def recipes_midpoint(x, grid: TimeGrid, step_fn, backend, trajectory=None,
                     guidance: Guidance = NO_GUIDANCE, unguided_fn=None):
    """The RL recipes' midpoint method, rounded as they round it: ``x_mid = x + (v * dt) / 2``
    (the product in the field's product dtype, halved there, then added to the state) and
    ``x + dt * v(x_mid, t_mid)``, a plain Euler update (fused where the backend takes it).
    Halving after the rounding differs from ``h = dt / 2`` (our ``"midpoint"``'s stage) only
    where the product overflows or is subnormal, and for a float64 state with a narrower field
    (the product stays in float32): the recipes' bits everywhere."""
    t_half = grid.stage_t_views("half")
    for i in range(grid.steps):
        t = grid.t_views[i]
        v, vu = field_velocities(step_fn, unguided_fn, x, t, guidance)
        v = reference.guide(v, vu, guidance)
        x_mid = reference._write_state(x, torch.mul(grid.dt_views[i], v) / 2, None, None)
        v, vu = field_velocities(step_fn, unguided_fn, x_mid, t_half[i], guidance)
        slot = (None if trajectory is None
                else trajectory.slot(i + 1, result_dtype(x.dtype, v, grid.dtype)))
        x = euler_step(backend, x, v, grid, i, None, slot, vu,
                       guidance if vu is not None else NO_GUIDANCE)
    return x


def field_velocities(step_fn, unguided_fn, x, t, guidance: Guidance):
    """``(v, vu)`` of one field evaluation: the guided field first, then (1.5's guidance) the
    unguided one; ``vu`` is ``None`` without guidance, or when the fields were mixed here
    (:func:`mixed_field`: two shapes or dtypes, a weight that is not a Python float)."""
    v = check_field(step_fn(x=x, t=t), x)
    if guidance.mode != "mix":
        return as_tensor(v), None
    vu = check_field(unguided_fn(x=x, t=t), x, "unguided_step_fn")
    mixed = mixed_field(v, vu, guidance.weight)  # the update then takes it alone
    return (as_tensor(v), vu) if mixed is None else (mixed, None)


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
    if method == "midpoint-rl":
        return recipes_midpoint(x, grid, step_fn, backend, trajectory, guidance, unguided_fn)
    stages = METHODS[method]
    rows = x.shape[0]
    x_in = torch.cat([x, x]) if guided else x
    last = len(stages) - 1
    for i in range(grid.steps):
        acc = None
        xs = x_in
        for j, st in enumerate(stages):
            t = grid.stage_t_views(st.time)[i]
            v, vu = field_velocities(step_fn, unguided_fn, xs, t, guidance)
            if guided:
                if v.dim() == 0:  # a 0-dim field is a scalar to PyTorch's promotion: keep that
                    v = v.to(product_dtype(v, grid.dtype))
                if v.shape != xs.shape:
                    v = v.expand(xs.shape)
                v, vu = v[:rows], v[rows:]
                if guidance.weight == 1.0:
                    vu = None
            acc_in = acc if st.uses_acc else None
            dtype = (result_dtype(x.dtype, v, grid.dtype) if method == "euler"
                     else stage_dtype(x.dtype, v, acc_in, grid.dtype))
            out = torch.empty((2 * rows, *x.shape[1:]), dtype=dtype, device=x.device) if guided else None
            slot = trajectory.slot(i + 1, dtype) if trajectory is not None and j == last else None
            how = guidance if vu is not None else NO_GUIDANCE
            if method == "euler":
                xs = euler_step(backend, x, v, grid, i, out, slot, vu, how)
            else:
                xs, acc = stage_step(backend, x, v, grid, i, st, acc_in, out, slot, vu, how)
        x_in = xs
        x = xs[:rows] if guided else xs
    return x
