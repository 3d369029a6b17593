"""The backend contract, stated once: the time grid, dtype promotion, what a step reads, and the
descriptions of a Runge-Kutta stage and of guidance.

Every backend module (``reference``, ``triton.launch``, ``cuda.launch``) has:

``euler_step(x, v, grid, i, out=None, traj=None, v_uncond=None, guidance_weight=1.0, mix=False)``
``stage_step(x, k, grid, i, coef, acc=None, acc_weight=1.0, write_acc=False, from_acc=False,
out=None, traj=None, k_uncond=None, guidance_weight=1.0, mix=False) -> (x_out, acc_out)``
(``coef, acc_weight, write_acc, from_acc`` are a :class:`Stage`'s fields; ``k_uncond,
guidance_weight, mix`` a :class:`Guidance`'s), ``supports(x, v, acc=None, v_uncond=None, mix=False,
out=None, traj=None) -> bool`` (the one predicate the integrators ask before a fused step; the
reference takes everything), ``GRID_DTYPES`` (the time grids its steps read; the backend
resolution never hands a backend another) and ``unavailable_reason(device) -> str | None``.

- ``x``: the state, float32 or float64, contiguous, shape ``[B, *x_dims]``.
- ``v``: the field, any floating dtype and any strides, broadcastable to ``x``'s shape (a
  ``[1, *x_dims]`` field is read through stride 0 over the batch).
- ``grid``: a :class:`TimeGrid`; the step size is ``dt = grid.values[i+1] - grid.values[i]``, a
  subtraction in the grid's dtype ``G`` done by the kernel itself (no host sync, no per-step
  scalar tensor). ``G`` is float32, or float64 under ``torch.set_default_dtype(torch.float64)``
  (the original's ``linspace`` follows the default dtype):
  :func:`flowmatch_fast.arguments.grid_dtype`.
- ``out``: ``None`` (the backend allocates a fresh contiguous result), or a contiguous buffer of
  the result dtype (:func:`result_dtype`, :func:`stage_dtype`) with ``k*B`` rows, ``k`` in
  {1, 2}: the new state is written into each block of ``B`` rows (``k = 2``: the doubled batch).
- ``traj``: optional view ``states[:, i + 1]`` of the contiguous trajectory; written too.
- returns the new state (``out`` when one was given).

Arithmetic (identical on every backend, bitwise): with ``P = promote(G, v.dtype)`` and
``S = promote(x.dtype, P)``: ``prod = P(dt) * P(v)`` rounded in ``P``, then
``x_next = S(x) + S(prod)`` rounded in ``S``. No fused multiply-add. (Guidance combines the
fields first, in their math type ``promote(float32, v.dtype)``: :class:`Guidance`.)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

_F32 = torch.float32
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_FIELD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_STATE_DTYPES = (torch.float32, torch.float64)


class TimeGrid:
    """The time grid of one sampling call: ``values`` (``[T+1]``, of the grid dtype ``dtype``:
    float32, or the default dtype's ``linspace``) and derived views.

    ``t_views[i]`` is ``values[i]`` viewed as ``[B, 1, ..., 1]`` (what the field receives);
    ``dt_views[i]`` is ``values[i+1] - values[i]`` viewed as ``[1, ..., 1]``, computed once per
    call in one subtraction (the same subtraction the original does per step). Both are
    :func:`step_views`: memory flat in the step count.
    """

    __slots__ = ("values", "dtype", "t_views", "_dt_views", "_ndim", "_batch", "_cache")

    def __init__(self, values: torch.Tensor, batch_size: int, ndim: int):
        self.values = values
        self.dtype = values.dtype
        self._ndim = ndim  # number of dims of the state, batch included
        self._batch = batch_size  # rows of the field's input (2B under guidance)
        self._cache = {}
        self.t_views = self._time_views(values[:-1])
        self._dt_views = None

    def _time_views(self, times: torch.Tensor):
        ones = [1] * (self._ndim - 1)
        batch = self._batch

        def make(lo, hi):
            return times[lo:hi].view(hi - lo, 1, *ones).expand(hi - lo, batch, *ones).unbind(0)

        return step_views(make, times.numel())

    def stage_t_views(self, where: str):
        """Field times of a stage: ``"start"`` t_i, ``"half"`` t_i + 0.5 * dt_i, ``"next"`` t_{i+1}."""
        if where == "start":
            return self.t_views
        key = ("t", where)
        if key not in self._cache:
            if where == "half":
                times = self.values[:-1] + (self.values[1:] - self.values[:-1]) * 0.5
            elif where == "next":
                times = self.values[1:]
            else:
                raise ValueError(where)
            self._cache[key] = self._time_views(times)
        return self._cache[key]

    @property
    def steps(self) -> int:
        return self.values.numel() - 1

    @property
    def dt_views(self):
        if self._dt_views is None:
            dts = self.values[1:] - self.values[:-1]
            ones = [1] * self._ndim
            self._dt_views = step_views(lambda lo, hi: dts[lo:hi].view(hi - lo, *ones).unbind(0),
                                        self.steps)
        return self._dt_views


# Per-step views made at once. A view costs ~400 bytes of host memory and a step holds three
# (t, dt, trajectory slot): made up front for every step, 10^6 steps held 1.2 GB. Up to this
# many steps they are one tuple (one unbind call: indexing it is the cheapest per step, the
# CPU overhead W4 measures); longer grids make them a chunk at a time (at most ~1.2 MB).
VIEW_CHUNK = 1024


def step_views(make, n: int):
    """The views ``0 .. n-1`` that ``make(lo, hi)`` returns as a tuple for ``lo .. hi-1``: that
    tuple for ``n <= VIEW_CHUNK``, else a :class:`ChunkedViews` holding one chunk at a time."""
    return make(0, n) if n <= VIEW_CHUNK else ChunkedViews(make, n)


class ChunkedViews:
    """A sequence of ``n`` views made ``VIEW_CHUNK`` at a time by ``make(lo, hi)``; the loops
    read it in order, so each chunk is made once."""

    __slots__ = ("_make", "_n", "_lo", "_views")

    def __init__(self, make, n: int):
        self._make, self._n, self._lo, self._views = make, n, 0, ()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        j = i - self._lo
        if 0 <= j < len(self._views):
            return self._views[j]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"step {i} is outside the {self._n} steps")
        self._lo = lo = i - i % VIEW_CHUNK
        self._views = self._make(lo, min(self._n, lo + VIEW_CHUNK))
        return self._views[i - lo]


_PROMOTION_CACHE: dict = {}


def product_dtype(v: torch.Tensor, grid_dtype: torch.dtype = _F32) -> torch.dtype:
    """dtype of ``dt * v``, ``dt`` a dimensioned tensor of the grid's dtype (as the original's)."""
    if v.dim() == 0:  # a 0-dim field does not take part in promotion against a dimensioned dt
        return torch.result_type(torch.empty(1, dtype=grid_dtype), v)
    return torch.promote_types(grid_dtype, v.dtype)


def result_dtype(x_dtype: torch.dtype, v: torch.Tensor,
                 grid_dtype: torch.dtype = _F32) -> torch.dtype:
    """dtype of ``x + dt * v`` under PyTorch's promotion, ``dt`` a tensor of the grid's dtype."""
    if v.dim() == 0:
        return torch.promote_types(x_dtype, product_dtype(v, grid_dtype))
    key = (x_dtype, v.dtype, grid_dtype)
    s = _PROMOTION_CACHE.get(key)
    if s is None:
        s = torch.promote_types(x_dtype, torch.promote_types(grid_dtype, v.dtype))
        _PROMOTION_CACHE[key] = s
    return s


def stage_dtype(x_dtype, k: torch.Tensor, acc: Optional[torch.Tensor],
                grid_dtype: torch.dtype = _F32) -> torch.dtype:
    """Compute dtype of a multi-stage method's stage: float64 if anything (the grid included) is,
    else float32."""
    c = torch.promote_types(x_dtype,
                            torch.promote_types(grid_dtype, torch.promote_types(_F32, k.dtype)))
    return c if acc is None else torch.promote_types(c, acc.dtype)


def kernel_supports(x: torch.Tensor, v: torch.Tensor,
                    v_uncond: Optional[torch.Tensor] = None) -> bool:
    """The (state, field[, second field]) calls every fused kernel covers, given the fields as
    :func:`kernel_readable` makes them; each backend's ``supports`` adds its own limits. A second
    field (guidance, either form) must have the first one's dtype: Alpamayo 1.5's mix of two
    dtypes rounds each product in its own dtype, which the kernels do not compile for."""
    if v_uncond is not None and not (v_uncond.dtype == v.dtype
                                     and v_uncond.layout == torch.strided):
        return False
    return (x.dtype in KERNEL_STATE_DTYPES and v.dtype in KERNEL_FIELD_DTYPES and v.dim() > 0
            and v.layout == torch.strided)


def kernel_readable(v: torch.Tensor) -> torch.Tensor:
    """The field as raw strided memory, as the kernels read it: a view with PyTorch's lazy
    negation or conjugation bit (``torch.complex(0 * v, v).conj().imag`` is ``-v`` stored as
    ``v``) is materialised (a copy, for such views only); any other tensor is returned as is.
    Resolved rather than tested, since torch.compile cannot trace ``is_neg()``."""
    return v.resolve_neg().resolve_conj()


class Stage(NamedTuple):
    """One Runge-Kutta stage: field time, ``s = acc + acc_weight * k`` (``acc`` absent:
    ``acc_weight * k``), ``x_out = x + (dt * coef) * (s if from_acc else k)``."""

    time: str  # "start" (t_i), "half" (t_i + dt/2), "next" (t_{i+1})
    coef: float
    acc_weight: float = 1.0  # 1 or 2: the weights of the tableaux below
    write_acc: bool = False  # return s (x-shaped, contiguous) for the next stage
    from_acc: bool = False
    uses_acc: bool = False  # reads the previous stage's s


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


class Guidance(NamedTuple):
    """How a stage's velocity is made from the field call(s).

    - ``"none"``: ``v`` itself.
    - ``"batch"`` (our R1 extra, classifier-free guidance on the doubled batch ``[x; x]``): rows
      ``:B`` conditional ``vc``, rows ``B:`` unconditional ``vu``; ``vu + w * (vc - vu)`` in the
      product dtype ``promote(float32, v.dtype)``. ``w == 1`` is ``vc`` itself (bitwise plain).
    - ``"mix"`` (Alpamayo 1.5, a second, unguided field ``vu``): ``(1 - w) * vu + w * vg``
      literally, each product rounded in its field's dtype as PyTorch evaluates it with ``w`` a
      Python float. A kernel fuses it for two strided fields of one dtype only.

    A launch receives it as ``(guidance_weight, mix)``, beside ``v_uncond``.
    """

    mode: str = "none"
    weight: float = 1.0

    @property
    def mix(self) -> bool:
        return self.mode == "mix"


NO_GUIDANCE = Guidance()


def fields_as_read(x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor]):
    """The field(s) of one launch as the kernels read them: each expanded to ``x``'s shape (a
    broadcast field keeps its stride-0 dims) and, under guidance, both with one set of strides:
    the kernels index the second field at the first one's offsets, so when the strides differ
    (a transposed, sliced or expanded field beside another layout; two broadcastable shapes),
    both are copied to contiguous first. Fields that share their strides (R1's doubled batch,
    two fields made alike) are read in place."""
    if v.shape != x.shape:
        v = v.expand(x.shape)
    if v_uncond is None:
        return v, None
    if v_uncond.shape != x.shape:
        v_uncond = v_uncond.expand(x.shape)
    if v_uncond.stride() != v.stride():
        return v.contiguous(), v_uncond.contiguous()
    return v, v_uncond


def fused_steps(name: str, launch_euler, launch_stage, launch_sde):
    """A fused backend's ``euler_step`` and ``stage_step`` (the signatures above) over its two
    launch functions, for calls its ``supports`` takes: the fields as :func:`fields_as_read`
    makes them, ``out`` and the accumulator's output allocated
    when absent, the accumulator in the compute dtype and contiguous. Under torch.compile the
    launch is the op ``flowmatch_fast::<name>_euler_step`` / ``<name>_stage_step``
    (:mod:`flowmatch_fast.ops`); eager calls skip the op dispatch (microseconds per step).
    Also ``sde_step`` (the RL recipes' SDE step, :func:`..reference.sde_step`'s signature) over
    ``launch_sde``: ``out`` and the per-element log-prob ``lp`` allocated when absent."""
    euler_op, stage_op, sde_op = (f"{name}_euler_step", f"{name}_stage_step", f"{name}_sde_step")

    def euler_step(x, v, grid, i, out=None, traj=None, v_uncond=None, guidance=NO_GUIDANCE):
        v, v_uncond = fields_as_read(x, v, v_uncond)
        if out is None:
            out = torch.empty(x.shape, dtype=result_dtype(x.dtype, v, grid.dtype), device=x.device)
        launch = (getattr(torch.ops.flowmatch_fast, euler_op) if torch.compiler.is_compiling()
                  else launch_euler)
        launch(x, v, v_uncond, grid.values, i, out, traj, float(guidance.weight), guidance.mix)
        return out

    def stage_step(x, k, grid, i, stage, acc=None, out=None, traj=None, k_uncond=None,
                   guidance=NO_GUIDANCE):
        if stage.acc_weight not in (1.0, 2.0):
            raise ValueError(f"acc_weight must be 1 or 2 (the RK weights), got {stage.acc_weight}")
        k, k_uncond = fields_as_read(x, k, k_uncond)
        c = stage_dtype(x.dtype, k, acc, grid.dtype)
        if acc is not None and (acc.dtype != c or not acc.is_contiguous()):
            # exact widening (as the reference), then a real copy: .to(memory_format=...) keeps
            # an expanded (stride-0) tensor as it is, since its suggested format is "contiguous"
            acc = acc.to(c).contiguous()
        if out is None:
            out = torch.empty(x.shape, dtype=c, device=x.device)
        acc_out = torch.empty(x.shape, dtype=c, device=x.device) if stage.write_acc else None
        launch = (getattr(torch.ops.flowmatch_fast, stage_op) if torch.compiler.is_compiling()
                  else launch_stage)
        launch(x, k, k_uncond, acc, grid.values, i, float(stage.coef), float(stage.acc_weight),
               bool(stage.from_acc), out, acc_out, traj, float(guidance.weight), guidance.mix)
        return out, acc_out

    def sde_step(x, v, v_uncond, guidance, table, i, noise, replay, out=None, traj=None, lp=None):
        v, v_uncond = fields_as_read(x, v, v_uncond)
        if out is None and not replay:
            out = torch.empty(x.shape, dtype=_F32, device=x.device)
        if lp is None:
            lp = torch.empty(x.shape, dtype=_F32, device=x.device)
        launch = (getattr(torch.ops.flowmatch_fast, sde_op) if torch.compiler.is_compiling()
                  else launch_sde)
        launch(x, v, v_uncond, table, i, noise, replay, out, traj, lp, float(guidance.weight),
               guidance.mix)
        return (noise if replay else out), lp

    return euler_step, stage_step, sde_step


def sde_supports(x: torch.Tensor, v: torch.Tensor, v_uncond: Optional[torch.Tensor],
                 noise: torch.Tensor, traj: Optional[torch.Tensor]) -> bool:
    """The SDE steps every fused kernel covers: a float32 contiguous state, the fields of
    :func:`kernel_supports`, float32 noise (or stored next state; made contiguous and
    ``x``-shaped by the caller), a float32 trajectory slot."""
    return (x.dtype == _F32 and x.is_contiguous() and noise.dtype == _F32
            and kernel_supports(x, v, v_uncond) and (traj is None or traj.dtype == _F32))

