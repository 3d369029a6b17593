"""The ``cuda`` backend: the fused Euler update as a compiled CUDA kernel.

The kernel lives in the extension ``flowmatch_fast._cuda_euler`` (csrc/), built by setup.py
when nvcc is found. The binding is torch-free (raw pointers, sizes, strides, the stream
handle), so this module does the torch side: contract checks, the broadcast of the field,
and picking the current stream, with as little Python as possible since it runs once per
sampling step.

Nothing here touches the GPU at import: the extension is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import reference
from .reference import TimeGrid, result_dtype

EXTENSION = "flowmatch_fast._cuda_euler"
INSTALL_HINT = "install with nvcc on PATH: pip install --no-build-isolation -e ."

_ext = None  # the extension module, once imported
_import_error: Optional[BaseException] = None
_STATE_CODES: dict = {}  # torch dtype -> the binding's dtype code
_FIELD_CODES: dict = {}
_runtime_error: Optional[str] = None  # the extension's CUDA runtime could not see a GPU
_runtime_checked = False
_arch_reasons: dict = {}  # device index -> None or why the build holds no code for it

# PyTorch's current stream as a raw handle, without building a Stream object (what
# torch.compile's generated code calls); the public API is the fallback.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _load():
    """Import the extension once; ``None`` (and the error kept) when it is not built."""
    global _ext, _import_error
    if _ext is None and _import_error is None:
        try:
            ext = importlib.import_module(EXTENSION)
        except ImportError as exc:
            _import_error = exc
            return None
        codes = ext.dtype_codes()
        for name in ("float32", "float64"):
            _STATE_CODES[getattr(torch, name)] = codes[name]
        for name in ("float16", "bfloat16", "float32", "float64"):
            _FIELD_CODES[getattr(torch, name)] = codes[name]
        _ext = ext
    return _ext


def _check_runtime(ext) -> Optional[str]:
    """Once per process: can the extension's own (static) CUDA runtime use the driver?"""
    global _runtime_error, _runtime_checked
    if not _runtime_checked:
        try:
            if ext.device_count() < 1:
                _runtime_error = "the extension's CUDA runtime sees no GPU"
        except RuntimeError as exc:
            _runtime_error = str(exc)
        _runtime_checked = True
    return _runtime_error


def _runs_on(target: str, cap: int) -> bool:
    """Whether an embedded target (``sm_90``, ``sm_90a``, ``compute_90``) runs on capability cap."""
    kind, arch = target.split("_", 1)
    suffix = arch[-1] if arch[-1] in "af" else ""
    number = int(arch[:-1] if suffix else arch)
    if kind == "compute":  # PTX: JIT-compiled by the driver for this or any newer GPU
        return cap == number if suffix == "a" else cap >= number
    if suffix == "a":  # arch-specific machine code: that exact GPU only
        return cap == number
    return cap // 10 == number // 10 and cap >= number  # same major, same or newer minor


def _arch_reason(ext, device: torch.device) -> Optional[str]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _arch_reasons:
        major, minor = torch.cuda.get_device_capability(index)
        cap = major * 10 + minor
        targets = ext.compiled_archs()
        reason = None
        if not any(_runs_on(t, cap) for t in targets):
            reason = (
                f"the extension holds code for {', '.join(targets)}, none of which runs on this "
                f"sm_{cap} GPU; rebuild with FLOWMATCH_FAST_CUDA_ARCHS={cap} "
                "pip install --no-build-isolation -e ."
            )
        _arch_reasons[index] = reason
    return _arch_reasons[index]


def unavailable_reason(device) -> Optional[str]:
    """``None`` when this backend can run on ``device``; else what is wrong and the fix."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors; got device {device}"
    ext = _load()
    if ext is None:
        return (
            f"the compiled extension {EXTENSION} is not built "
            f"({type(_import_error).__name__}: {_import_error}); {INSTALL_HINT}"
        )
    reason = _check_runtime(ext)
    if reason is not None:
        return reason
    return _arch_reason(ext, device)


def _require_ext():
    ext = _load()
    if ext is None:
        raise RuntimeError(unavailable_reason(torch.device("cuda")))
    return ext


def euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    grid: TimeGrid,
    i: int,
    out: Optional[torch.Tensor] = None,
    traj: Optional[torch.Tensor] = None,
    v_uncond: Optional[torch.Tensor] = None,
    guidance_weight: float = 1.0,
) -> torch.Tensor:
    """The fused update on CUDA tensors; same contract and bits as ``reference.euler_step``.

    Returns the new state (``out`` when given, else a fresh contiguous tensor). Inputs outside
    what the kernel covers (a dtype it has no code for, a non-contiguous state or ``out``, an
    ``out`` of another dtype than the result's) go to the reference, which gives the same bits.
    """
    ext = _ext if _ext is not None else _require_ext()
    shape = x.shape
    if v.shape != shape:
        v = v.expand(shape)  # a broadcast field: stride-0 dims, handled by the kernel
    if v_uncond is not None:
        if v_uncond.shape != shape:
            v_uncond = v_uncond.expand(shape)
        if v_uncond.dtype != v.dtype:
            return reference.euler_step(x, v, grid, i, out, traj, v_uncond, guidance_weight)
        if v_uncond.stride() != v.stride():  # the kernel reads both through one indexer
            v, v_uncond = v.contiguous(), v_uncond.contiguous()
    if len(shape) > ext.MAX_DIMS:  # more dims than the kernel's indexer holds (never in practice)
        v = v.contiguous()
        v_uncond = v_uncond.contiguous() if v_uncond is not None else None
    state_code = _STATE_CODES.get(x.dtype)
    field_code = _FIELD_CODES.get(v.dtype)
    if state_code is None or field_code is None or not x.is_contiguous():
        return reference.euler_step(x, v, grid, i, out, traj, v_uncond, guidance_weight)
    dtype = result_dtype(x.dtype, v)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=x.device)
    elif out.dtype != dtype or not out.is_contiguous():
        return reference.euler_step(x, v, grid, i, out, traj, v_uncond, guidance_weight)

    n = x.numel()
    rows = shape[0]
    if out.numel() == n:
        doubled = False
    elif out.numel() == 2 * n:
        doubled = True
    else:
        raise ValueError(
            f"out must hold 1 or 2 copies of the state ({n} elements); got shape {tuple(out.shape)}"
        )
    device = x.get_device()
    if device < 0:
        raise RuntimeError(f"the cuda backend runs on CUDA tensors; got x on {x.device}")
    values = grid.values
    if (
        v.get_device() != device
        or out.get_device() != device
        or values.get_device() != device
        or (v_uncond is not None and v_uncond.get_device() != device)
    ):
        raise ValueError(f"x, v, v_uncond, out and the time grid must all be on {x.device}")
    if values.dtype != torch.float32 or not values.is_contiguous():
        raise ValueError("the time grid must be a contiguous float32 tensor")
    if not 0 <= i < values.numel() - 1:
        raise IndexError(f"step {i} is outside the grid's {values.numel() - 1} steps")
    if n == 0:
        return out  # nothing to write, nothing to launch

    # The trajectory slot states[:, i+1] is [B, M] with contiguous rows and a batch stride;
    # anything else is written by a copy after the kernel.
    traj_ptr = traj_row = traj_stride = 0
    copy_traj = False
    if traj is not None:
        if (
            traj.dtype == out.dtype
            and traj.shape == shape
            and traj.get_device() == device
            and traj.stride()[1:] == x.stride()[1:]
        ):
            traj_ptr, traj_row, traj_stride = traj.data_ptr(), n // rows, traj.stride(0)
        else:
            copy_traj = True

    stream = (
        _raw_stream(device) if _raw_stream is not None else torch.cuda.current_stream(device).cuda_stream
    )
    ext.euler_step(
        x.data_ptr(), state_code,
        v.data_ptr(), v_uncond.data_ptr() if v_uncond is not None else 0, field_code,
        out.data_ptr(), doubled,
        traj_ptr, traj_row, traj_stride,
        shape, v.stride(),
        values.data_ptr(), i, float(guidance_weight),
        device, stream,
    )  # fmt: skip
    if copy_traj:
        traj.copy_(out[:rows])
    return out


# Multi-stage methods (midpoint/heun/rk4, flowmatch_fast.integrators) call ``backend.stage_step``.
# The compiled extension fuses only the Euler update for now: stages run the reference ops,
# which are bitwise what a fused stage must give.
stage_step = reference.stage_step
