"""Fused Euler update in Triton: one launch per step, bitwise equal to the reference.

One program reads ``x`` and ``v`` (any strides, coalesced to at most 6 dims), reads ``dt`` from the
device grid, and writes ``x + dt * v`` into ``out`` (and the trajectory slot). Floating-point
contraction is switched off (``enable_fp_fusion=False``) so the product and the sum round
separately, as in PyTorch; ``tests/test_triton_compile.py`` checks the PTX holds no ``fma``.

Triton is imported lazily: importing this module never needs Triton or a GPU.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import Optional

import torch

from .reference import TimeGrid, result_dtype

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
        return None
    if device.type == "cpu" and interpret_mode():
        return None
    return (f"Triton kernels run on CUDA tensors (got device {device.type!r}); set "
            "TRITON_INTERPRET=1 to run them on CPU tensors through the interpreter (slow, for tests)")


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def euler_kernel(
        x_ptr, v_ptr, vu_ptr, grid_ptr, out_ptr, traj_ptr,
        step, w_bits, n_total, row_len, traj_row_stride, dup_offset,
        d1, d2, d3, d4, d5,  # sizes of the field's coalesced dims 1..5 (dim 0 needs none)
        s0, s1, s2, s3, s4, s5,  # the field's strides, in elements
        BLOCK: tl.constexpr, V_NDIM: tl.constexpr, V_CONTIG: tl.constexpr,
        ROWS: tl.constexpr, HAS_TRAJ: tl.constexpr, DUP_OUT: tl.constexpr,
        GUIDED: tl.constexpr, P_F64: tl.constexpr, S_F64: tl.constexpr,
    ):
        if ROWS:  # program (column block, row): row-contiguous offsets, so trajectory stores vectorize
            row = tl.program_id(1)
            col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = col < row_len
            offs = row * row_len + col
        else:
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_total

        if V_CONTIG:
            v_offs = offs
        else:  # the field's element offset from the flat index, innermost dim first
            rem = offs
            v_offs = tl.zeros_like(offs)
            if V_NDIM > 5:
                v_offs += (rem % d5) * s5
                rem = rem // d5
            if V_NDIM > 4:
                v_offs += (rem % d4) * s4
                rem = rem // d4
            if V_NDIM > 3:
                v_offs += (rem % d3) * s3
                rem = rem // d3
            if V_NDIM > 2:
                v_offs += (rem % d2) * s2
                rem = rem // d2
            if V_NDIM > 1:
                v_offs += (rem % d1) * s1
                rem = rem // d1
            v_offs += rem * s0

        t0 = tl.load(grid_ptr + step)
        t1 = tl.load(grid_ptr + step + 1)
        dt = t1 - t0  # float32, exactly the original's grid[i+1] - grid[i]
        if P_F64:
            p_type = tl.float64
        else:
            p_type = tl.float32
        if S_F64:
            s_type = tl.float64
        else:
            s_type = tl.float32

        v = tl.load(v_ptr + v_offs, mask=mask).to(p_type)
        if GUIDED:  # vu + w * (vc - vu), each op rounded in the product dtype
            vu = tl.load(vu_ptr + v_offs, mask=mask).to(p_type)
            w = w_bits.to(tl.int64).to(tl.float64, bitcast=True).to(p_type)
            v = vu + w * (v - vu)
        prod = dt.to(p_type) * v
        x = tl.load(x_ptr + offs, mask=mask).to(s_type)
        res = x + prod.to(s_type)
        tl.store(out_ptr + offs, res, mask=mask)
        if DUP_OUT:
            tl.store(out_ptr + dup_offset + offs, res, mask=mask)
        if HAS_TRAJ:
            if ROWS:
                tl.store(traj_ptr + row * traj_row_stride + col, res, mask=mask)
            else:
                r = offs // row_len
                tl.store(traj_ptr + r * traj_row_stride + (offs - r * row_len), res, mask=mask)

    return euler_kernel


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


def double_bits(value: float) -> int:
    """The IEEE-754 bits of a Python float as a signed 64-bit int (Triton takes no fp64 scalars)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _launch_config(x, v, grid_values, step, out, traj, v_uncond, guidance_weight):
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
        GUIDED=v_uncond is not None, P_F64=v.dtype == torch.float64,
        S_F64=out.dtype == torch.float64, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return grid, args, meta


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
    if out is None:
        out = torch.empty(x.shape, dtype=result_dtype(x.dtype, v), device=x.device)
    if v.shape != x.shape:
        v = v.expand(x.shape)
        if v_uncond is not None:
            v_uncond = v_uncond.expand(x.shape)
    if torch.compiler.is_compiling():
        torch.ops.flowmatch_fast.triton_euler_step(
            x, v, v_uncond, grid.values, i, out, traj, float(guidance_weight))
    elif x.numel():
        grid_, args, meta = _launch_config(x, v, grid.values, i, out, traj, v_uncond,
                                           guidance_weight)
        _kernel()[grid_](*args, **meta)
    return out


def _register_op():
    """``flowmatch_fast::triton_euler_step`` as a ``triton_op``, so torch.compile traces through."""
    if _triton()[0] is None or not hasattr(torch.library, "triton_op"):
        return
    from torch.library import triton_op, wrap_triton

    @triton_op("flowmatch_fast::triton_euler_step", mutates_args={"out", "traj"})
    def triton_euler_step(
        x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor],
        grid_values: torch.Tensor, step: int, out: torch.Tensor, traj: Optional[torch.Tensor],
        guidance_weight: float,
    ) -> None:
        if x.numel() == 0:
            return
        grid, args, meta = _launch_config(x, v, grid_values, step, out, traj, v_uncond,
                                          guidance_weight)
        wrap_triton(_kernel())[grid](*args, **meta)


_register_op()


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                 torch.float64: "fp64"}


def specializations():
    """Every (state, field, trajectory, guided, contiguous field) variant ``sample`` can launch."""
    for state in (torch.float32, torch.float64):
        for field in _TRITON_TYPES:
            for traj in (False, True):
                for guided in (False, True):
                    for contiguous in (True, False):
                        yield state, field, traj, guided, contiguous


def compile_for_target(state, field, traj=False, guided=False, contiguous=True, arch=90,
                       enable_fp_fusion=False):
    """Compile one specialization ahead of time for ``sm_<arch>`` (no GPU needed); returns the
    compiled kernel, whose ``.asm`` dict holds ``ttir``/``ttgir``/``llir``/``ptx``/``cubin``.

    Pointers are declared 16-byte aligned and sizes multiples of 16, as the runtime specializes
    them for tensors from PyTorch's allocator and Alpamayo's 128-element rows.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernel()
    out_t = "fp64" if torch.float64 in (state, field) else "fp32"
    f = _TRITON_TYPES[field]
    sig = {
        "x_ptr": "*" + _TRITON_TYPES[state], "v_ptr": "*" + f, "vu_ptr": "*" + f,
        "grid_ptr": "*fp32", "out_ptr": "*" + out_t, "traj_ptr": "*" + out_t,
        "step": "i32", "w_bits": "i64", "n_total": "i32", "row_len": "i32",
        "traj_row_stride": "i32", "dup_offset": "i32",
    }
    sig.update({name: "i32" for name in ("d1", "d2", "d3", "d4", "d5")})
    sig.update({name: "i64" for name in ("s0", "s1", "s2", "s3", "s4", "s5")})
    constexprs = dict(BLOCK=BLOCK, V_NDIM=1 if contiguous else 3, V_CONTIG=contiguous,
                      ROWS=traj, HAS_TRAJ=traj, DUP_OUT=guided, GUIDED=guided,
                      P_F64=field == torch.float64, S_F64=out_t == "fp64")
    sig.update({name: "constexpr" for name in constexprs})
    aligned = ["x_ptr", "v_ptr", "vu_ptr", "grid_ptr", "out_ptr", "traj_ptr", "n_total", "row_len",
               "traj_row_stride", "dup_offset"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": NUM_WARPS, "enable_fp_fusion": enable_fp_fusion})
