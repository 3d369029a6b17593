"""Drop-in for Alpamayo 1.5's sampler: ``from flowmatch_fast.alpamayo1_5 import FlowMatching``.

Alpamayo 1.5 (``alpamayo1_5.diffusion.flow_matching``) has its own API: another constructor order,
classifier-free guidance through a second field (``unguided_step_fn``, called after the guided one
every step, ``v = (1 - w) * vu + w * vg``) and a ``temperature`` on the initial noise. This module
is that API over the same planning, integration, kernels and graph cache as the R1 class
(:class:`flowmatch_fast.sampling.Sampling`); ``../SPEC.md`` states its semantics.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import base
from .base import StepFn
from .arguments import check_real
from .sampling import Options, Sampling
from .graph import CapturedSampler

__all__ = ["BaseDiffusion", "FlowMatching", "StepFn"]


class BaseDiffusion(base.BaseDiffusion):
    """Alpamayo 1.5's base: ``x_dims`` as a list and ``use_classifier_free_guidance``."""

    def __init__(self, x_dims: Union[int, Sequence[int]], use_classifier_free_guidance: bool = False,
                 *args, **kwargs):
        super().__init__(x_dims)
        # Named apart from the R1 class's warnings (each name is warned once per place).
        base.warn_unknown_keywords(f"alpamayo1_5.{type(self).__name__}", kwargs)
        self.use_classifier_free_guidance = use_classifier_free_guidance


class FlowMatching(Sampling, BaseDiffusion):
    """Flow-matching sampler, a drop-in replacement for Alpamayo 1.5's ``FlowMatching``.

    ``FlowMatching(int_method, num_inference_steps, inference_guidance_weight, *args, **kwargs)``;
    the extra positionals and keywords go to :class:`BaseDiffusion` (``x_dims``,
    ``use_classifier_free_guidance``). No training helpers, parameters or buffers. Our options are
    keyword-only, as on the R1 class: ``backend``, ``cuda_graph``, ``max_graphs``, ``compile``.
    """

    def __init__(
        self,
        int_method: str = "euler",
        num_inference_steps: int = 10,
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
        self.inference_guidance_weight = inference_guidance_weight

    def _options(self, unguided_step_fn, return_all_steps, inference_step, int_method,
                 use_classifier_free_guidance, inference_guidance_weight, temperature, timesteps,
                 shift, noise, generator):
        """(fields the plan calls, :class:`Options`) of one ``sample`` or ``capture`` call."""
        use = (self.use_classifier_free_guidance if use_classifier_free_guidance is None
               else use_classifier_free_guidance)
        fields, guidance, weight = (), None, 1.0
        if use:
            if unguided_step_fn is None:
                raise ValueError("use_classifier_free_guidance is on but no unguided_step_fn was "
                                 "given: pass the unguided field as the third argument of sample")
            w = (self.inference_guidance_weight if inference_guidance_weight is None
                 else inference_guidance_weight)
            fields, guidance = (unguided_step_fn,), "mix"
            weight = check_real("inference_guidance_weight", w)
        return fields, Options(return_all_steps, inference_step, int_method, guidance, weight,
                               temperature, timesteps, shift, noise, generator)

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        step_fn: StepFn,
        unguided_step_fn: Optional[StepFn] = None,
        device: Union[torch.device, str] = torch.device("cpu"),
        return_all_steps: bool = False,
        inference_step: Optional[int] = None,
        int_method: Optional[str] = None,
        use_classifier_free_guidance: Optional[bool] = None,
        inference_guidance_weight: Optional[float] = None,
        temperature: float = 1.0,
        *args,
        cuda_graph: Optional[bool] = None,
        compile: Optional[Union[bool, str]] = None,
        timesteps=None,
        shift: Optional[float] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ):
        """Integrate from ``torch.randn(...) * temperature`` (t=0) to data (t=1).

        With guidance (``use_classifier_free_guidance``, default the attribute) each step calls
        ``step_fn`` first, then ``unguided_step_fn``, and uses ``v = (1 - w) * vu + w * vg``,
        ``w = inference_guidance_weight`` (default the attribute). Returns ``x`` or, with
        ``return_all_steps=True``, ``(states [B, T+1, *x_dims], grid [T+1])``.

        Keyword-only options as on the R1 class's ``sample``: ``cuda_graph`` (both fields in one
        graph, both identities in the cache key), ``compile`` (both fields in one compiled
        region), ``timesteps``/``shift``, ``noise`` (replaces the ``torch.randn`` draw;
        ``temperature`` still multiplies it), ``generator``; and ``int_method`` also takes
        ``"midpoint"``, ``"heun"``, ``"rk4"``.
        """
        base.warn_unknown_keywords("alpamayo1_5.FlowMatching.sample", kwargs)
        extra, options = self._options(
            unguided_step_fn, return_all_steps, inference_step, int_method,
            use_classifier_free_guidance, inference_guidance_weight, temperature, timesteps,
            shift, noise, generator)
        return self._sample((step_fn, *extra), batch_size, device, cuda_graph, options, compile)

    @torch.no_grad()
    def capture(
        self,
        batch_size: int,
        step_fn: StepFn,
        unguided_step_fn: Optional[StepFn] = None,
        device: Union[torch.device, str] = "cuda",
        return_all_steps: bool = False,
        inference_step: Optional[int] = None,
        int_method: Optional[str] = None,
        use_classifier_free_guidance: Optional[bool] = None,
        inference_guidance_weight: Optional[float] = None,
        temperature: float = 1.0,
        *,
        warmup: int = 2,
        compile: Optional[Union[bool, str]] = None,
        timesteps=None,
        shift: Optional[float] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> CapturedSampler:
        """Capture one sampling call (noise, both fields' calls, every update) in a CUDA graph.

        Arguments as :meth:`sample`; ``sampler()`` replays it (see the R1 class's ``capture``).
        Raises ``RuntimeError`` on a non-CUDA device.
        """
        extra, options = self._options(
            unguided_step_fn, return_all_steps, inference_step, int_method,
            use_classifier_free_guidance, inference_guidance_weight, temperature, timesteps,
            shift, noise, generator)
        return self._capture((step_fn, *extra), batch_size, device, warmup, options, compile)
