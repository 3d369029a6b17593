"""``FlowMatching``: the drop-in sampler (API, validation, the integration loop, training helpers)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import backends
from .base import BaseDiffusion, StepFn
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

    __slots__ = ("states",)

    def __init__(self, x0: torch.Tensor, steps: int):
        b, *dims = x0.shape
        self.states = torch.empty((b, steps + 1, *dims), dtype=x0.dtype, device=x0.device)
        self.states[:, 0].copy_(x0)

    def slot(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """The view ``states[:, i]``, in ``dtype`` (upgrading the buffer when needed)."""
        if dtype != self.states.dtype:
            wider = torch.empty(self.states.shape, dtype=dtype, device=self.states.device)
            wider[:, :i].copy_(self.states[:, :i])
            self.states = wider
        return self.states[:, i]


def euler_loop(x, grid: TimeGrid, step_fn, backend, trajectory: Optional[Trajectory] = None):
    """The Euler integration: one field call and one fused update per step. Returns the last state.

    Every state handed to ``step_fn`` is a fresh contiguous buffer that is never written again.
    """
    for i in range(grid.steps):
        v = check_field(step_fn(x=x, t=grid.t_views[i]), x)
        dtype = result_dtype(x.dtype, v)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        traj = trajectory.slot(i + 1, dtype) if trajectory is not None else None
        update = backend.euler_step if kernel_supports(x, v) else reference.euler_step
        update(x, v, grid, i, out, traj)
        x = out
    return x


class FlowMatching(BaseDiffusion):
    """Flow-matching sampler, a drop-in replacement for Alpamayo-R1's ``FlowMatching``.

    Positional arguments keep the original order; our own options are keyword-only:

    - ``backend``: ``"auto" | "torch" | "triton" | "cuda"`` (default: the ``FLOWMATCH_FAST_BACKEND``
      environment variable, else ``"auto"``).
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
        **kwargs,
    ):
        """Integrate ``step_fn`` from Gaussian noise (t=0) to data (t=1).

        Returns ``x`` ``[B, *x_dims]``, or with ``return_all_steps=True`` the tuple
        ``(states [B, T+1, *x_dims], grid [T+1])``.
        """
        steps, _ = self._resolve_call(batch_size, inference_step, int_method)
        device = torch.device(device)
        backend = backends.resolve(self.backend, device)
        x = torch.randn(batch_size, *self.x_dims, device=device)
        grid = TimeGrid(torch.linspace(0.0, 1.0, steps + 1, device=device), batch_size, x.dim())
        trajectory = Trajectory(x, steps) if return_all_steps else None
        x = euler_loop(x, grid, step_fn, backend, trajectory)
        if return_all_steps:
            return trajectory.states, grid.values
        return x

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
