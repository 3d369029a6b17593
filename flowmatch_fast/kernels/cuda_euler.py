"""The ``cuda`` backend: the fused Euler update and Runge-Kutta stage as compiled CUDA kernels.

The kernels live in the extension ``flowmatch_fast._cuda_euler`` (csrc/), built by setup.py
when nvcc is found. The binding is torch-free (raw pointers, sizes, strides, the stream
handle), so this module does the torch side: contract checks, the broadcast of the field,
and picking the tensors' device and its current stream, with as little Python as possible
since it runs once per sampling step (or stage).

Host emulation: with ``FLOWMATCH_FAST_CUDA_EMULATE=1`` the backend also takes CPU tensors and
runs the same kernel code on the host (csrc/launch.cuh walks the same grid of blocks and
threads), through this same launch path; only the stream and the launch differ. CI runs the
parity suite that way. Outside the emulation, GPU-only: streams and the device guard, CUDA
graphs (capture, replay), threads running concurrently (the host runs them one after another),
and the device compilation itself: intrinsics, SASS and PTX (checked by inspecting the binary
in tests/test_cuda_binary.py, and on a GPU by test_emulation_matches_the_device, which
bench/gpu_suite.sh runs with the whole suite).

Under ``torch.compile`` the launches go through two custom ops instead
(``flowmatch_fast::cuda_euler_step`` / ``cuda_stage_step``, registered at import, below), which
Dynamo records as opaque calls; eager calls skip the op dispatch, which costs microseconds.

Nothing here touches the GPU at import: the extension is imported on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from . import reference
from .contract import TimeGrid, result_dtype, stage_dtype

EXTENSION = "flowmatch_fast._cuda_euler"
INSTALL_HINT = "install with nvcc on PATH: pip install --no-build-isolation -e ."
EMULATE_ENV = "FLOWMATCH_FAST_CUDA_EMULATE"

_ext = None  # the extension module, once imported
_import_error: Optional[BaseException] = None
_STATE_CODES: dict = {}  # torch dtype -> the binding's dtype code
_FIELD_CODES: dict = {}
_FIELD_ONLY = _CFG = 0  # the binding's velocity modes, once loaded
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
        global _FIELD_ONLY, _CFG
        modes = ext.velocity_modes()
        _FIELD_ONLY, _CFG = modes["field"], modes["cfg"]
        _ext = ext
    return _ext


def emulating() -> bool:
    """Whether ``FLOWMATCH_FAST_CUDA_EMULATE`` asks for the host emulation on CPU tensors."""
    return os.environ.get(EMULATE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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


# Under torch.compile, unavailable_reason runs for real at trace time and its answer becomes a
# constant of the graph (it calls into the extension, which Dynamo cannot trace); a no-op
# decorator for eager calls. Whether the backend runs on a device does not change in a process.
def _constant_under_compile(fn):
    fn._dynamo_marked_constant = True  # = torch.compiler.assume_constant_result (see backends.py)
    return fn


@_constant_under_compile
def unavailable_reason(device) -> Optional[str]:
    """``None`` when this backend can run on ``device``; else what is wrong and the fix."""
    device = torch.device(device)
    emulated = device.type == "cpu" and emulating()
    if device.type != "cuda" and not emulated:
        return (f"the cuda backend runs on CUDA tensors; got device {device} (set {EMULATE_ENV}=1 "
                "to run its kernels on CPU tensors through the host emulation, for tests)")
    ext = _load()
    if ext is None:
        return (
            f"the compiled extension {EXTENSION} is not built "
            f"({type(_import_error).__name__}: {_import_error}); {INSTALL_HINT}"
        )
    if emulated:
        return None
    reason = _check_runtime(ext)
    if reason is not None:
        return reason
    return _arch_reason(ext, device)


def _require_ext():
    ext = _load()
    if ext is None:
        raise RuntimeError(unavailable_reason(torch.device("cuda")))
    return ext


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
    if torch.compiler.is_compiling():
        return _traced_euler_step(x, v, grid, i, out, traj, v_uncond, guidance_weight)
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

    # The checks below are written out rather than shared with _stage_step through helpers:
    # this is the per-step hot path of the default method, and each Python call costs.
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
    device, stream = _target(x)
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

    ext.euler_step(
        x.data_ptr(), state_code,
        v.data_ptr(), v_uncond.data_ptr() if v_uncond is not None else 0, field_code,
        _FIELD_ONLY if v_uncond is None else _CFG,
        out.data_ptr(), doubled,
        traj_ptr, traj_row, traj_stride,
        shape, v.stride(),
        values.data_ptr(), i, float(guidance_weight),
        device, stream,
    )  # fmt: skip
    if copy_traj:
        traj.copy_(out[:rows])
    return out


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
):
    """One fused Runge-Kutta stage on CUDA tensors: the contract and bits of
    ``reference.stage_step``. Returns ``(x_out, acc_out or None)``.

    ``acc_weight`` must be 1 or 2 (the weights of the stage programs in
    ``flowmatch_fast.integrators``). Inputs outside what the kernel covers go to the reference,
    as in :func:`euler_step`; so does an accumulator that alone would make the compute dtype
    float64 (a float32 state and field after a float64 field call), which the kernel, compiled
    for ``C = promote(state, field)``, does not hold.
    """
    if acc_weight != 1.0 and acc_weight != 2.0:
        raise ValueError(f"acc_weight must be 1 or 2 (the RK weights), got {acc_weight}")
    if torch.compiler.is_compiling():
        return _traced_stage_step(x, k, grid, i, coef, acc, acc_weight, write_acc, from_acc,
                                  out, traj, k_uncond, guidance_weight)
    return _stage_step(x, k, grid, i, coef, acc, acc_weight, write_acc, from_acc, out, None,
                       traj, k_uncond, guidance_weight)


def _stage_step(x, k, grid, i, coef, acc, acc_weight, write_acc, from_acc, out, acc_out, traj,
                k_uncond, guidance_weight):
    """:func:`stage_step` after its argument check; ``acc_out``: a buffer to write the
    accumulator into (the custom op's, allocated before it), else ``None`` (allocated here)."""
    args = (x, k, grid, i, coef, acc, acc_weight, write_acc, from_acc, out, acc_out, traj,
            k_uncond, guidance_weight)
    ext = _ext if _ext is not None else _require_ext()
    shape = x.shape
    if k.shape != shape:
        k = k.expand(shape)
    if k_uncond is not None:
        if k_uncond.shape != shape:
            k_uncond = k_uncond.expand(shape)
        if k_uncond.dtype != k.dtype:
            return _reference_stage(*args)
        if k_uncond.stride() != k.stride():  # one indexer for both fields
            k, k_uncond = k.contiguous(), k_uncond.contiguous()
    if len(shape) > ext.MAX_DIMS:
        k = k.contiguous()
        k_uncond = k_uncond.contiguous() if k_uncond is not None else None
    state_code = _STATE_CODES.get(x.dtype)
    field_code = _FIELD_CODES.get(k.dtype)
    if state_code is None or field_code is None or not x.is_contiguous():
        return _reference_stage(*args)
    # The kernel's compute dtype C = promote(state, P): stage_dtype without the accumulator
    # (result_dtype is the same promotion, cached; k has dims).
    c = result_dtype(x.dtype, k)
    if acc is not None and (acc.dtype != c or acc.shape != shape or not acc.is_contiguous()):
        if acc.shape != shape or torch.promote_types(c, acc.dtype) != c:
            return _reference_stage(*args)  # a broadcast accumulator, or one that widens C
        # exact widening (as the reference), then a real copy: .to(memory_format=...) returns
        # an expanded (stride-0) tensor unchanged, since its suggested format is "contiguous"
        acc = acc.to(c).contiguous()
    if out is None:
        out = torch.empty(shape, dtype=c, device=x.device)
    elif out.dtype != c or not out.is_contiguous():
        return _reference_stage(*args)
    if write_acc and acc_out is None:
        acc_out = torch.empty(shape, dtype=c, device=x.device)

    n = x.numel()
    rows = shape[0]
    doubled = _doubled(out, n)
    device, stream = _target(x)
    values = grid.values
    if (
        k.get_device() != device
        or out.get_device() != device
        or values.get_device() != device
        or (k_uncond is not None and k_uncond.get_device() != device)
        or (acc is not None and acc.get_device() != device)
        or (acc_out is not None and acc_out.get_device() != device)
    ):
        raise ValueError(f"x, k, k_uncond, acc, out and the time grid must all be on {x.device}")
    _check_grid(values, i)
    if n == 0:
        return out, acc_out

    traj_ptr, traj_row, traj_stride, copy_traj = _traj_args(traj, out, x, device, n)
    ext.stage_step(
        x.data_ptr(), state_code,
        k.data_ptr(), k_uncond.data_ptr() if k_uncond is not None else 0, field_code,
        _FIELD_ONLY if k_uncond is None else _CFG,
        acc.data_ptr() if acc is not None else 0,
        out.data_ptr(), acc_out.data_ptr() if acc_out is not None else 0, doubled,
        traj_ptr, traj_row, traj_stride,
        shape, k.stride(),
        values.data_ptr(), i, float(coef), acc_weight == 2.0, bool(from_acc),
        float(guidance_weight), device, stream,
    )  # fmt: skip
    if copy_traj:
        traj.copy_(out[:rows])
    return out, acc_out


def _reference_stage(x, k, grid, i, coef, acc, acc_weight, write_acc, from_acc, out, acc_out,
                     traj, k_uncond, guidance_weight):
    """The reference stage, its accumulator written into ``acc_out`` when a buffer is given."""
    out, s = reference.stage_step(x, k, grid, i, coef, acc, acc_weight, write_acc, from_acc, out,
                                  traj, k_uncond, guidance_weight)
    if acc_out is not None and s is not None:
        acc_out.copy_(s)
        s = acc_out
    return out, s


# ------------------------------------------------------------- host checks of _stage_step
def _doubled(out: torch.Tensor, n: int) -> bool:
    """Whether ``out`` holds the doubled batch of guidance (2 copies of the n-element state)."""
    if out.numel() == n:
        return False
    if out.numel() == 2 * n:
        return True
    raise ValueError(
        f"out must hold 1 or 2 copies of the state ({n} elements); got shape {tuple(out.shape)}"
    )


def _check_grid(values: torch.Tensor, i: int) -> None:
    if values.dtype != torch.float32 or not values.is_contiguous():
        raise ValueError("the time grid must be a contiguous float32 tensor")
    if not 0 <= i < values.numel() - 1:
        raise IndexError(f"step {i} is outside the grid's {values.numel() - 1} steps")


def _traj_args(traj, out, x, device, n):
    """(pointer, row length, row stride, copy after?) of the trajectory slot, as in euler_step:
    the kernel writes a slot states[:, i+1] of contiguous rows; anything else is copied after."""
    if traj is None:
        return 0, 0, 0, False
    if (
        traj.dtype == out.dtype
        and traj.shape == x.shape
        and traj.get_device() == device
        and traj.stride()[1:] == x.stride()[1:]
    ):
        return traj.data_ptr(), n // x.shape[0], traj.stride(0), False
    return 0, 0, 0, True


# ------------------------------------------------------------------------- torch.compile
# Dynamo cannot trace into the extension (raw pointers, a C++ call), so under torch.compile the
# two launches are custom ops: opaque calls in the graph that mutate the buffers they are given
# and return nothing. The outputs are allocated before the op, outside it, so the graph knows
# their shapes and dtypes; the ops' fake implementations therefore do nothing. At run time the
# op calls the same eager code as above (fallbacks to the reference included), so compiled and
# eager sampling give the same bits.
_OPS_REGISTERED = False


class _OpGrid:
    """The ``TimeGrid`` an op call hands to the eager code: the op receives only the grid's
    values; the per-step views the reference needs are built only if it falls back to it."""

    __slots__ = ("values", "_rows", "_ndim", "_dt_views")

    def __init__(self, values: torch.Tensor, rows: int, ndim: int):
        self.values, self._rows, self._ndim, self._dt_views = values, rows, ndim, None

    @property
    def dt_views(self):
        if self._dt_views is None:
            self._dt_views = TimeGrid(self.values, self._rows, self._ndim).dt_views
        return self._dt_views


def _traced_euler_step(x, v, grid, i, out, traj, v_uncond, guidance_weight):
    if out is None:
        out = torch.empty(x.shape, dtype=result_dtype(x.dtype, v), device=x.device)
    if not _OPS_REGISTERED:  # this torch has no custom_op: trace the reference ops instead
        return reference.euler_step(x, v, grid, i, out, traj, v_uncond, guidance_weight)
    torch.ops.flowmatch_fast.cuda_euler_step(
        x, v, v_uncond, grid.values, i, out, traj, float(guidance_weight))
    return out


def _traced_stage_step(x, k, grid, i, coef, acc, acc_weight, write_acc, from_acc, out, traj,
                       k_uncond, guidance_weight):
    c = stage_dtype(x.dtype, k, acc)
    if out is None:
        out = torch.empty(x.shape, dtype=c, device=x.device)
    if not _OPS_REGISTERED:
        return reference.stage_step(x, k, grid, i, coef, acc, acc_weight, write_acc, from_acc,
                                    out, traj, k_uncond, guidance_weight)
    acc_out = torch.empty(x.shape, dtype=c, device=x.device) if write_acc else None
    torch.ops.flowmatch_fast.cuda_stage_step(
        x, k, k_uncond, acc, grid.values, i, float(coef), float(acc_weight), bool(from_acc),
        out, acc_out, traj, float(guidance_weight))
    return out, acc_out


def _cuda_euler_step_op(
    x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor],
    grid_values: torch.Tensor, step: int, out: torch.Tensor, traj: Optional[torch.Tensor],
    guidance_weight: float,
) -> None:
    grid = _OpGrid(grid_values, x.shape[0], x.dim())
    euler_step(x, v, grid, step, out, traj, v_uncond, guidance_weight)


def _cuda_stage_step_op(
    x: torch.Tensor, k: torch.Tensor, k_uncond: Optional[torch.Tensor],
    acc: Optional[torch.Tensor], grid_values: torch.Tensor, step: int, coef: float,
    acc_weight: float, from_acc: bool, out: torch.Tensor, acc_out: Optional[torch.Tensor],
    traj: Optional[torch.Tensor], guidance_weight: float,
) -> None:
    grid = _OpGrid(grid_values, x.shape[0], x.dim())
    _stage_step(x, k, grid, step, coef, acc, acc_weight, acc_out is not None, from_acc, out,
                acc_out, traj, k_uncond, guidance_weight)


def _no_op(*args) -> None:
    """Fake implementation: the ops only write into buffers they are given."""
    return None


def _register_ops() -> None:
    """Register the two custom ops (no GPU, no extension needed: both are used only when called).

    Done once at import so that they exist before Dynamo traces a call. A torch without
    ``torch.library.custom_op`` (before 2.4), or one that rejects the registration, leaves
    compiled code on the reference ops (correct, but unfused), and eager code unaffected.
    """
    global _OPS_REGISTERED
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return
    try:
        euler_op = custom_op("flowmatch_fast::cuda_euler_step", _cuda_euler_step_op,
                             mutates_args=("out", "traj"))
        euler_op.register_fake(_no_op)
        stage_op = custom_op("flowmatch_fast::cuda_stage_step", _cuda_stage_step_op,
                             mutates_args=("out", "acc_out", "traj"))
        stage_op.register_fake(_no_op)
    except Exception as exc:  # pragma: no cover - depends on the torch version
        import logging

        logging.getLogger("flowmatch_fast").warning(
            "flowmatch_fast: cuda backend ops not registered (%s: %s); torch.compile traces the "
            "reference ops instead", type(exc).__name__, exc)
        return
    _OPS_REGISTERED = True


_register_ops()
