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
from .arguments import euler_steps
from .guidance import TwoFields
from .sampling import Options, Sampling
from .graph import CapturedSampler

__all__ = ["BaseDiffusion", "FlowMatching", "StepFn"]


class BaseDiffusion(base.BaseDiffusion):
    """Alpamayo 1.5's base: ``x_dims`` as a list and ``use_classifier_free_guidance``."""

    def __init__(self, x_dims: Union[int, Sequence[int]], use_classifier_free_guidance: bool = False,
                 *args, **kwargs):
        super().__init__(x_dims)
        # Named apart from the R1 class's warnings (each name is warned once per place).
        base.warn_unknown_keywords(f"alpamayo1_5.{type(self).__name__}", kwargs, type(self))
        self.use_classifier_free_guidance = use_classifier_free_guidance


class FlowMatching(TwoFields, Sampling, BaseDiffusion):
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

    def _resolve(self, use_classifier_free_guidance, inference_guidance_weight):
        """The guidance of a ``sample`` or ``capture`` call: ``None`` means the attribute."""
        if use_classifier_free_guidance is None:
            use_classifier_free_guidance = self.use_classifier_free_guidance
        if inference_guidance_weight is None:
            inference_guidance_weight = self.inference_guidance_weight
        return use_classifier_free_guidance, inference_guidance_weight

    def _euler(self, batch_size: int, step_fn: StepFn, unguided_step_fn: Optional[StepFn] = None,
               device=torch.device("cpu"), return_all_steps: bool = False, inference_step=None,
               inference_guidance_weight=None, use_classifier_free_guidance=None,
               temperature=1.0, generator=None):
        """The original's private Euler integrator, which third-party code calls and wraps: its
        signature and its result (guidance only when ``use_classifier_free_guidance`` is true).
        The options of ours given to the ``sample`` call that reached it (through a wrapper)
        apply; its own arguments win."""
        options, cuda_graph, compile = base.passed_through() or (Options(), None, None)
        options = options._replace(return_all_steps=return_all_steps, int_method="euler",
                                   inference_step=inference_step, temperature=temperature,
                                   generator=generator)
        if inference_guidance_weight is None:  # the original would fail: the attribute here
            inference_guidance_weight = self.inference_guidance_weight
        fields, options = self._fields(step_fn, unguided_step_fn, use_classifier_free_guidance,
                                       inference_guidance_weight, options)
        return self._sample(fields, batch_size, device, cuda_graph, options, compile)

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
        base.warn_unknown_keywords("alpamayo1_5.FlowMatching.sample", kwargs, type(self))
        use, weight = self._resolve(use_classifier_free_guidance, inference_guidance_weight)
        options = Options(return_all_steps, inference_step, int_method, None, 1.0, temperature,
                          timesteps, shift, noise, generator)
        fields, call = self._fields(step_fn, unguided_step_fn, use, weight, options)
        euler = base.euler_override(self, int_method, _OWN_EULER)
        if euler is None:
            return self._sample(fields, batch_size, device, cuda_graph, call, compile)
        # replaced on the instance or a subclass: called as the original calls it (``generator``
        # only when given, so that a wrapper written for the release without it still runs)
        with base.passing_through((options, cuda_graph, compile)):
            return euler(batch_size=batch_size, step_fn=step_fn, unguided_step_fn=unguided_step_fn,
                         device=device, return_all_steps=return_all_steps,
                         inference_step=euler_steps(inference_step, self.num_inference_steps,
                                                    timesteps),
                         inference_guidance_weight=weight, use_classifier_free_guidance=use,
                         temperature=temperature,
                         **({} if generator is None else {"generator": generator}))

    @base.capture_like(sample)
    @torch.no_grad()
    def capture(self, batch_size, step_fn, unguided_step_fn, device, return_all_steps,
                inference_step, int_method, use_classifier_free_guidance,
                inference_guidance_weight, temperature, *, warmup, compile, timesteps, shift, noise,
                generator) -> CapturedSampler:
        """Capture one sampling call (noise, both fields' calls, every update) in a CUDA graph.

        Arguments as :meth:`sample`; ``sampler()`` replays it (see the R1 class's ``capture``).
        Raises ``RuntimeError`` on a non-CUDA device.
        """
        use, weight = self._resolve(use_classifier_free_guidance, inference_guidance_weight)
        fields, options = self._fields(step_fn, unguided_step_fn, use, weight, Options(
            return_all_steps, inference_step, int_method, None, 1.0, temperature, timesteps, shift,
            noise, generator))
        return self._capture(fields, batch_size, device, warmup, options, compile)


# What `sample` runs itself, unless replaced on the instance or a subclass.
_OWN_EULER = FlowMatching._euler
