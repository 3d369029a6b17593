"""``FlowMatching``: the drop-in sampler (API, validation, the integration loop, training helpers)."""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import backends
from .base import BaseDiffusion, StepFn
from .graph import CapturedSampler, GraphCache, field_key, warn_not_cuda
from .kernels import reference
from .kernels.reference import TimeGrid, kernel_supports, result_dtype

INT_METHODS = ("euler",)
TIMESTEP_SAMPLERS = ("uniform", "beta")


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_field(v, x: torch.Tensor) -> torch.Tensor:
    """Validate what ``step_fn`` returned against the state ``x`` (the SPEC's error cases)."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"step_fn must return a torch.Tensor, got {type(v).__name__}")
    if v.shape != x.shape:
        try:
            shape = torch.broadcast_shapes(v.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(
                f"step_fn returned a tensor of shape {tuple(v.shape)}; expected one that broadcasts "
                f"to the state's shape {tuple(x.shape)} without changing it"
            )
    if v.device != x.device:
        raise ValueError(
            f"step_fn returned a tensor on {v.device}; expected it on the sampling device {x.device}"
        )
    return v


class Trajectory:
    """The contiguous ``[B, T+1, *x_dims]`` output, written one slot per step (no final stack).

    Its dtype follows the states' promotion: a float64 field turns a float32 trajectory into a
    float64 one (the slots written so far are copied over exactly), as ``torch.stack`` would.
    """

    __slots__ = ("states", "slots", "dtype")

    def __init__(self, x0: torch.Tensor, steps: int):
        b, *dims = x0.shape
        self.states = torch.empty((b, steps + 1, *dims), dtype=x0.dtype, device=x0.device)
        self.slots = self.states.unbind(1)  # all views at once: one call instead of one per step
        self.slots[0].copy_(x0)
        self.dtype = x0.dtype

    def slot(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """The view ``states[:, i]``, in ``dtype`` (upgrading the buffer when needed)."""
        if dtype is not self.dtype:
            wider = torch.empty(self.states.shape, dtype=dtype, device=self.states.device)
            wider[:, :i].copy_(self.states[:, :i])
            self.states = wider
            self.slots = wider.unbind(1)
            self.dtype = dtype
        return self.slots[i]


def euler_loop(x, grid: TimeGrid, step_fn, backend, trajectory: Optional[Trajectory] = None):
    """The Euler integration: one field call and one fused update per step. Returns the last state.

    Every state handed to ``step_fn`` is a fresh contiguous buffer that is never written again.
    The loop body is kept lean on purpose: on CPU it runs in a few microseconds per step.
    """
    t_views = grid.t_views
    fused = backend.euler_step
    plain = reference.euler_step
    has_kernel = fused is not plain
    for i in range(grid.steps):
        v = step_fn(x=x, t=t_views[i])
        if type(v) is not torch.Tensor or v.shape != x.shape or v.device != x.device:
            check_field(v, x)
        slot = None if trajectory is None else trajectory.slot(i + 1, result_dtype(x.dtype, v))
        update = fused if has_kernel and kernel_supports(x, v) else plain
        x = update(x, v, grid, i, None, slot)
    return x


class FlowMatching(BaseDiffusion):
    """Flow-matching sampler, a drop-in replacement for Alpamayo-R1's ``FlowMatching``.

    Positional arguments keep the original order; our own options are keyword-only:

    - ``backend``: ``"auto" | "torch" | "triton" | "cuda"`` (default: the ``FLOWMATCH_FAST_BACKEND``
      environment variable, else ``"auto"``).
    - ``cuda_graph``: capture each distinct sampling call in a CUDA graph and replay it
      (default ``False``; ``sample(..., cuda_graph=...)`` overrides it per call).
    - ``max_graphs``: bound of that cache (default 8); past it, new signatures run eagerly.
    """

    def __init__(
        self,
        int_method: str = "euler",
        train_timestep_sampler: str = "beta",
        num_inference_steps: int = 10,
        train_ignore_guidance_rate: float = 0.1,
        inference_guidance_weight: float = 1.0,
        *args,
        backend: Optional[str] = None,
        cuda_graph: bool = False,
        max_graphs: int = 8,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if int_method not in INT_METHODS:
            raise ValueError(f"int_method must be one of {INT_METHODS}; got {int_method!r}")
        if train_timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ValueError(
                f"train_timestep_sampler must be one of {TIMESTEP_SAMPLERS}; "
                f"got {train_timestep_sampler!r}"
            )
        _check_positive_int("num_inference_steps", num_inference_steps)
        self.int_method = int_method
        self.train_timestep_sampler = train_timestep_sampler
        self.num_inference_steps = num_inference_steps
        self.train_ignore_guidance_rate = train_ignore_guidance_rate
        self.inference_guidance_weight = inference_guidance_weight
        self.backend = backends.check_backend_name(backend)
        self.cuda_graph = bool(cuda_graph)
        self._graphs = GraphCache(max_graphs)
        self._warned_not_cuda = False
        if train_timestep_sampler == "beta":
            # Plain attributes, not buffers: state_dict() stays {} and .to(dtype) cannot touch them.
            self.beta_dist = torch.distributions.Beta(
                torch.tensor(1.5, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)
            )
            self.beta_scale_constant = 0.999

    # ------------------------------------------------------------------ sampling
    def _resolve_call(self, batch_size, inference_step, int_method):
        _check_positive_int("batch_size", batch_size, minimum=0)
        steps = self.num_inference_steps if inference_step is None else inference_step
        _check_positive_int("inference_step", steps)
        method = self.int_method if int_method is None else int_method
        if method not in INT_METHODS:
            raise ValueError(f"int_method must be one of {INT_METHODS}; got {method!r}")
        return steps, method

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        step_fn: StepFn,
        device: Union[torch.device, str] = torch.device("cpu"),
        return_all_steps: bool = False,
        inference_step: Optional[int] = None,
        int_method: Optional[str] = None,
        *args,
        cuda_graph: Optional[bool] = None,
        **kwargs,
    ):
        """Integrate ``step_fn`` from Gaussian noise (t=0) to data (t=1).

        Returns ``x`` ``[B, *x_dims]``, or with ``return_all_steps=True`` the tuple
        ``(states [B, T+1, *x_dims], grid [T+1])``.
        """
        steps, method = self._resolve_call(batch_size, inference_step, int_method)
        device = torch.device(device)
        backend = backends.resolve(self.backend, device)
        run = functools.partial(self._run, batch_size, step_fn, device, steps, method,
                                return_all_steps, backend)
        use_graph = self.cuda_graph if cuda_graph is None else cuda_graph
        if not use_graph:
            return run()
        if device.type != "cuda":
            if not self._warned_not_cuda:
                self._warned_not_cuda = True
                warn_not_cuda(device)
            return run()
        if torch.cuda.is_current_stream_capturing():  # inside the caller's own graph: just run
            return run()
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        fkey, watch = field_key(step_fn)
        key = (fkey, device, batch_size, steps, method, bool(return_all_steps), backend.__name__)
        sampler = self._graphs.lookup(key)
        if sampler is None:
            if not self._graphs.has_room():
                self._graphs.stats.eager_fallbacks += 1
                return run()
            sampler = self._graphs.add(key, watch, lambda: CapturedSampler(
                run, device, pool=self._graphs.pool(device), keep_alive=False))
        return sampler()

    def _run(self, batch_size, step_fn, device, steps, method, return_all_steps, backend):
        """The eager sampling call (also what a CUDA graph captures)."""
        x = torch.randn(batch_size, *self.x_dims, device=device)
        grid = TimeGrid(torch.linspace(0.0, 1.0, steps + 1, device=device), batch_size, x.dim())
        trajectory = Trajectory(x, steps) if return_all_steps else None
        x = euler_loop(x, grid, step_fn, backend, trajectory)
        if return_all_steps:
            return trajectory.states, grid.values
        return x

    @torch.no_grad()
    def capture(
        self,
        batch_size: int,
        step_fn: StepFn,
        device: Union[torch.device, str] = "cuda",
        return_all_steps: bool = False,
        inference_step: Optional[int] = None,
        int_method: Optional[str] = None,
        *,
        warmup: int = 2,
    ) -> CapturedSampler:
        """Capture one sampling call (noise, every field call, every update) in a CUDA graph.

        ``sampler = fm.capture(6, step_fn, device="cuda")``; ``sampler()`` replays it and returns a
        fresh result (``sampler(static_output=True)``: the graph's own buffers). The field must
        keep the contract in :mod:`flowmatch_fast.graph` (static shapes, inputs updated in place,
        no host syncs). Raises ``RuntimeError`` on a non-CUDA device.
        """
        steps, method = self._resolve_call(batch_size, inference_step, int_method)
        device = torch.device(device)
        if device.type != "cuda":
            raise RuntimeError(
                f"FlowMatching.capture needs a CUDA device; got {str(device)!r}. "
                "On CPU, call FlowMatching.sample (eager) instead."
            )
        backend = backends.resolve(self.backend, device)
        run = functools.partial(self._run, batch_size, step_fn, device, steps, method,
                                return_all_steps, backend)
        return CapturedSampler(run, device, warmup=warmup)

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

    # ------------------------------------------------------------------ training
    def construct_training_data(self, x: torch.Tensor) -> dict:
        """Noisy inputs for one training step: ``noisy_x = t * x + (1 - t) * noise``."""
        batch_size = x.shape[0]
        if self.train_timestep_sampler == "uniform":
            timesteps = torch.rand((batch_size,), device=x.device)
        else:
            timesteps = self.beta_dist.sample((batch_size,)).to(x.device)
            timesteps = self.beta_scale_constant - timesteps * self.beta_scale_constant
        timesteps = timesteps.view(batch_size, *([1] * (x.dim() - 1)))
        noise = torch.randn_like(x)
        noisy_x = timesteps * x + (1 - timesteps) * noise
        return {
            "x": x,
            "noisy_x": noisy_x,
            "timesteps": timesteps,
            "noise": noise,
            "is_drop_guidance": None,
        }

    def compute_loss_from_pred(self, training_data: dict, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error between ``pred`` and the velocity target ``x - noise``."""
        target = (training_data["x"] - training_data["noise"]).to(pred.dtype)
        return F.mse_loss(target, pred)
