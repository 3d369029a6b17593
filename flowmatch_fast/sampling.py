"""The sampling machinery both ``FlowMatching`` classes share: one call's :class:`Options`,
validated once into a plan (the backend resolved there: the one place for ``"auto"``), the
eager run, and the CUDA-graph policy (the cache's ``call`` looks up, captures or falls back and
counts). The classes keep their own public signatures and delegate here."""

from __future__ import annotations

import functools
import math
import numbers
import struct
from typing import NamedTuple, Optional

import torch

from . import backends
from .base import as_int
from .graph import CapturedSampler, GraphCache, cuda_device, field_key, warn_not_cuda
from .integrators import METHODS, Trajectory, integrate
from .kernels.contract import Guidance, TimeGrid

INT_METHODS = tuple(METHODS)


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    value = as_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")
    return value


def _check_real(name: str, value) -> float:
    """A real number (int, float, NumPy scalar) as a Python float; not a bool, str or tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    return float(value)


def _sampling_device(device) -> torch.device:
    """``device=None`` means PyTorch's default device, as ``torch.randn(..., device=None)``."""
    return torch.get_default_device() if device is None else torch.device(device)


def _same_device(actual: torch.device, device: torch.device) -> bool:
    """``actual`` (a tensor's or generator's) is the sampling ``device``; a CUDA device without
    an index is the current one."""
    def index(d):
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index

    return actual.type == device.type and index(actual) == index(device)


class Sampling:
    """The mixin of both classes' modules: planning, the integration call, the bounded
    CUDA-graph cache, ``capture``. ``guidance`` in a plan is ``None``, ``"batch"`` (our R1 extra:
    one field on the doubled batch) or ``"mix"`` (Alpamayo 1.5: a second, unguided field)."""

    def _init_sampling(self, int_method, num_inference_steps, backend, cuda_graph,
                       max_graphs) -> None:
        """Validate and keep the options both classes share (their attributes of those names)."""
        if int_method not in INT_METHODS:
            raise ValueError(f"int_method must be one of {INT_METHODS}; got {int_method!r}")
        _check_positive_int("num_inference_steps", num_inference_steps)
        self.int_method = int_method
        self.num_inference_steps = num_inference_steps
        self.backend = backends.check_backend_name(backend)
        self.cuda_graph = _check_bool("cuda_graph", cuda_graph)
        self._graphs = GraphCache(max_graphs)
        self._warned_not_cuda = False

    def _plan(self, batch_size, device, options: "Options", captured=False) -> "_Plan":
        """Validate one call's arguments and resolve everything that must be known up front
        (``options.weight``: already checked by the class, read only under guidance)."""
        (return_all_steps, inference_step, int_method, guidance, weight, temperature, timesteps,
         shift, noise, generator) = options
        batch_size = _check_positive_int("batch_size", batch_size, minimum=0)
        device = _sampling_device(device)
        method = self.int_method if int_method is None else int_method
        if method not in INT_METHODS:
            raise ValueError(f"int_method must be one of {INT_METHODS}; got {method!r}")
        if timesteps is not None:
            if shift is not None:
                raise ValueError("give either timesteps= or shift=, not both")
            grid_values, grid_key = _check_timesteps(timesteps, device)
            steps = grid_values.numel() - 1
            if inference_step is not None and as_int("inference_step", inference_step) != steps:
                raise ValueError(f"inference_step={inference_step} but timesteps has {steps + 1} "
                                 f"entries ({steps} steps); they must agree")
        else:
            grid_values = grid_key = None
            steps = self.num_inference_steps if inference_step is None else inference_step
            steps = _check_positive_int("inference_step", steps)
        if shift is not None:
            if (isinstance(shift, bool) or not isinstance(shift, numbers.Real)
                    or not math.isfinite(shift) or not shift > 0):
                raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
            shift = None if shift == 1 else float(shift)
            if shift is not None:
                _check_shifted_grid(steps, shift)
        temperature = _check_real("temperature", temperature)
        if noise is not None:
            if generator is not None:
                raise ValueError("give either noise= or generator=, not both (noise draws nothing)")
            _check_noise(noise, (batch_size, *self.x_dims), device)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if not _same_device(generator.device, device):
                raise ValueError(f"generator is on {generator.device}; expected one on the "
                                 f"sampling device {device}")
        numel = batch_size * math.prod(self.x_dims)
        backend = backends.resolve(self.backend, device, numel, captured)
        return _Plan(batch_size, device, tuple(self.x_dims), steps, method,
                     bool(return_all_steps), backend, guidance, weight if guidance else 1.0,
                     temperature, grid_values, grid_key, shift, noise, generator)

    def _run(self, plan: "_Plan", step_fn, unguided_fn=None):
        """The eager sampling call (also what a CUDA graph captures)."""
        if plan.noise is not None:
            x = plan.noise
        else:
            x = torch.randn(plan.batch_size, *plan.x_dims, device=plan.device,
                            generator=plan.generator)
        if plan.temperature != 1.0:  # a separate float32 op, as Alpamayo 1.5; x * 1.0 == x bitwise
            x = x * plan.temperature
        values = plan.grid_values if plan.grid_values is not None else plan.default_grid()
        batched = plan.guidance == "batch"
        grid = TimeGrid(values, 2 * plan.batch_size if batched else plan.batch_size, x.dim())
        trajectory = Trajectory(x, plan.steps) if plan.return_all_steps else None
        guidance = Guidance(plan.guidance or "none", plan.weight)
        x = integrate(plan.method, x, grid, step_fn, plan.backend, trajectory, guidance,
                      unguided_fn)
        if plan.return_all_steps:
            # A grid the plan holds (explicit, or built for a graph) is read by every replay:
            # hand out a copy, so that writing into a static output cannot change later calls.
            return trajectory.states, values if plan.grid_values is None else values.clone()
        return x

    def _sample(self, fields: tuple, batch_size, device, cuda_graph, options: "Options"):
        """``sample``'s body: eager, or through the graph cache keyed on every field's identity
        (``fields``: the fields the plan calls, guided first; each watched for eviction) and
        the plan."""
        use_graph = self.cuda_graph if cuda_graph is None else _check_bool("cuda_graph", cuda_graph)
        device = _sampling_device(device)
        on_cuda = device.type == "cuda"
        in_user_graph = on_cuda and not torch.compiler.is_compiling() and _capturing(device)
        # The cache serves CUDA calls outside the caller's own capture, and not noise=/generator=:
        # a cached graph would read a tensor or generator the caller may drop (explicit
        # capture(noise=..., generator=...) keeps them alive instead).
        graph_wanted = use_graph and on_cuda and not in_user_graph
        cacheable = graph_wanted and options.noise is None and options.generator is None
        plan = self._plan(batch_size, device, options, captured=in_user_graph or cacheable)
        run = functools.partial(self._run, plan, *fields)
        if use_graph and not on_cuda and not self._warned_not_cuda:
            self._warned_not_cuda = True
            warn_not_cuda(plan.device)
        if not cacheable:
            if graph_wanted:  # noise= or generator= given
                self._graphs.count_eager_fallback()
            return run()
        fkeys, watches = zip(*(field_key(f) for f in fields))
        graph_device = cuda_device(plan.device)
        pool, order = self._graphs.pool(graph_device)

        def build():  # the grid is built here, once per capture, not on every cached call
            held = plan.with_grid()
            return CapturedSampler(functools.partial(self._run, held, *fields), graph_device,
                                   pool=pool, order=order, keep_alive=False,
                                   static_inputs=(held.grid_values,))

        return self._graphs.call((*fkeys, plan.key()), watches, build, run)

    def _capture(self, fields: tuple, batch_size, device, warmup, options: "Options"):
        """``capture``'s body: one sampling call captured in a CUDA graph."""
        device = _sampling_device(device)
        if device.type != "cuda":
            raise RuntimeError(
                f"FlowMatching.capture needs a CUDA device; got {str(device)!r}. "
                "On CPU, call FlowMatching.sample (eager) instead."
            )
        plan = self._plan(batch_size, device, options, captured=True).with_grid()
        run = functools.partial(self._run, plan, *fields)
        return CapturedSampler(run, plan.device, warmup=warmup, generator=plan.generator,
                               static_inputs=(plan.grid_values,))

    @property
    def graph_stats(self):
        """Counters of the automatic CUDA-graph cache: captures, replays, eager_fallbacks, ..."""
        return self._graphs.stats

    @property
    def graph_cache(self) -> GraphCache:
        return self._graphs

    def clear_cuda_graphs(self) -> None:
        """Drop every cached graph (their memory returns to PyTorch's allocator)."""
        self._graphs.clear()


class Options(NamedTuple):
    """One call's options, as ``sample`` and ``capture`` of both classes take them; ``_plan``
    validates them. ``guidance``: ``None``, ``"batch"`` (the R1 extra) or ``"mix"`` (1.5)."""

    return_all_steps: bool = False
    inference_step: Optional[int] = None
    int_method: Optional[str] = None
    guidance: Optional[str] = None
    weight: float = 1.0
    temperature: float = 1.0
    timesteps: object = None
    shift: Optional[float] = None
    noise: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None


class _Plan(NamedTuple):
    """Everything one sampling call resolved before running (and what a graph bakes in)."""

    batch_size: int
    device: torch.device
    x_dims: tuple
    steps: int
    method: str
    return_all_steps: bool
    backend: object
    guidance: Optional[str]  # None, "batch" (doubled batch) or "mix" (a second field)
    weight: float
    temperature: float
    grid_values: Optional[torch.Tensor]
    grid_key: Optional[bytes]  # the explicit grid's float32 bits, read on the host at validation
    shift: Optional[float]
    noise: Optional[torch.Tensor]
    generator: Optional[torch.Generator]

    def key(self):
        """The cache key: what a captured graph bakes in (noise/generator excluded).

        Floats enter as their bits (a NaN weight matches itself, -0.0 is not 0.0); the default
        dtype (of the noise and the grid) and the autocast state (of the field) are read now."""
        device = self.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        autocast = torch.is_autocast_enabled(device.type)
        return (device, self.x_dims, self.batch_size, self.steps, self.method,
                self.return_all_steps, self.backend.__name__, self.guidance,
                struct.pack("<dd", self.weight, self.temperature), self.grid_key, self.shift,
                torch.get_default_dtype(),
                (autocast, torch.get_autocast_dtype(device.type)) if autocast else False)

    def default_grid(self) -> torch.Tensor:
        """The grid without ``timesteps=``: ``linspace`` on the device, then the shift if any
        (built afresh by every eager call: the caller owns what ``return_all_steps`` returns)."""
        values = torch.linspace(0.0, 1.0, self.steps + 1, device=self.device)
        return values if self.shift is None else shifted_grid(values, self.shift)

    def with_grid(self) -> "_Plan":
        """This plan with its grid built now, for a CUDA graph to hold as a static input (as an
        explicit grid is): a replay then reruns none of the grid's kernels (``linspace``; with a
        shift, 8 elementwise ops and 2 fills more), whose values never change. The same ops as
        an eager call's :meth:`default_grid`, so the same bits."""
        if self.grid_values is not None:
            return self
        return self._replace(grid_values=self.default_grid())


def shifted_grid(values: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift on the noise level ``s = 1 - t``: ``s' = shift * s / (1 + (shift - 1) * s)``.

    ``shift > 1`` spends more steps at high noise. Computed on the grid's device in float64 (no
    overflow for any finite shift), rounded to float32; the end points are set to exactly 0 and 1.
    """
    s = 1.0 - values.double()
    out = (1.0 - (shift * s) / (1.0 + (shift - 1.0) * s)).float()
    out[0] = 0.0
    out[-1] = 1.0
    return out


@backends.trace_time_constant  # run on the host when torch.compile traces sample, not traced
def _check_shifted_grid(steps: int, shift: float) -> bool:
    """Reject a shift whose grid has zero-length steps in float32: e.g. 1e-30 puts every point
    at 1, 1e30 every point at 0. Checked on the host with the formula the device runs on its
    own ``linspace``."""
    return _check_shifted_grid_cached(steps, shift)


@functools.lru_cache(maxsize=64)
def _check_shifted_grid_cached(steps: int, shift: float) -> bool:
    grid = shifted_grid(torch.linspace(0.0, 1.0, steps + 1), shift)
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"shift={shift!r} gives {steps} steps a time grid that is not strictly "
                         f"increasing in float32 ({grid.tolist()[:4]} ...): zero-length steps; "
                         "use a shift closer to 1 or fewer steps")
    return True


def _capturing(device: torch.device) -> bool:
    """True while ``device``'s current stream is being captured (the caller's own graph)."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _check_timesteps(timesteps, device: torch.device):
    """Validate an explicit grid on the host; return it as float32 on ``device``, and its values."""
    if isinstance(timesteps, torch.Tensor):
        if timesteps.device.type != "cpu" and not _same_device(timesteps.device, device):
            raise ValueError(f"timesteps is on {timesteps.device}; expected the sampling device "
                             f"{device} or the CPU")
        if not timesteps.is_floating_point():
            raise ValueError(f"timesteps must be floating point, got {timesteps.dtype}")
        # a private contiguous copy (a sync for a CUDA tensor): never the caller's storage
        host = timesteps.detach().to("cpu", torch.float32).contiguous().clone()
    else:
        try:
            host = torch.tensor(list(timesteps), dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"timesteps must be a 1-D sequence of floats or a tensor ({exc})") from None
    if host.dim() != 1 or host.numel() < 2:
        raise ValueError(f"timesteps must be 1-D with T + 1 >= 2 entries, got shape {tuple(host.shape)}")
    if host[0].item() != 0.0 or host[-1].item() != 1.0:
        raise ValueError(f"timesteps must start at 0 and end at 1 (noise to data), got "
                         f"{host[0].item()} ... {host[-1].item()}")
    steps = host[1:] - host[:-1]
    if not bool((steps > 0).all()):
        bad = int((~(steps > 0)).nonzero()[0])  # NaN compares false: caught here too
        raise ValueError(f"timesteps must be strictly increasing (in float32); entry {bad + 1} "
                         f"({host[bad + 1].item()}) does not exceed entry {bad} ({host[bad].item()})")
    return host.to(device), struct.pack(f"<{host.numel()}f", *host.tolist())


def _check_noise(noise, shape, device: torch.device) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)} (batch_size, *x_dims); got "
                         f"{tuple(noise.shape)}")
    if noise.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"noise must be float32 or float64, got {noise.dtype}")
    if not _same_device(noise.device, device):
        raise ValueError(f"noise is on {noise.device}; expected the sampling device {device}")
    if not noise.is_contiguous():
        raise ValueError("noise must be contiguous (it is handed to step_fn as the first state)")
