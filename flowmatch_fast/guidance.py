"""Classifier-free guidance through a second, unguided field, as Alpamayo 1.5 and the RL recipes
do it: the guided field first, then the unguided one, ``(1 - w) * vu + w * vg`` as PyTorch
evaluates it. The classes of both share this mixin: the originals' static ``_guided_v`` (which
third-party loops call) and the fields a plan calls (a replacement of ``_guided_v`` on the
instance or a subclass makes the velocity, called as the originals' loops call it)."""

from __future__ import annotations

import functools

import torch

from . import base
from .arguments import mix_weight
from .base import StepFn
from .kernels import reference


class TwoFields:
    """The mixin (see the module doc); ``options`` are :class:`flowmatch_fast.sampling.Options`."""

    @staticmethod
    def _guided_v(step_fn: StepFn, x: torch.Tensor, t: torch.Tensor, unguided_step_fn: StepFn,
                  inference_guidance_weight: float):
        """The originals' guided velocity: ``step_fn`` first, then ``unguided_step_fn``, and
        ``(1 - w) * vu + w * vg`` as PyTorch evaluates it."""
        return reference.mixed_velocity(step_fn(x=x, t=t), unguided_step_fn(x=x, t=t),
                                        inference_guidance_weight)

    def _fields(self, step_fn, unguided_step_fn, use, weight, options):
        """(the fields the plan calls, guided first; ``options`` with the guidance) of one call
        whose guidance (``use``, ``weight``) is resolved."""
        if not use:
            return (step_fn,), options
        if unguided_step_fn is None:
            raise ValueError("use_classifier_free_guidance is on but no unguided_step_fn was "
                             "given: pass the unguided field as the third argument of sample")
        guided_v = base.override_of(self, "_guided_v", TwoFields._guided_v)
        if guided_v is not None:
            return (functools.partial(guided_v, step_fn=step_fn, unguided_step_fn=unguided_step_fn,
                                      inference_guidance_weight=weight),), options
        return (step_fn, unguided_step_fn), options._replace(guidance="mix",
                                                             weight=mix_weight(weight))
