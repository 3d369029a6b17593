"""``FlowMatching``: the drop-in sampler of Alpamayo-R1 (its API and training helpers) over the
shared sampling machinery of :mod:`flowmatch_fast.sampling`."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import base
from .base import BaseDiffusion, StepFn
from .graph import CapturedSampler
from .arguments import check_bool, check_real, check_scalar, euler_steps
from .sampling import INT_METHODS, Options, Sampling

__all__ = ["FlowMatching", "INT_METHODS", "Options", "TIMESTEP_SAMPLERS"]

TIMESTEP_SAMPLERS = ("uniform", "beta")


def _r1_options(fm, return_all_steps=False, inference_step=None, int_method=None, guidance=False,
                guidance_weight=None, timesteps=None, shift=None, noise=None,
                generator=None) -> Options:
    """The R1 class's call as :class:`Options`; ``guidance=`` / ``guidance_weight=`` checked."""
    guidance = check_bool("guidance", guidance)
    if guidance_weight is not None:
        weight = check_real("guidance_weight", guidance_weight)
        if not guidance:
            raise ValueError("guidance_weight= needs guidance=True (the doubled-batch field "
                             "protocol)")
    elif guidance:  # the original never reads inference_guidance_weight: only guidance does
        weight = check_scalar("inference_guidance_weight", fm.inference_guidance_weight)
    else:
        weight = 1.0
    return Options(return_all_steps, inference_step, int_method, "batch" if guidance else None,
                   weight, 1.0, timesteps, shift, noise, generator)


class FlowMatching(Sampling, BaseDiffusion):
    """Flow-matching sampler, a drop-in replacement for Alpamayo-R1's ``FlowMatching``.

    Required keyword ``x_dims`` (int or sequence of ints): the shape of one sample, without the
    batch, e.g. ``FlowMatching(x_dims=(64, 2))``; it travels in ``**kwargs`` to
    :class:`BaseDiffusion`, as in the original, and is stored as a list. ``sample`` returns
    ``[B, *x_dims]``.

    Positional arguments keep the original order; our own options are keyword-only:

    - ``backend``: ``"auto" | "torch" | "triton" | "cuda"`` (default: the ``FLOWMATCH_FAST_BACKEND``
      environment variable, else ``"auto"``).
    - ``cuda_graph``: capture each distinct sampling call in a CUDA graph (on its second call)
      and replay it (default ``False``; ``sample(..., cuda_graph=...)`` overrides it per call).
    - ``max_graphs``: bound of that cache (default 8); past it, new signatures run eagerly.
    - ``compile``: ``True`` runs each sampling call as one ``torch.compile`` region, bitwise the
      eager call (compiled on a signature's second call; :mod:`flowmatch_fast.compiled`),
      ``"checked"`` also compares its first compiled call with the eager one and warns on a
      difference (default ``False``; ``sample(..., compile=...)`` overrides it per call).
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
        compile: Union[bool, str] = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_sampling(int_method, num_inference_steps, backend, cuda_graph, max_graphs,
                            compile)
        self.train_timestep_sampler = train_timestep_sampler
        self.train_ignore_guidance_rate = train_ignore_guidance_rate
        self.inference_guidance_weight = inference_guidance_weight
        if train_timestep_sampler == "beta":
            # Plain attributes, not buffers: state_dict() stays {} and .to(dtype) cannot touch them.
            self.beta_dist = torch.distributions.Beta(
                torch.tensor(1.5, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)
            )
            self.beta_scale_constant = 0.999

    # ------------------------------------------------------------------ sampling
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
        compile: Optional[Union[bool, str]] = None,
        guidance: bool = False,
        guidance_weight: Optional[float] = None,
        timesteps=None,
        shift: Optional[float] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``step_fn`` from Gaussian noise (t=0) to data (t=1).

        Returns ``x`` ``[B, *x_dims]``, or with ``return_all_steps=True`` the tuple
        ``(states [B, T+1, *x_dims], grid [T+1])``. Keyword-only options (ours):

        - ``cuda_graph``: use the bounded graph cache for this call (default: the constructor's);
        - ``compile``: ``False``, ``True`` or ``"checked"`` for this call (default: the
          constructor's); with ``cuda_graph`` on a GPU, the compiled region is what is captured;
        - ``int_method`` also takes ``"midpoint"``, ``"heun"``, ``"rk4"`` (fixed-step);
        - ``guidance=True``: the field is called on the doubled batch ``[x; x]`` (rows ``:B``
          conditional, ``B:`` unconditional) and ``v = vu + w * (vc - vu)`` with
          ``w = guidance_weight`` (default ``inference_guidance_weight``); ``w = 1`` is plain
          sampling with the conditional half, bitwise;
        - ``timesteps``: an explicit increasing grid from 0 to 1 (``T + 1`` entries);
          ``shift``: SD3's ``shift * s / (1 + (shift - 1) * s)`` on the noise level ``s = 1 - t``;
        - ``noise``: the initial state ``[B, *x_dims]`` (float32 or float64, on ``device``);
          ``generator``: the ``torch.Generator`` the noise is drawn from.
        """
        base.warn_unknown_keywords("FlowMatching.sample", kwargs, type(self))
        options = _r1_options(self, return_all_steps, inference_step, int_method, guidance,
                              guidance_weight, timesteps, shift, noise, generator)
        euler = base.euler_override(self, int_method, _OWN_EULER)
        if euler is not None:  # replaced on the instance or a subclass: called as the original does
            with base.passing_through((options, cuda_graph, compile)):
                return euler(batch_size=batch_size, step_fn=step_fn, device=device,
                             return_all_steps=return_all_steps, inference_step=euler_steps(
                                 inference_step, self.num_inference_steps, timesteps))
        return self._sample((step_fn,), batch_size, device, cuda_graph, options, compile)

    def _euler(self, batch_size: int, step_fn: StepFn, device=torch.device("cpu"),
               return_all_steps: bool = False, inference_step: Optional[int] = None):
        """The original's private Euler integrator, which third-party code calls and wraps:
        its signature and its result. The options of ours given to the ``sample`` call that
        reached it (through a wrapper) apply; its own arguments win."""
        options, cuda_graph, compile = base.passed_through() or (Options(), None, None)
        return self._sample((step_fn,), batch_size, device, cuda_graph, options._replace(
            return_all_steps=return_all_steps, inference_step=inference_step, int_method="euler"),
            compile)

    @base.capture_like(sample)
    @torch.no_grad()
    def capture(self, batch_size, step_fn, device, return_all_steps, inference_step, int_method, *,
                warmup, compile, guidance, guidance_weight, timesteps, shift, noise,
                generator) -> CapturedSampler:
        """Capture one sampling call (noise, every field call, every update) in a CUDA graph.

        ``sampler = fm.capture(6, step_fn, device="cuda")``; ``sampler()`` replays it and returns a
        fresh result (``sampler(static_output=True)``: the graph's own buffers). Options as in
        :meth:`sample`; a ``noise`` tensor is read on every replay (update it in place), a
        ``generator`` advances on every replay. The field must keep the contract in
        :mod:`flowmatch_fast.graph` (static shapes, inputs updated in place, no host syncs).
        ``compile``: capture the compiled region (compiled during the warm-up) instead of the
        eager loop. Raises ``RuntimeError`` on a non-CUDA device.
        """
        return self._capture((step_fn,), batch_size, device, warmup, _r1_options(
            self, return_all_steps, inference_step, int_method, guidance, guidance_weight,
            timesteps, shift, noise, generator), compile)

    # ------------------------------------------------------------------ training
    def construct_training_data(self, x: torch.Tensor) -> dict:
        """Noisy inputs for one training step: ``noisy_x = t * x + (1 - t) * noise``."""
        # the original constructs with any sampler name and fails here, where it is used
        return training_data(self, x, f"train_timestep_sampler must be one of "
                                      f"{TIMESTEP_SAMPLERS}; got {self.train_timestep_sampler!r}")

    def compute_loss_from_pred(self, training_data: dict, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error between ``pred`` and the velocity target ``x - noise``."""
        target = (training_data["x"] - training_data["noise"]).to(pred.dtype)
        return F.mse_loss(target, pred)


_OWN_EULER = FlowMatching._euler  # what `sample` runs itself, unless replaced


def training_data(sampler, x: torch.Tensor, invalid: str) -> dict:
    """The training data of one step, as the originals draw it (t, then the noise): ``t`` from
    ``sampler.train_timestep_sampler`` (``"uniform"``: ``rand``; ``"beta"``: its ``beta_dist``
    on the CPU, scaled to ``0.999 - u * 0.999``), shaped ``[B, 1, ...]``; ``noisy_x = t * x +
    (1 - t) * noise``. ``invalid``: the error of another sampler name (each original words it
    its own way). Shared by the R1 class and the RL recipes' training helpers."""
    batch_size = x.shape[0]
    if sampler.train_timestep_sampler == "uniform":
        t = torch.rand((batch_size,), device=x.device)
    elif sampler.train_timestep_sampler == "beta":
        t = sampler.beta_dist.sample((batch_size,)).to(x.device)
        t = sampler.beta_scale_constant - t * sampler.beta_scale_constant
    else:
        raise ValueError(invalid)
    t = t.view(batch_size, *([1] * (x.dim() - 1)))
    noise = torch.randn_like(x)
    return {"x": x, "noisy_x": t * x + (1 - t) * noise, "timesteps": t, "noise": noise,
            "is_drop_guidance": None}
