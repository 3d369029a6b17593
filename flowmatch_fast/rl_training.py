"""The RL recipes' training side (``flowmatch_fast.alpamayo1_x_rl.FlowMatching``'s mixin): the
training data with the classifier-free drop mask, the losses, and ``_batched_sde_logprob``, the
log-probabilities of stored rollouts (all steps at once, differentiable in the model's output)
that GRPO's policy loss and KL to a reference policy are built from. Plain PyTorch, the recipes'
ops in their order (SPEC.md, "The RL recipes' FlowMatching")."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .flow_matching import training_data


class RecipesTraining:
    """The training helpers of the RL recipes' sampler (attributes ``train_timestep_sampler``,
    ``train_ignore_guidance_rate``, ``use_classifier_free_guidance``, ``beta_dist``)."""

    def construct_training_data(self, x: torch.Tensor) -> dict:
        """Noisy inputs for one training step (``noisy_x = t * x + (1 - t) * noise``); with
        guidance on, the drop mask ``rand(B) < train_ignore_guidance_rate``, drawn last."""
        data = training_data(self, x, f"Invalid time sampler: {self.train_timestep_sampler} "
                                      "(expected 'uniform' or 'beta')")
        if self.use_classifier_free_guidance:
            data["is_drop_guidance"] = (torch.rand(x.shape[0], device=x.device)
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
