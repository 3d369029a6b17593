"""The Triton kernels themselves (imported only when a Triton backend is first used).

Module-level so that nested ``@triton.jit`` calls resolve, also under ``TRITON_INTERPRET=1``.
Contract and arithmetic: ``flowmatch_fast.kernels.contract`` and the reference steps.
"""

import triton
import triton.language as tl


@triton.jit
def _peel(ACTIVE: tl.constexpr, rem, v_offs, d, s):
    """One dim of the unravel, innermost first: ``(rem // d, v_offs + (rem % d) * s)`` when active."""
    if ACTIVE:  # a constexpr branch: one return, so both cases type-check (Triton checks every return)
        v_offs += (rem % d) * s
        rem = rem // d
    return rem, v_offs


@triton.jit
def field_offsets(offs, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5, V_NDIM: tl.constexpr):
    """A strided field's element offsets for flat state indices (innermost dim first)."""
    rem, v_offs = _peel(V_NDIM > 5, offs, tl.zeros_like(offs), d5, s5)
    rem, v_offs = _peel(V_NDIM > 4, rem, v_offs, d4, s4)
    rem, v_offs = _peel(V_NDIM > 3, rem, v_offs, d3, s3)
    rem, v_offs = _peel(V_NDIM > 2, rem, v_offs, d2, s2)
    rem, v_offs = _peel(V_NDIM > 1, rem, v_offs, d1, s1)
    return v_offs + rem * s0


@triton.jit
def block_offsets(n_total, row_len, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """This program's flat element offsets, mask, and (row, column) in the [B, M] view.

    ROWS: one program per (column block, row), so row-contiguous trajectory stores vectorize.
    """
    if ROWS:
        row = tl.program_id(1)
        col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = col < row_len
        offs = row * row_len + col
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_total
        row = 0
        col = offs
    return offs, mask, row, col


@triton.jit
def round_to(v, f_type: tl.constexpr):
    """``v`` (float32 or float64) rounded to the field dtype ``f_type`` (nearest even), kept in
    ``v``'s type. bf16 by bit arithmetic, as c10::BFloat16 and ``cvt.rn.bf16.f32`` round (the
    interpreter's float32 -> bf16 cast truncates); NaN stays NaN."""
    if f_type == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.where(v != v, v, r)
    elif f_type == tl.float16:
        return v.to(tl.float16).to(v.dtype)
    else:
        return v


@triton.jit
def velocity(v_ptr, vu_ptr, v_offs, mask, w_bits, p_type: tl.constexpr, GUIDED: tl.constexpr,
             MIX: tl.constexpr):
    """The field at ``v_offs`` in its math type ``p_type`` (``promote(float32, F)``), guided when
    GUIDED (w as float64 bits).

    Not MIX: ``vu + w * (vc - vu)``, each op rounded in ``P``. MIX (Alpamayo 1.5, both fields of
    one dtype ``F``): ``(1 - w) * vu + w * vg`` as PyTorch evaluates it with ``w`` a Python float:
    ``1 - w`` in float64 (Python), each scalar cast to the op's math type ``P`` (float32 for
    bf16/fp16/fp32, float64 for fp64), each product and the sum computed in ``P`` and rounded to
    ``F``.
    """
    v = tl.load(v_ptr + v_offs, mask=mask).to(p_type)
    if GUIDED:
        vu = tl.load(vu_ptr + v_offs, mask=mask).to(p_type)
        w = w_bits.to(tl.int64).to(tl.float64, bitcast=True)
        if MIX:
            f_type = v_ptr.dtype.element_ty
            one = tl.full((), 1.0, tl.float64)
            a = round_to(vu * (one - w).to(p_type), f_type)
            b = round_to(v * w.to(p_type), f_type)
            v = round_to(a + b, f_type)
        else:
            v = vu + w.to(p_type) * (v - vu)
    return v


@triton.jit
def field_velocity(v_ptr, vu_ptr, offs, mask, w_bits, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5,
                   V_NDIM: tl.constexpr, V_CONTIG: tl.constexpr, M_F64: tl.constexpr,
                   GUIDED: tl.constexpr, MIX: tl.constexpr):
    """The velocity (:func:`velocity`) at the state's flat offsets ``offs``: the field read at
    its own strided offsets (laid out like the state when V_CONTIG), in its math type (float64
    for a float64 field, else float32)."""
    if V_CONTIG:
        v_offs = offs
    else:
        v_offs = field_offsets(offs, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5, V_NDIM)
    if M_F64:
        m_type = tl.float64
    else:
        m_type = tl.float32
    return velocity(v_ptr, vu_ptr, v_offs, mask, w_bits, m_type, GUIDED, MIX)


@triton.jit
def store_state(out_ptr, traj_ptr, res, offs, mask, row, col, row_len, traj_row_stride,
                dup_offset, ROWS: tl.constexpr, HAS_TRAJ: tl.constexpr, DUP_OUT: tl.constexpr):
    """The new state into ``out`` (twice for the doubled batch) and the trajectory slot."""
    tl.store(out_ptr + offs, res, mask=mask)
    if DUP_OUT:
        tl.store(out_ptr + dup_offset + offs, res, mask=mask)
    if HAS_TRAJ:
        store_traj(traj_ptr, res, offs, mask, row, col, row_len, traj_row_stride, ROWS)


@triton.jit
def store_traj(traj_ptr, res, offs, mask, row, col, row_len, traj_row_stride, ROWS: tl.constexpr):
    """The trajectory slot: rows of ``row_len`` contiguous elements, ``traj_row_stride`` apart."""
    if ROWS:
        tl.store(traj_ptr + row * traj_row_stride + col, res, mask=mask)
    else:
        r = offs // row_len
        tl.store(traj_ptr + r * traj_row_stride + (offs - r * row_len), res, mask=mask)


@triton.jit
def euler_kernel(
    x_ptr, v_ptr, vu_ptr, grid_ptr, out_ptr, traj_ptr,
    step, w_bits, n_total, row_len, traj_row_stride, dup_offset,
    d1, d2, d3, d4, d5,  # sizes of the field's coalesced dims 1..5 (dim 0 needs none)
    s0, s1, s2, s3, s4, s5,  # the field's strides, in elements
    BLOCK: tl.constexpr, V_NDIM: tl.constexpr, V_CONTIG: tl.constexpr,
    ROWS: tl.constexpr, HAS_TRAJ: tl.constexpr, DUP_OUT: tl.constexpr,
    GUIDED: tl.constexpr, MIX: tl.constexpr, M_F64: tl.constexpr, P_F64: tl.constexpr,
    S_F64: tl.constexpr,
):
    """``x + dt * v``: the velocity in the field's math type M, the product in P = promote(grid,
    M), the sum in S (the contract's; a float64 grid makes P float64)."""
    offs, mask, row, col = block_offsets(n_total, row_len, BLOCK, ROWS)
    t0 = tl.load(grid_ptr + step)
    t1 = tl.load(grid_ptr + step + 1)
    dt = t1 - t0  # in the grid's dtype, exactly the original's grid[i+1] - grid[i]
    if P_F64:
        p_type = tl.float64
    else:
        p_type = tl.float32
    if S_F64:
        s_type = tl.float64
    else:
        s_type = tl.float32

    v = field_velocity(v_ptr, vu_ptr, offs, mask, w_bits, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4,
                       s5, V_NDIM, V_CONTIG, M_F64, GUIDED, MIX).to(p_type)
    prod = dt.to(p_type) * v
    x = tl.load(x_ptr + offs, mask=mask).to(s_type)
    res = x + prod.to(s_type)
    store_state(out_ptr, traj_ptr, res, offs, mask, row, col, row_len, traj_row_stride,
                dup_offset, ROWS, HAS_TRAJ, DUP_OUT)

@triton.jit
def stage_kernel(
    x_ptr, k_ptr, ku_ptr, acc_ptr, grid_ptr, out_ptr, acc_out_ptr, traj_ptr,
    step, coef_bits, w_bits, n_total, row_len, traj_row_stride, dup_offset,
    d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5,
    BLOCK: tl.constexpr, V_NDIM: tl.constexpr, V_CONTIG: tl.constexpr,
    ROWS: tl.constexpr, HAS_TRAJ: tl.constexpr, DUP_OUT: tl.constexpr,
    GUIDED: tl.constexpr, MIX: tl.constexpr, M_F64: tl.constexpr, C_F64: tl.constexpr,
    HAS_ACC: tl.constexpr, ACC_W2: tl.constexpr, WRITE_ACC: tl.constexpr,
    FROM_ACC: tl.constexpr, COEF_ONE: tl.constexpr,
):
    """One Runge-Kutta stage (see ``reference.stage_step``), every op rounded in ``C`` (the
    velocity in the field's math type M first)."""
    offs, mask, row, col = block_offsets(n_total, row_len, BLOCK, ROWS)
    if C_F64:
        c_type = tl.float64
    else:
        c_type = tl.float32
    dt = tl.load(grid_ptr + step + 1) - tl.load(grid_ptr + step)
    h = dt.to(c_type)
    if not COEF_ONE:  # h = C(dt) * C(coef), one rounding in C, as the reference
        h = h * coef_bits.to(tl.int64).to(tl.float64, bitcast=True).to(c_type)
    k = field_velocity(k_ptr, ku_ptr, offs, mask, w_bits, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4,
                       s5, V_NDIM, V_CONTIG, M_F64, GUIDED, MIX)
    kk = k.to(c_type)
    if ACC_W2:
        s = kk * 2.0
    else:
        s = kk
    if HAS_ACC:
        s = tl.load(acc_ptr + offs, mask=mask).to(c_type) + s
    if WRITE_ACC:
        tl.store(acc_out_ptr + offs, s, mask=mask)
    if FROM_ACC:
        d = s
    else:
        d = kk
    res = tl.load(x_ptr + offs, mask=mask).to(c_type) + h * d
    store_state(out_ptr, traj_ptr, res, offs, mask, row, col, row_len, traj_row_stride,
                dup_offset, ROWS, HAS_TRAJ, DUP_OUT)


@triton.jit
def sde_kernel(
    x_ptr, v_ptr, vu_ptr, table_ptr, noise_ptr, out_ptr, traj_ptr, lp_ptr,
    step, w_bits, n_total, row_len, traj_row_stride,
    d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5,
    BLOCK: tl.constexpr, V_NDIM: tl.constexpr, V_CONTIG: tl.constexpr,
    ROWS: tl.constexpr, HAS_TRAJ: tl.constexpr, GUIDED: tl.constexpr, MIX: tl.constexpr,
    M_F64: tl.constexpr, REPLAY: tl.constexpr,
):
    """One step of the RL recipes' SDE (see ``reference.sde_step``), every op in float32 and
    rounded as PyTorch rounds it: no fused multiply-add, ``div_rn`` for the one division
    (Triton's ``/`` on float32 is an approximate division on a GPU)."""
    offs, mask, row, col = block_offsets(n_total, row_len, BLOCK, ROWS)
    scalars = table_ptr + step * 7  # the step's row: a, c1, dt, s, denom, log s, log sqrt(2 pi)
    a = tl.load(scalars)
    c1 = tl.load(scalars + 1)
    dt = tl.load(scalars + 2)
    s = tl.load(scalars + 3)
    denom = tl.load(scalars + 4)
    log_s = tl.load(scalars + 5)
    log_sqrt_2pi = tl.load(scalars + 6)
    v = field_velocity(v_ptr, vu_ptr, offs, mask, w_bits, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4,
                       s5, V_NDIM, V_CONTIG, M_F64, GUIDED, MIX).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask)
    mean = x * a + (v * c1) * dt
    z = tl.load(noise_ptr + offs, mask=mask)
    if REPLAY:  # z is the stored next state
        nxt = z
    else:  # z is the step's noise
        nxt = mean + s * z
        tl.store(out_ptr + offs, nxt, mask=mask)
    d = nxt - mean
    lp = tl.math.div_rn(-(d * d), denom) - log_s - log_sqrt_2pi
    tl.store(lp_ptr + offs, lp, mask=mask)
    if HAS_TRAJ:
        store_traj(traj_ptr, nxt, offs, mask, row, col, row_len, traj_row_stride, ROWS)
