"""The RL recipes' SDE sampler with log-probabilities (``int_method="sde"`` of
:mod:`flowmatch_fast.alpamayo1_x_rl`), over the shared backends and graph machinery.

Per step ``i`` of a grid of Python numbers the recipes compute a handful of 0-dim float32
tensors on the device (``sigma``, ``std``, two coefficients, ``std * sqrt(dt)``, their logs),
then about 15 element-wise kernels, a host-side ``list.index`` and a ``torch.tensor`` copy.
Here :class:`SdeGrid` computes those scalars once per (grid, noise level, device) with the same
ops on the same device (so the same bits) into one ``[T, 7]`` table that every step reads on
the device; a step is one field call (two with guidance), one noise draw and one fused update
(the backend's ``sde_step``: mean, next state, trajectory slot and per-element log-prob), then
the per-row mean as the recipes take it. SPEC.md ("The RL recipes' FlowMatching") states it.
"""

from __future__ import annotations

import collections
import math
import numbers
import struct
import threading
from typing import NamedTuple, Optional

import torch

from . import noise as noise_mod
from . import ops
from .arguments import same_device
from .graph import capturing
from .integrators import field_velocities, fuses
from .kernels import reference
from .kernels.contract import NO_GUIDANCE, Guidance, kernel_readable

SDE_TYPES = ("sde",)  # "cps" exists in the recipes' signature but raises NotImplementedError
COLUMNS = ("a", "c1", "dt", "s", "denom", "log_s", "const")  # the table's columns
_MAX_GRIDS = 32  # grids kept per process (a few KB each on the device)


class SdeGrid:
    """The SDE's per-step scalars for one grid, noise level and device (see the module doc).

    ``table``: float32 ``[T, 7]`` on the device, columns :data:`COLUMNS`; ``timesteps``: the
    grid as the recipes return it, ``torch.tensor(values, dtype=float32)`` on the device;
    ``failure``: ``(step, exception)`` where the recipes raise at that step (a grid point equal
    to 1.0, a negative step for ``math.sqrt``), else ``None``.
    """

    def __init__(self, values: list, noise_level, device: torch.device):
        self.values = values
        self.steps = len(values) - 1
        self.failure = None
        rows = []
        for i in range(self.steps):
            try:
                rows.append(_step_scalars(values, i, noise_level, device))
            except (AssertionError, ValueError) as exc:  # raised by the recipes at step i
                self.failure = (i, exc)
                break
        self.table = (torch.stack(rows) if rows
                      else torch.empty((0, len(COLUMNS)), dtype=torch.float32, device=device))
        self.timesteps = torch.tensor(values, device=device, dtype=torch.float32)
        # t as the field receives it: timesteps[i] * torch.ones(...) in the default dtype
        self.t_values = torch.tensor([float(t) for t in values[:self.steps]], device=device,
                                     dtype=torch.get_default_dtype())
        self._streams: set = set()  # the CUDA streams the tensors are recorded on

    def t_rows(self, batch_size: int, ndim: int) -> torch.Tensor:
        """``[T, B, 1, ..., 1]`` contiguous: row ``i`` is step ``i``'s ``t`` (fresh per call)."""
        ones = [1] * (ndim - 1)
        return self.t_values.view(self.steps, 1, *ones).expand(self.steps, batch_size, *ones).contiguous()

    def hold_for_stream(self) -> None:
        """Before an eager rollout on a CUDA stream: tell the allocator (``record_stream``) that
        the stream reads the tensors, so that an eviction from the grids' LRU while its kernels
        are in flight cannot hand their memory to other work early. Once per stream; nothing
        during a capture (a graph holds its inputs itself)."""
        device = self.table.device
        if device.type != "cuda" or capturing(device):
            return
        stream = torch.cuda.current_stream(device)
        if stream not in self._streams:
            self._streams.add(stream)
            for tensor in (self.table, self.timesteps, self.t_values):
                tensor.record_stream(stream)

    def check_step(self, i: int) -> None:
        """Raise what the recipes raise at step ``i`` (after that step's field calls)."""
        if self.failure is not None and self.failure[0] == i:
            exc = self.failure[1]
            raise type(exc)(*exc.args)


def _step_scalars(values, i, noise_level, device) -> torch.Tensor:
    """Step ``i``'s scalars, with the recipes' ops: Python arithmetic on the grid's entries as
    given (so a grid of NumPy float32 rounds as there), 0-dim float32 tensors on ``device``."""
    t = values[i]
    assert t != 1.0, "timestep 1.0 is not supported"
    t_next = values[values.index(t) + 1]  # the recipes look the step up by value: the first match
    sigma = torch.tensor(1 - t, device=device, dtype=torch.float32)
    sigma_max = 1 - values[1]
    dt = t_next - t
    sqdt = math.sqrt(dt)
    std = torch.sqrt(sigma / (1 - sigma.clip(max=sigma_max))) * noise_level
    a = 1 - std**2 / (2 * sigma) * dt
    c1 = 1 + std**2 * (1 - sigma) / (2 * sigma)
    s = std * sqdt
    f32 = dict(device=device, dtype=torch.float32)
    # dt and log(sqrt(2 pi)) enter the recipes' element-wise ops as scalars: rounded to float32
    return torch.stack([a, c1, torch.tensor(float(dt), **f32), s, 2 * (s**2), torch.log(s),
                        torch.tensor(_log_sqrt_2pi(torch.get_default_dtype()), **f32)])


def _log_sqrt_2pi(dtype: torch.dtype) -> float:
    """``torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))`` on the CPU in the default dtype."""
    return torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=dtype))).item()


_grids: "collections.OrderedDict[tuple, SdeGrid]" = collections.OrderedDict()
_grids_lock = threading.Lock()


def grid_key(values) -> tuple:
    """A grid as a key: each entry's type and its value's bits (``-0.0`` is not ``0.0`` to the
    field, which gets ``t * ones``; a NaN matches itself)."""
    def bits(v):
        try:
            return struct.pack("<d", float(v))
        except (TypeError, ValueError):
            return v

    return tuple((type(v), bits(v)) for v in values)


def sde_grid(values: list, noise_level: float, device: torch.device) -> SdeGrid:
    """The :class:`SdeGrid` of a grid, from a small per-process LRU (built on a miss: with
    host-to-device copies, which cannot run while the device's stream is being captured)."""
    if device.type == "cuda" and device.index is None:  # the current device, by its index
        device = torch.device("cuda", torch.cuda.current_device())
    key = (grid_key(values), struct.pack("<d", noise_level), device, torch.get_default_dtype())
    with _grids_lock:
        grid = _grids.get(key)
        if grid is not None:
            _grids.move_to_end(key)
            return grid
    if device.type == "cuda" and capturing(device):
        raise RuntimeError("int_method='sde' inside your own CUDA-graph capture: call sample "
                           "once with this grid and noise level before capturing (the first "
                           "call builds the SDE's per-step scalars on the device, with "
                           "host-to-device copies a capture cannot hold), or use fm.capture")
    grid = SdeGrid(values, noise_level, device)
    with _grids_lock:
        _grids[key] = grid
        while len(_grids) > _MAX_GRIDS:
            _grids.popitem(last=False)
    return grid


class RolloutOptions(NamedTuple):
    """The RL class's SDE options as ``sample`` took them (``Options.rollout``)."""

    timesteps: object  # None, or T + 1 numbers (the recipes' list)
    noise_level: object
    samples_list: object
    sde_type: object
    want_steps: bool  # return_info or return_all_steps: the trajectory is returned


def plan_rollout(options: RolloutOptions, steps: int, shape, device: torch.device) -> "Rollout":
    """Validate an SDE call's options (in the recipes' order) and build its grid."""
    noise_level = check_noise_level(options.noise_level)
    samples = None
    if options.samples_list is not None:
        samples = check_samples(options.samples_list, steps, shape, device)
    if options.timesteps is not None:
        values = list(_check_list("timesteps", options.timesteps, steps, "numbers (the recipes "
                                  "look steps up with list.index)"))
    else:
        values = torch.linspace(0.0, 1.0, steps + 1).tolist()
    if steps < 1:
        raise ValueError(f"int_method='sde' needs inference_step >= 1, got {steps} (the recipes "
                         "fail on an empty list of log-probabilities)")
    return Rollout(sde_grid(values, noise_level, device), noise_level, samples,
                   options.sde_type, bool(options.want_steps))


class Rollout(NamedTuple):
    """An SDE call's own options, resolved (``_Plan.rollout``): its grid, the stored rollout it
    replays (``samples``: ``T + 1`` tensors, or ``None``), whether the trajectory is returned."""

    grid: SdeGrid
    noise_level: float
    samples: Optional[tuple]
    sde_type: str
    want_steps: bool
    # what each step's noise is drawn from (noise.check_generators): kept here when the plan's
    # own generator is spent on the initial noise before a compiled region (compiled.py)
    generators: Optional[tuple] = None

    def inputs(self) -> tuple:
        """The tensors a captured rollout reads on every replay (see ``_Plan.static_inputs``)."""
        return (self.grid.table, self.grid.timesteps, self.grid.t_values) + (self.samples or ())

    def key(self):
        """What a captured rollout bakes in (a replay's samples are inputs, not in the key)."""
        return (grid_key(self.grid.values), struct.pack("<d", self.noise_level), self.sde_type,
                self.want_steps, self.samples is not None)


def check_noise_level(noise_level) -> float:
    if isinstance(noise_level, bool) or not isinstance(noise_level, numbers.Real):
        raise TypeError(f"noise_level must be a real number, got {type(noise_level).__name__} "
                        f"({noise_level!r})")
    if not noise_level > 0:  # 0 gives std 0: log(0) and 0/0 in every log-prob
        raise ValueError(f"noise_level must be > 0 (the SDE's noise scale), got {noise_level!r}")
    return float(noise_level)


def check_samples(samples_list, steps: int, shape, device: torch.device) -> tuple:
    """A stored rollout to replay: ``T + 1`` floating tensors of the state's shape on ``device``."""
    for k, s in enumerate(_check_list("samples_list", samples_list, steps, "tensors")):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"samples_list[{k}] must be a tensor, got {type(s).__name__}")
        if tuple(s.shape) != tuple(shape):
            raise ValueError(f"samples_list[{k}] has shape {tuple(s.shape)}; expected the "
                             f"state's shape {tuple(shape)} (batch_size, *x_dims)")
        if not s.is_floating_point():
            raise ValueError(f"samples_list[{k}] has dtype {s.dtype}; expected a floating dtype")
        if not same_device(s.device, device):
            raise ValueError(f"samples_list[{k}] is on {s.device}; expected the sampling "
                             f"device {device}")
    return tuple(samples_list)


def _check_list(name: str, value, steps: int, what: str):
    """A list (or tuple) of ``steps + 1`` entries, as the recipes take ``timesteps`` and
    ``samples_list``; their length check raises :class:`LengthError`."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of T + 1 {what}, got {type(value).__name__}")
    if len(value) != steps + 1:
        raise LengthError(f"{name} must have length inference_step + 1 = {steps + 1}; "
                          f"got {len(value)}")
    return value


class LengthError(ValueError, AssertionError):
    """A list of the wrong length: a ``ValueError``, and an ``AssertionError`` as the recipes
    raise it (their ``assert len(...) == inference_step + 1``), so callers' handlers still work."""


def rollout(plan, x: torch.Tensor, step_fn, unguided_fn=None):
    """One SDE rollout from the state ``x`` (the initial noise, or the stored ``samples[0]``).

    Returns ``(x, log_prob [B])``, and with the trajectory asked for ``(x, log_prob,
    all_steps [B, T+1, ...], timesteps [T+1])``.
    """
    ro = plan.rollout
    grid = ro.grid
    guidance = Guidance(plan.guidance or "none", plan.weight)
    gens = ro.generators
    grid.hold_for_stream()
    t_rows = grid.t_rows(plan.batch_size, x.dim())
    samples = ro.samples
    traj = _Steps(x, grid.steps, samples) if ro.want_steps else None
    log_probs = []
    for i in range(grid.steps):
        t = t_rows[i]
        v, vu = field_velocities(step_fn, unguided_fn, x, t, guidance)
        grid.check_step(i)
        if ro.sde_type != "sde":
            if ro.sde_type == "cps":
                raise NotImplementedError("CPS is not implemented")
            raise ValueError(f"sde_type must be 'sde' ('cps' is not implemented); got "
                             f"{ro.sde_type!r}")
        if v.dim() == 0 or (vu is not None and vu.dim() == 0):
            raise ValueError("step_fn returned a 0-dim tensor; int_method='sde' draws the step's "
                             "noise in the field's shape (the recipes fail on it too)")
        if samples is not None:
            step_noise, replay = samples[i + 1], True
        else:
            shape = v.shape  # the mixed velocity's: vu is only ever v's shape and dtype
            step_noise = noise_mod.randn(shape, gens, x.device, torch.float32)
            replay = False
        slot = None if traj is None else traj.slot(i + 1)
        how = guidance if vu is not None else NO_GUIDANCE
        x_next, lp = sde_step(plan.backend, x, v, vu, how, grid.table, i, step_noise, replay,
                              slot)
        log_probs.append(row_mean(lp))
        x = samples[i + 1] if replay else x_next
        if traj is not None:
            traj.append(x)
    log_prob = row_mean(torch.stack(log_probs, dim=1))
    if traj is None:
        return x, log_prob
    return x, log_prob, traj.states(), grid.timesteps.clone()


def row_mean(t: torch.Tensor) -> torch.Tensor:
    """The recipes' mean over every dim but the batch: eager PyTorch's reduction, also under
    torch.compile (the op of :mod:`flowmatch_fast.ops`, which Inductor leaves to eager)."""
    if torch.compiler.is_compiling() and ops.REGISTERED:
        return torch.ops.flowmatch_fast.row_mean(t)
    return t.mean(dim=tuple(range(1, t.ndim)))


def sde_step(backend, x, v, vu, guidance, table, i, step_noise, replay, slot):
    """One step through the backend's fused ``sde_step`` where its ``supports_sde`` takes it,
    else the reference; returns ``(next, per-element log-prob)``."""
    if fuses(backend):
        # A replayed rollout's stored states are often strided views (all_steps[:, i]), and a
        # batch-1 field draws batch-1 noise (broadcast by the recipes): the kernel reads both
        # contiguous, of the state's shape (no copy otherwise).
        xc = x.contiguous()
        if backend.supports_sde(xc, v, vu, step_noise, slot):
            if step_noise.shape != x.shape or not step_noise.is_contiguous():
                step_noise = step_noise.expand(x.shape).contiguous()
            vu = None if vu is None else kernel_readable(vu)
            return backend.sde_step(xc, kernel_readable(v), vu, guidance, table, i, step_noise,
                                    replay, None, slot, None)
    return reference.sde_step(x, v, vu, guidance, table, i, step_noise, replay, None, slot)


class _Steps:
    """``all_steps``: one float32 buffer written slot by slot when every state is float32 (the
    fused steps write their slot themselves), else the recipes' list and ``torch.stack``."""

    def __init__(self, x0, steps, samples):
        dtypes = {x0.dtype} | ({s.dtype for s in samples} if samples is not None else set())
        self.buffer = None
        self.list = [x0]
        if dtypes == {torch.float32}:
            b, *dims = x0.shape
            self.buffer = torch.empty((b, steps + 1, *dims), dtype=torch.float32, device=x0.device)
            self.buffer[:, 0].copy_(x0)

    def slot(self, i: int):
        return None if self.buffer is None else self.buffer[:, i]

    def append(self, x) -> None:
        """The state after a step (into the list: a buffer's slot the step itself wrote)."""
        if self.buffer is None:
            self.list.append(x)

    def states(self) -> torch.Tensor:
        return self.buffer if self.buffer is not None else torch.stack(self.list, dim=1)
