"""Drop-in for the RL recipes' sampler: ``from flowmatch_fast.alpamayo1_x_rl import FlowMatching``.

NVIDIA's alpamayo-recipes (``recipes/alpamayo1_x_rl/diffusion/flow_matching.py``) post-train the
action expert with GRPO: rollouts sample with an SDE that also returns each rollout's
log-probability, training replays stored rollouts (``samples_list``) and scores them with
``_batched_sde_logprob``. This module is that API over the shared machinery: planning and the
graph cache (:mod:`flowmatch_fast.sampling`), the integrators, the SDE (:mod:`flowmatch_fast.sde`:
one fused launch per step on the Triton and CUDA backends), per-row generators
(:mod:`flowmatch_fast.noise`). SPEC.md ("The RL recipes' FlowMatching") states the semantics.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from . import base
from .arguments import check_real
from .base import StepFn
from .sampling import Options, Sampling
from .sde import RolloutOptions

__all__ = ["BaseDiffusion", "FlowMatching", "StepFn"]

BaseDiffusion = base.BaseDiffusion  # the recipes subclass Alpamayo-R1's base
INT_METHODS = ("euler", "midpoint", "sde")
_PLAN_METHODS = {"euler": "euler", "midpoint": "midpoint-rl", "sde": "sde"}


class FlowMatching(Sampling, base.BaseDiffusion):
    """Flow-matching sampler, a drop-in replacement for the RL recipes' ``FlowMatching``.

    ``FlowMatching(int_method, train_timestep_sampler, num_inference_steps,
    train_ignore_guidance_rate, inference_guidance_weight, use_classifier_free_guidance, *args,
    **kwargs)`` (``x_dims`` by keyword, to R1's base); ``int_method`` in ``"euler"``,
    ``"midpoint"``, ``"sde"``. Our options are keyword-only: ``backend``, ``cuda_graph``,
    ``max_graphs``, as on the other classes.
    """

    _methods = tuple(_PLAN_METHODS.values())

    def __init__(
        self,
        int_method: str = "euler",
        train_timestep_sampler: str = "beta",
        num_inference_steps: int = 10,
        train_ignore_guidance_rate: float = 0.1,
        inference_guidance_weight: float = 1.0,
        use_classifier_free_guidance: bool = False,
        *args,
        backend: Optional[str] = None,
        cuda_graph: bool = False,
        max_graphs: int = 8,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # As the recipes: kept as given, checked where used (sample, construct_training_data).
        self.int_method = int_method
        self.train_timestep_sampler = train_timestep_sampler
        self.num_inference_steps = num_inference_steps
        self.train_ignore_guidance_rate = train_ignore_guidance_rate
        self.inference_guidance_weight = inference_guidance_weight
        self.use_classifier_free_guidance = use_classifier_free_guidance
        self._init_options(backend, cuda_graph, max_graphs)
        if train_timestep_sampler == "beta":
            # Plain attributes, not buffers: state_dict() stays {} and .to(dtype) cannot touch them.
            self.beta_dist = torch.distributions.Beta(
                torch.tensor(1.5, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32))
            self.beta_scale_constant = 0.999

    # ------------------------------------------------------------------ sampling
    def _call(self, unguided_step_fn, return_all_steps, inference_step, timesteps, int_method,
              inference_guidance_weight, use_classifier_free_guidance, temperature, generator,
              noise_level, samples_list, sde_type, return_info):
        """(fields the plan calls, :class:`Options`, return form) of one call, with the
        recipes' fall-backs (``or`` for the method and the weight) and errors."""
        method = int_method or self.int_method
        weight = inference_guidance_weight or self.inference_guidance_weight
        use = (self.use_classifier_free_guidance if use_classifier_free_guidance is None
               else use_classifier_free_guidance)
        if use and unguided_step_fn is None:
            raise ValueError("unguided_step_fn is required when using classifier free guidance")
        steps = self.num_inference_steps if inference_step is None else inference_step
        if method not in INT_METHODS:
            raise ValueError(f"Invalid integration method: {self.int_method} (int_method must be "
                             f"one of {INT_METHODS}; got {method!r})")
        rollout, form = None, "all_steps" if return_all_steps else "x"
        if method == "sde":
            if self.use_classifier_free_guidance and unguided_step_fn is None:  # the recipes
                raise ValueError("unguided_step_fn is required when using classifier free "
                                 "guidance")  # check the attribute again, whatever the call says
            form = "info" if return_info else form
            rollout = RolloutOptions(timesteps, noise_level, samples_list, sde_type, form != "x")
            return_all_steps = False
        else:
            steps = steps or self.num_inference_steps  # the recipes' _euler / _midpoint
        fields = (unguided_step_fn,) if use else ()
        options = Options(return_all_steps, steps, _PLAN_METHODS[method], "mix" if use else None,
                          check_real("inference_guidance_weight", weight) if use else 1.0,
                          temperature, None, None, None, generator, rollout)
        return fields, options, form

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        step_fn: StepFn,
        unguided_step_fn: Optional[StepFn] = None,
        device: Union[torch.device, str] = torch.device("cpu"),
        return_all_steps: bool = False,
        inference_step: Optional[int] = None,
        timesteps: Optional[list] = None,
        int_method: Optional[str] = None,
        inference_guidance_weight: Optional[float] = None,
        use_classifier_free_guidance: Optional[bool] = None,
        temperature: float = 1.0,
        *args,
        cuda_graph: Optional[bool] = None,
        generator=None,
        noise_level: float = 0.7,
        samples_list: Optional[list] = None,
        sde_type: str = "sde",
        return_info: bool = False,
        **kwargs,
    ):
        """Sample as the recipes do: ``"euler"`` / ``"midpoint"`` return ``x`` or, with
        ``return_all_steps``, ``(states [B, T+1, ...], grid)``; ``"sde"`` returns ``x``, or the
        pair ``(all_steps, timesteps)``, or with ``return_info=True`` the dict ``{x, log_prob,
        all_steps, timesteps}`` (``log_prob`` ``[B]``: the mean over steps of each step's
        per-element mean). ``generator``: one ``torch.Generator`` or a list with one per row
        (row ``i`` then depends on ``generator[i]`` alone); ``samples_list``: the ``T + 1``
        states of a stored rollout to score instead of drawing; ``timesteps``: the SDE's grid
        (``T + 1`` numbers). ``cuda_graph``: the bounded graph cache, as on the other classes.
        """
        base.warn_unknown_keywords("alpamayo1_x_rl.FlowMatching.sample", kwargs)
        fields, options, form = self._call(
            unguided_step_fn, return_all_steps, inference_step, timesteps, int_method,
            inference_guidance_weight, use_classifier_free_guidance, temperature, generator,
            noise_level, samples_list, sde_type, return_info)
        return _returned(self._sample((step_fn, *fields), batch_size, device, cuda_graph,
                                      options), form, options.rollout is not None)

    @torch.no_grad()
    def capture(
        self,
        batch_size: int,
        step_fn: StepFn,
        unguided_step_fn: Optional[StepFn] = None,
        device: Union[torch.device, str] = "cuda",
        return_all_steps: bool = False,
        inference_step: Optional[int] = None,
        timesteps: Optional[list] = None,
        int_method: Optional[str] = None,
        inference_guidance_weight: Optional[float] = None,
        use_classifier_free_guidance: Optional[bool] = None,
        temperature: float = 1.0,
        *,
        warmup: int = 2,
        generator=None,
        noise_level: float = 0.7,
        samples_list: Optional[list] = None,
        sde_type: str = "sde",
        return_info: bool = False,
    ) -> "RolloutSampler":
        """Capture one whole call (initial noise, every field call, every step's noise draw and
        fused update, the log-prob reductions) in a CUDA graph; ``sampler()`` replays it and
        returns what :meth:`sample` returns. A ``generator`` (one, or one per row) advances on
        every replay; ``samples_list`` tensors are read on every replay (update them in place).
        """
        fields, options, form = self._call(
            unguided_step_fn, return_all_steps, inference_step, timesteps, int_method,
            inference_guidance_weight, use_classifier_free_guidance, temperature, generator,
            noise_level, samples_list, sde_type, return_info)
        captured = self._capture((step_fn, *fields), batch_size, device, warmup, options)
        return RolloutSampler(captured, form, options.rollout is not None)

    @staticmethod
    def _guided_v(step_fn: StepFn, x: torch.Tensor, t: torch.Tensor, unguided_step_fn: StepFn,
                  inference_guidance_weight: float) -> torch.Tensor:
        """The guided velocity ``(1 - w) * vu + w * vg``, the guided field called first."""
        guided = step_fn(x=x, t=t)
        unguided = unguided_step_fn(x=x, t=t)
        return (1 - inference_guidance_weight) * unguided + inference_guidance_weight * guided

    # ------------------------------------------------------------------ training
    def construct_training_data(self, x: torch.Tensor) -> dict:
        """Noisy inputs for one training step (``noisy_x = t * x + (1 - t) * noise``); with
        guidance on, the drop mask ``rand(B) < train_ignore_guidance_rate``, drawn last."""
        batch_size = x.shape[0]
        if self.train_timestep_sampler == "uniform":
            t = torch.rand((batch_size,), device=x.device)
        elif self.train_timestep_sampler == "beta":
            t = self.beta_dist.sample((batch_size,)).to(x.device)
            t = self.beta_scale_constant - t * self.beta_scale_constant
        else:
            raise ValueError(f"Invalid time sampler: {self.train_timestep_sampler} (expected "
                             "'uniform' or 'beta')")
        t = t.reshape(batch_size, *[1] * (x.dim() - 1))
        noise = torch.randn_like(x)
        data = {"x": x, "noisy_x": t * x + (1 - t) * noise, "timesteps": t, "noise": noise,
                "is_drop_guidance": None}
        if self.use_classifier_free_guidance:
            data["is_drop_guidance"] = (torch.rand(batch_size, device=x.device)
                                        < self.train_ignore_guidance_rate)
        return data

    def compute_loss_from_pred(self, training_data: dict, pred: torch.Tensor) -> torch.Tensor:
        """``mse_loss(x - noise, pred)`` (no cast: PyTorch's promotion decides)."""
        return F.mse_loss(training_data["x"] - training_data["noise"], pred)

    def compute_loss_from_step_fn(self, x: torch.Tensor, step_fn, guidance: Any = None):
        """The loss of a simple differentiable field; with guidance on, the field also gets
        ``guidance=`` and a drop mask drawn afresh (as the recipes do, after the training data's)."""
        data = self.construct_training_data(x)
        if self.use_classifier_free_guidance:
            drop = torch.rand(x.shape[0], device=x.device) < self.train_ignore_guidance_rate
            pred = step_fn(x=data["noisy_x"], t=data["timesteps"], guidance=guidance,
                           is_drop_guidance=drop)
        else:
            pred = step_fn(x=data["noisy_x"], t=data["timesteps"])
        return self.compute_loss_from_pred(data, pred)

    def _batched_sde_logprob(self, model_output: torch.Tensor, timesteps: torch.Tensor,
                             sample: torch.Tensor, ref_model_output: Optional[torch.Tensor] = None,
                             noise_level: float = 0.7):
        """Log-probabilities of stored rollouts, all steps at once and differentiable in
        ``model_output`` ``[B, T, ...]``: ``(log_prob [B], kl [B] or None)``. ``timesteps``
        ``[B, T+1]``, ``sample`` ``[B, T+1, ...]``; ``kl`` against ``ref_model_output``. The same
        ops in the same order as the recipes (the rollout's step, with tensor ``sigma``, ``dt``)."""
        t, t_next = timesteps[:, :-1], timesteps[:, 1:]
        sigma = 1 - t
        dt = t_next - t
        sqdt = torch.sqrt(dt)
        per_step = [sample.shape[0], -1, *[1] * (sample.dim() - 2)]  # [B, T] -> [B, T, 1, ...]
        std = torch.sqrt(sigma / (1 - sigma.clip(max=1 - timesteps[0, 1].item()))) * noise_level
        keep = (1 - std**2 / (2 * sigma) * dt).reshape(per_step)
        drift = ((1 + std**2 * (1 - sigma) / (2 * sigma)) * dt).reshape(per_step)
        mean = sample[:, :-1] * keep + model_output * drift
        scale = std * sqdt
        log_prob = (-((sample[:, 1:].detach() - mean) ** 2) / (2 * scale**2).reshape(per_step)
                    - torch.log(scale).reshape(per_step)
                    - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
        log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
        if ref_model_output is None:
            return log_prob, None
        weight = (dt / 2 * (std * t / 2 / (1 - t) + 1 / std) ** 2).reshape(per_step)
        kl = weight * (ref_model_output - model_output) ** 2
        return log_prob, kl.mean(dim=tuple(range(1, kl.ndim)))


def _returned(out, form: str, sde: bool):
    """What ``sample`` returns from what the run produced: the SDE's ``(x, log_prob[, all_steps,
    timesteps])``, or the integrators' ``x`` / ``(states, grid)``."""
    if not sde:
        return out
    if form == "info":
        x, log_prob, all_steps, timesteps = out
        return {"x": x, "log_prob": log_prob, "all_steps": all_steps, "timesteps": timesteps}
    if form == "all_steps":
        return out[2], out[3]
    return out[0]


class RolloutSampler:
    """A captured call of the RL class: ``sampler()`` replays it and returns what ``sample``
    returns (fresh tensors; ``static_output=True``: the graph's own buffers)."""

    def __init__(self, captured, form: str, sde: bool):
        self.captured = captured
        self._form = form
        self._sde = sde

    def __call__(self, static_output: bool = False):
        return _returned(self.captured(static_output=static_output), self._form, self._sde)
