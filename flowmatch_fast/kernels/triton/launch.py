"""The Triton backend's steps: one launch per Euler step or Runge-Kutta stage, bitwise equal to
the reference (contract: :mod:`flowmatch_fast.kernels.contract`).

One program reads ``x`` and ``v`` (any strides, coalesced to at most 6 dims), reads ``dt`` from the
device grid, and writes ``x + dt * v`` into ``out`` (and the trajectory slot). Floating-point
contraction is switched off (``enable_fp_fusion=False``) so the product and the sum round
separately, as in PyTorch; ``tests/test_triton_compile.py`` checks the PTX holds no ``fma``.

Triton is imported lazily: importing this module never needs Triton or a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from typing import Optional

import torch

from ..contract import KERNEL_STATE_DTYPES, fused_steps, kernel_supports, sde_supports

# dt = grid[i+1] - grid[i] in the grid's dtype, then promoted with the field's: both grids the
# default dtype gives a float sampler (float32, float64). A 16-bit default dtype's grid is not
# compiled for: the resolution raises for an explicit request, auto takes plain torch.
GRID_DTYPES = (torch.float32, torch.float64)

_MAX_DIMS = 6
# 1024 elements per program and 4 warps: 8 fp32 per thread, two 128-bit accesses per operand.
# (Chosen for the 50 MB bandwidth case; the launch-bound Alpamayo case, 768 elements, is one
# program either way.)
BLOCK = 1024
NUM_WARPS = 4
_GRID_Y_MAX = 65535


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return None, f"Triton is not importable ({exc}); install it with: pip install triton"
    return triton, None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> Optional[str]:
    triton, why = _triton()
    if triton is None:
        return why
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available to this torch"
    if device.type == "cpu" and interpret_mode():
        return None
    return (f"Triton kernels run on CUDA tensors (got device {device.type!r}); set "
            "TRITON_INTERPRET=1 to run them on CPU tensors through the interpreter (slow, for tests)")


@functools.lru_cache(maxsize=None)
def _kernels():
    """(euler_kernel, stage_kernel, sde_kernel), imported on first use (this imports Triton)."""
    from . import jit as k

    return k.euler_kernel, k.stage_kernel, k.sde_kernel


def coalesce(shape, strides):
    """Merge dims that are contiguous with each other and drop size-1 dims (same element order)."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return [1], [0]
    out = [list(dims[0])]
    for n, s in dims[1:]:
        if out[-1][1] == n * s:  # the outer dim steps exactly over the inner one
            out[-1] = [out[-1][0] * n, s]
        else:
            out.append([n, s])
    return [d[0] for d in out], [d[1] for d in out]


def field_layout(v: torch.Tensor):
    """(contiguous?, sizes padded to 6, strides padded to 6, ndim) of a field view."""
    sizes, strides = coalesce(v.shape, v.stride())
    contiguous = len(sizes) == 1 and strides[0] == 1
    ndim = len(sizes)
    sizes = sizes + [1] * max(0, _MAX_DIMS - ndim)
    strides = strides + [0] * max(0, _MAX_DIMS - ndim)
    return contiguous, sizes, strides, ndim


_INT32_LIMIT = 2**31


def extent(t: Optional[torch.Tensor]) -> int:
    """Elements from a view's first to one past its last (its offsets are all below this)."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def offsets_fit_int32(*tensors: Optional[torch.Tensor]) -> bool:
    """The Triton kernels' offset rule: their offsets are 32-bit (cheaper address math, and
    64-bit division in the strided field's index math costs several times more), so every tensor
    a launch reads or writes - state, output, trajectory slot, field, accumulator - must span
    fewer than 2**31 elements; past that (8.6 GB of float32) the reference op runs instead.
    (The CUDA kernels index in 64 bits, 32-bit division only where sizes fit: no such limit.)"""
    return all(extent(t) < _INT32_LIMIT for t in tensors)


def supports(x, v, acc=None, v_uncond=None, mix=False, out=None, traj=None) -> bool:
    """Whether the kernels take this call (else the integrators run the reference step): the
    kernels' dtypes and strided fields (a second field of the first one's dtype), a
    float32/float64 accumulator, and every offset 32-bit (:func:`offsets_fit_int32`; a fresh
    ``out`` spans what ``x`` does)."""
    return (kernel_supports(x, v, v_uncond) and (acc is None or acc.dtype in KERNEL_STATE_DTYPES)
            and offsets_fit_int32(x, out, traj, v, v_uncond, acc))


def launch_guard(device: torch.device):
    """Triton launches on the current device's current stream: enter the tensors' device first."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kernel, x, config) -> None:
    grid, args, meta = config
    with launch_guard(x.device):
        kernel[grid](*args, **meta)


def double_bits(value: float) -> int:
    """The IEEE-754 bits of a Python float as a signed 64-bit int (Triton takes no fp64 scalars)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _launch_config(x, v, grid_values, step, out, traj, v_uncond, guidance_weight, mix):
    """(launch grid, positional args, keyword args) of one kernel launch; v expanded to x's shape."""
    n = x.numel()
    rows = x.shape[0]
    row_len = n // rows
    contiguous, sizes, strides, ndim = field_layout(v)
    if ndim > _MAX_DIMS:  # more non-mergeable dims than the kernel indexes: one copy first
        v = v.contiguous()
        v_uncond = v_uncond.contiguous() if v_uncond is not None else None
        contiguous, sizes, strides, ndim = field_layout(v)
    use_rows = traj is not None and rows <= _GRID_Y_MAX
    grid = (-(-row_len // BLOCK), rows) if use_rows else (-(-n // BLOCK),)
    args = (
        x, v, v_uncond if v_uncond is not None else v, grid_values, out,
        traj if traj is not None else out,
        step, double_bits(guidance_weight), n, row_len,
        traj.stride(0) if traj is not None else 0, n,
        *sizes[1:], *strides,
    )
    meta = dict(
        BLOCK=BLOCK, V_NDIM=ndim, V_CONTIG=contiguous, ROWS=use_rows,
        HAS_TRAJ=traj is not None, DUP_OUT=out.shape[0] != rows,
        GUIDED=v_uncond is not None, MIX=mix, M_F64=v.dtype == torch.float64,
        P_F64=v.dtype == torch.float64 or grid_values.dtype == torch.float64,
        S_F64=out.dtype == torch.float64, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return grid, args, meta


def _stage_config(x, k, grid_values, step, coef, acc, acc_weight, write_acc, from_acc, out,
                  acc_out, traj, k_uncond, guidance_weight, mix):
    """(launch grid, args, meta) of one stage launch; ``k`` already expanded to ``x``'s shape."""
    grid, args, meta = _launch_config(x, k, grid_values, step, out, traj, k_uncond,
                                      guidance_weight, mix)
    x_, k_, ku_, g_, out_, traj_, step_, w_bits, *rest = args
    args = (x_, k_, ku_, acc if acc is not None else out_, g_, out_,
            acc_out if acc_out is not None else out_, traj_, step_, double_bits(coef), w_bits, *rest)
    meta.pop("S_F64")
    meta.pop("P_F64")
    meta.update(C_F64=out.dtype == torch.float64, HAS_ACC=acc is not None,
                ACC_W2=acc_weight == 2.0, WRITE_ACC=acc_out is not None, FROM_ACC=from_acc,
                COEF_ONE=coef == 1.0)
    return grid, args, meta


def launch_euler(x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor],
                 grid_values: torch.Tensor, step: int, out: torch.Tensor,
                 traj: Optional[torch.Tensor], guidance_weight: float, mix: bool) -> None:
    """One Euler launch into buffers given (the fields as ``contract.fields_as_read`` makes
    them: ``x``'s shape, ``v_uncond`` with ``v``'s strides); the body of the
    op ``flowmatch_fast::triton_euler_step`` (:mod:`flowmatch_fast.ops`)."""
    if x.numel():
        _launch(_kernels()[0], x, _launch_config(x, v, grid_values, step, out, traj, v_uncond,
                                                 guidance_weight, mix))


def launch_stage(x: torch.Tensor, k: torch.Tensor, k_uncond: Optional[torch.Tensor],
                 acc: Optional[torch.Tensor], grid_values: torch.Tensor, step: int, coef: float,
                 acc_weight: float, from_acc: bool, out: torch.Tensor,
                 acc_out: Optional[torch.Tensor], traj: Optional[torch.Tensor],
                 guidance_weight: float, mix: bool) -> None:
    """One stage launch into buffers given; the body of ``flowmatch_fast::triton_stage_step``."""
    if x.numel():
        _launch(_kernels()[1], x, _stage_config(x, k, grid_values, step, coef, acc, acc_weight,
                                                acc_out is not None, from_acc, out, acc_out, traj,
                                                k_uncond, guidance_weight, mix))


def supports_sde(x, v, v_uncond, noise, traj) -> bool:
    """Whether the SDE kernel takes this step (:func:`..contract.sde_supports`, 32-bit offsets)."""
    return sde_supports(x, v, v_uncond, noise, traj) and offsets_fit_int32(x, v, v_uncond, noise,
                                                                           traj)


def launch_sde(x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor],
               table: torch.Tensor, step: int, noise: torch.Tensor, replay: bool,
               out: Optional[torch.Tensor], traj: Optional[torch.Tensor], lp: torch.Tensor,
               guidance_weight: float, mix: bool) -> None:
    """One SDE launch into buffers given (``v`` expanded to ``x``'s shape, ``noise``
    contiguous); the body of the op ``flowmatch_fast::triton_sde_step``."""
    if not x.numel():
        return
    grid, args, meta = _launch_config(x, v, table, step, lp, traj, v_uncond, guidance_weight, mix)
    x_, v_, vu_, table_, lp_, traj_, step_, w_bits, n, row_len, traj_stride, _dup, *dims = args
    args = (x_, v_, vu_, table_, noise, lp_ if out is None else out, traj_, lp_, step_, w_bits,
            n, row_len, traj_stride, *dims)
    for flag in ("DUP_OUT", "P_F64", "S_F64"):  # float32 throughout: only the field's M
        meta.pop(flag)
    meta["REPLAY"] = replay
    _launch(_kernels()[2], x, (grid, args, meta))


euler_step, stage_step, sde_step = fused_steps("triton", launch_euler, launch_stage, launch_sde)
