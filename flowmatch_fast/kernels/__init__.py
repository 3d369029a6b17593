"""Euler-update kernels. Every backend implements the same contract.

``euler_step(x, v, grid, i, out=None, traj=None, v_uncond=None, guidance_weight=1.0) -> Tensor``

- ``x``: the state, float32 or float64, contiguous, shape ``[B, *x_dims]``.
- ``v``: the field, any floating dtype and any strides, already expanded to ``x``'s shape
  (a ``[1, *x_dims]`` field arrives as a stride-0 view over the batch).
- ``grid``: a :class:`TimeGrid`; the step size is ``dt = grid.values[i+1] - grid.values[i]``, a
  float32 subtraction done by the kernel itself (no host sync, no per-step scalar tensor).
- ``out``: ``None`` (the backend allocates a fresh contiguous result), or a contiguous buffer of
  the result dtype (see :func:`result_dtype`) with ``k*B`` rows, ``k`` in {1, 2}: the new state
  is written into each block of ``B`` rows (``k = 2``: the doubled batch of guidance).
- returns the new state (``out`` when one was given).
- ``traj``: optional view ``states[:, i + 1]`` of the contiguous trajectory; written too.
- ``v_uncond``: optional unconditional field (same shape, dtype and strides as ``v``); then the
  velocity is ``vu + w * (vc - vu)`` computed in the product dtype.
- ``mix`` (keyword, only with ``v_uncond``; backends that fuse it set ``FUSES_MIX_GUIDANCE``):
  Alpamayo 1.5's ``(1 - w) * vu + w * v`` instead, each product and the sum rounded in the
  fields' dtype exactly as PyTorch evaluates that expression with ``w`` a Python float.

Arithmetic (identical on every backend, bitwise): with ``P = promote(float32, v.dtype)`` and
``S = promote(x.dtype, P)``: ``prod = P(dt) * P(v)`` rounded in ``P``, then
``x_next = S(x) + S(prod)`` rounded in ``S``. No fused multiply-add.
"""

from .reference import TimeGrid, result_dtype

__all__ = ["TimeGrid", "result_dtype"]
