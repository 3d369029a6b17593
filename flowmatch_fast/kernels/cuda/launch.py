"""The ``cuda`` backend's steps: the fused Euler update and Runge-Kutta stage as compiled kernels.

The binding is torch-free (raw pointers, sizes, strides, the stream handle), so this module does
the torch side: the broadcast of the field, the host checks, and picking the tensors' device and
its current stream, with as little Python as possible since it runs once per step (or stage).
Which calls the kernels take is :func:`supports`; the integrators run the reference for the rest.
Under ``torch.compile`` the launches go through the ops of :mod:`flowmatch_fast.ops`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..contract import (KERNEL_STATE_DTYPES, fused_steps, kernel_supports, result_dtype,
                        sde_supports)
from . import loader
from .loader import EMULATE_ENV, EXTENSION, emulating, unavailable_reason  # noqa: F401

# The kernels read a float32 grid (csrc: dt = grid[i+1] - grid[i] in float32): under a float64
# default dtype (a float64 grid, as the original's) the resolution takes another backend.
GRID_DTYPES = (torch.float32,)

# PyTorch's current stream as a raw handle, without building a Stream object (what
# torch.compile's generated code calls); the public API is the fallback.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def supports(x, v, acc=None, v_uncond=None, mix=False, out=None, traj=None) -> bool:
    """Whether the kernels take this call: the kernels' dtypes, a contiguous state, a second
    field (guidance, either form) of the first one's dtype, an ``out`` of the result dtype
    ``C = promote(state, field)`` and contiguous, an accumulator of the state's shape that does
    not widen ``C`` (a float32 state and field after a float64 field call: the kernel, compiled
    for ``C``, does not hold float64)."""
    if not (kernel_supports(x, v, v_uncond) and x.is_contiguous()):
        return False
    if out is not None and not (out.dtype == result_dtype(x.dtype, v) and out.is_contiguous()):
        return False
    if acc is None:
        return True
    c = result_dtype(x.dtype, v)
    return (acc.shape == x.shape and acc.dtype in KERNEL_STATE_DTYPES
            and torch.promote_types(c, acc.dtype) == c)


def _target(x: torch.Tensor):
    """(device index, raw stream handle) of a launch on ``x``'s tensors: the current stream of
    ``x``'s CUDA device (which need not be the current device), or (-1, 0) for CPU tensors under
    the host emulation (-1 is the binding's HOST)."""
    device = x.get_device()
    if device >= 0:
        if _raw_stream is not None:
            return device, _raw_stream(device)
        return device, torch.cuda.current_stream(device).cuda_stream
    if x.device.type != "cpu" or not emulating():
        raise RuntimeError(f"the cuda backend runs on CUDA tensors; got x on {x.device} (CPU tensors "
                           f"need {EMULATE_ENV}=1, the host emulation)")
    return device, 0


def _prepare(x, v, v_uncond, mix, values, i, out, traj, *buffers):
    """The host checks of one launch and its arguments, or ``None`` when there is nothing to write:
    ``(ext, (state code, field code, mode), v, v_uncond, doubled, traj_args, copy_traj, device,
    stream)``. ``v``, ``v_uncond``: the fields as the kernel reads them (a copy stays alive until
    the call); ``traj_args``: the slot's (pointer, row length, row stride), zeros when the kernel
    cannot write it and ``copy_traj`` asks for a copy after. A plain tuple and no ``any(...)``:
    this runs every step (a NamedTuple and a generator cost ~1 us more per step on the host
    emulation, 10.4 vs 11.3 us for a 768-element Euler step).
    """
    ext = loader._ext if loader._ext is not None else loader.require()
    shape = x.shape
    if len(shape) > ext.MAX_DIMS:  # more dims than the kernel's indexer holds (never in practice)
        v = v.contiguous()
        v_uncond = v_uncond.contiguous() if v_uncond is not None else None
    n = x.numel()
    if out.numel() not in (n, 2 * n):
        raise ValueError(
            f"out must hold 1 or 2 copies of the state ({n} elements); got shape {tuple(out.shape)}"
        )
    device, stream = _target(x)
    elsewhere = (v.get_device() != device or out.get_device() != device
                 or values.get_device() != device
                 or (v_uncond is not None and v_uncond.get_device() != device))
    for t in buffers:  # acc, acc_out of a stage (a loop, not any(...): this runs every step)
        elsewhere = elsewhere or (t is not None and t.get_device() != device)
    if elsewhere:
        raise ValueError(f"x, the fields, acc, out and the time grid must all be on {x.device}")
    if values.dtype != torch.float32 or not values.is_contiguous():
        raise ValueError("the time grid must be a contiguous float32 tensor")
    if not 0 <= i < values.numel() - 1:
        raise IndexError(f"step {i} is outside the grid's {values.numel() - 1} steps")
    if n == 0:
        return None  # nothing to write, nothing to launch
    # The trajectory slot states[:, i+1] is [B, M] with contiguous rows and a batch stride;
    # anything else is written by a copy after the kernel.
    traj_args, copy_traj = (0, 0, 0), traj is not None
    if copy_traj and (traj.dtype == out.dtype and traj.shape == shape
                      and traj.get_device() == device and traj.stride()[1:] == x.stride()[1:]):
        traj_args, copy_traj = (traj.data_ptr(), n // shape[0], traj.stride(0)), False
    mode = loader.MODES["field" if v_uncond is None else "mix" if mix else "cfg"]
    return (ext, (loader.STATE_CODES[x.dtype], loader.FIELD_CODES[v.dtype], mode), v, v_uncond,
            out.numel() == 2 * n, traj_args, copy_traj, device, stream)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def launch_euler(x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor],
                 grid_values: torch.Tensor, step: int, out: torch.Tensor,
                 traj: Optional[torch.Tensor], guidance_weight: float, mix: bool) -> None:
    """One Euler launch into buffers given (the fields as ``contract.fields_as_read`` makes
    them: ``x``'s shape, ``v_uncond`` with ``v``'s strides); the body of the
    op ``flowmatch_fast::cuda_euler_step``."""
    a = _prepare(x, v, v_uncond, mix, grid_values, step, out, traj)
    if a is None:
        return
    ext, (state, field, mode), v, vu, doubled, traj_args, copy_traj, device, stream = a
    ext.euler_step(
        x.data_ptr(), state, v.data_ptr(), 0 if vu is None else vu.data_ptr(), field, mode,
        out.data_ptr(), doubled, *traj_args, x.shape, v.stride(),
        grid_values.data_ptr(), step, guidance_weight, device, stream,
    )  # fmt: skip
    if copy_traj:
        traj.copy_(out[:x.shape[0]])


def launch_stage(x: torch.Tensor, k: torch.Tensor, k_uncond: Optional[torch.Tensor],
                 acc: Optional[torch.Tensor], grid_values: torch.Tensor, step: int, coef: float,
                 acc_weight: float, from_acc: bool, out: torch.Tensor,
                 acc_out: Optional[torch.Tensor], traj: Optional[torch.Tensor],
                 guidance_weight: float, mix: bool) -> None:
    """One stage launch into buffers given (``acc`` of the compute dtype, contiguous); the body
    of the op ``flowmatch_fast::cuda_stage_step``."""
    a = _prepare(x, k, k_uncond, mix, grid_values, step, out, traj, acc, acc_out)
    if a is None:
        return
    ext, (state, field, mode), k, ku, doubled, traj_args, copy_traj, device, stream = a
    ext.stage_step(
        x.data_ptr(), state, k.data_ptr(), _ptr(ku), field, mode, _ptr(acc), out.data_ptr(),
        _ptr(acc_out), doubled, *traj_args, x.shape, k.stride(), grid_values.data_ptr(), step,
        coef, acc_weight == 2.0, from_acc, guidance_weight, device, stream,
    )  # fmt: skip
    if copy_traj:
        traj.copy_(out[:x.shape[0]])


def supports_sde(x, v, v_uncond, noise, traj) -> bool:
    """Whether the SDE kernel takes this step (:func:`..contract.sde_supports`)."""
    return sde_supports(x, v, v_uncond, noise, traj)


def launch_sde(x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor],
               table: torch.Tensor, step: int, noise: torch.Tensor, replay: bool,
               out: Optional[torch.Tensor], traj: Optional[torch.Tensor], lp: torch.Tensor,
               guidance_weight: float, mix: bool) -> None:
    """One SDE launch into buffers given (``v`` expanded to ``x``'s shape, ``noise`` contiguous
    float32 of ``x``'s shape); the body of the op ``flowmatch_fast::cuda_sde_step``."""
    if not 0 <= step < table.shape[0]:
        raise IndexError(f"step {step} is outside the table's {table.shape[0]} steps")
    written = lp if replay else out  # what the launch checks as "out"; not written when replaying
    a = _prepare(x, v, v_uncond, mix, table, 0, written, traj, noise, lp)
    if a is None:
        return
    ext, (_state, field, mode), v, vu, _doubled, traj_args, copy_traj, device, stream = a
    ext.sde_step(
        x.data_ptr(), v.data_ptr(), _ptr(vu), field, mode, table.data_ptr(), step,
        noise.data_ptr(), replay, written.data_ptr(), *traj_args, lp.data_ptr(), x.shape,
        v.stride(), guidance_weight, device, stream,
    )  # fmt: skip
    if copy_traj:
        traj.copy_(noise if replay else out)


euler_step, stage_step, sde_step = fused_steps("cuda", launch_euler, launch_stage, launch_sde)
