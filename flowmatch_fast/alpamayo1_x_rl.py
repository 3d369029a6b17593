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

from typing import Optional, Union

import torch

from . import base
from .base import StepFn
from .guidance import TwoFields
from .rl_training import RecipesTraining
from .sampling import Options, Sampling
from .sde import RolloutOptions

__all__ = ["BaseDiffusion", "FlowMatching", "StepFn"]

BaseDiffusion = base.BaseDiffusion  # the recipes subclass Alpamayo-R1's base
INT_METHODS = ("euler", "midpoint", "sde")
_PLAN_METHODS = {"euler": "euler", "midpoint": "midpoint-rl", "sde": "sde"}


class FlowMatching(RecipesTraining, TwoFields, Sampling, base.BaseDiffusion):
    """Flow-matching sampler, a drop-in replacement for the RL recipes' ``FlowMatching``.

    ``FlowMatching(int_method, train_timestep_sampler, num_inference_steps,
    train_ignore_guidance_rate, inference_guidance_weight, use_classifier_free_guidance, *args,
    **kwargs)`` (``x_dims`` by keyword, to R1's base); ``int_method`` in ``"euler"``,
    ``"midpoint"``, ``"sde"``. Our options are keyword-only: ``backend``, ``cuda_graph``,
    ``max_graphs``, ``compile``, as on the other classes.
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
        compile: Union[bool, str] = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # As the recipes: kept as given, checked where used (sample, construct_training_data).
        self._init_sampling(int_method, num_inference_steps, backend, cuda_graph, max_graphs,
                            compile)
        self.train_timestep_sampler = train_timestep_sampler
        self.train_ignore_guidance_rate = train_ignore_guidance_rate
        self.inference_guidance_weight = inference_guidance_weight
        self.use_classifier_free_guidance = use_classifier_free_guidance
        if train_timestep_sampler == "beta":
            # Plain attributes, not buffers: state_dict() stays {} and .to(dtype) cannot touch them.
            self.beta_dist = torch.distributions.Beta(
                torch.tensor(1.5, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32))
            self.beta_scale_constant = 0.999

    # ------------------------------------------------------------------ sampling
    def _resolve(self, int_method, inference_guidance_weight, use_classifier_free_guidance,
                 unguided_step_fn):
        """The recipes' fall-backs (``or`` for the method and the weight) and first check."""
        method = int_method or self.int_method
        weight = inference_guidance_weight or self.inference_guidance_weight
        use = (self.use_classifier_free_guidance if use_classifier_free_guidance is None
               else use_classifier_free_guidance)
        if use and unguided_step_fn is None:
            raise ValueError("unguided_step_fn is required when using classifier free guidance")
        if method not in INT_METHODS:
            raise ValueError(f"Invalid integration method: {self.int_method} (int_method must be "
                             f"one of {INT_METHODS}; got {method!r})")
        return method, weight, use

    def _options(self, method, steps, unguided_step_fn, weight, use, temperature, generator,
                 return_all_steps=False, rollout=None):
        """The :class:`Options` of an ``"euler"``, ``"midpoint"`` or ``"sde"`` call (the
        recipes' step count fall-back, their second guidance check)."""
        if method == "sde":
            if self.use_classifier_free_guidance and unguided_step_fn is None:  # the recipes check
                raise ValueError("unguided_step_fn is required when using classifier free "
                                 "guidance")  # the attribute again, whatever the call says
        else:
            steps = steps or self.num_inference_steps  # the recipes' _euler / _midpoint
        options = Options(return_all_steps, steps, _PLAN_METHODS[method], None, 1.0, temperature,
                          None, None, None, generator, rollout)
        return options

    def _call(self, method, step_fn, unguided_step_fn, steps, weight, use, temperature, generator,
              form, timesteps, noise_level, samples_list, sde_type):
        """(fields, :class:`Options`) of a ``sample`` or ``capture`` call whose method, weight
        and guidance are resolved; ``form``: what it returns (``"x"``, ``"all_steps"``,
        ``"info"``), which decides whether the SDE keeps its trajectory."""
        rollout = None
        if method == "sde":
            rollout = RolloutOptions(timesteps, noise_level, samples_list, sde_type, form != "x")
        options = self._options(method, steps, unguided_step_fn, weight, use, temperature,
                                generator, form == "all_steps" and rollout is None, rollout)
        return self._fields(step_fn, unguided_step_fn, use, weight, options)

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
        compile: Optional[Union[bool, str]] = None,
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
        An ``_euler``, ``_midpoint``, ``_sde`` or ``_guided_v`` replaced on the instance or a
        subclass is called as the recipes call it.
        """
        base.warn_unknown_keywords("alpamayo1_x_rl.FlowMatching.sample", kwargs, type(self))
        method, weight, use = self._resolve(int_method, inference_guidance_weight,
                                            use_classifier_free_guidance, unguided_step_fn)
        steps = self.num_inference_steps if inference_step is None else inference_step
        override = base.override_of(self, f"_{method}", _OWN[f"_{method}"])
        form = _form(method, return_all_steps, return_info)
        if override is None:  # the fast path: one plan, one call
            fields, options = self._call(method, step_fn, unguided_step_fn, steps, weight, use,
                                         temperature, generator, form, timesteps, noise_level,
                                         samples_list, sde_type)
            return _returned(self._sample(fields, batch_size, device, cuda_graph, options,
                                          compile), form, method == "sde")
        # replaced on the instance or a subclass: called as the recipes call it
        with base.passing_through((Options(), cuda_graph, compile)):
            if method != "sde":
                return override(batch_size=batch_size, step_fn=step_fn,
                                unguided_step_fn=unguided_step_fn, device=device,
                                return_all_steps=return_all_steps, inference_step=steps,
                                inference_guidance_weight=weight,
                                use_classifier_free_guidance=use, temperature=temperature,
                                generator=generator)
            out = override(batch_size, step_fn, unguided_step_fn, device, steps, timesteps, weight,
                           noise_level=noise_level, samples_list=samples_list, generator=generator,
                           sde_type=sde_type, use_classifier_free_guidance=use,
                           temperature=temperature)
        return _returned(out, form, True)

    def _integrator(self, method, batch_size, step_fn, unguided_step_fn, device, return_all_steps,
                    inference_step, inference_guidance_weight, use_classifier_free_guidance,
                    temperature, generator):
        """The body of our ``_euler`` and ``_midpoint`` (the recipes' signatures)."""
        _, cuda_graph, compile = base.passed_through() or (None, None, None)
        options = self._options(method, inference_step, unguided_step_fn,
                                inference_guidance_weight, use_classifier_free_guidance,
                                temperature, generator, return_all_steps)
        fields, options = self._fields(step_fn, unguided_step_fn, use_classifier_free_guidance,
                                       inference_guidance_weight, options)
        return self._sample(fields, batch_size, device, cuda_graph, options, compile)

    def _euler(self, batch_size: int, step_fn: StepFn, unguided_step_fn: Optional[StepFn] = None,
               device=torch.device("cpu"), return_all_steps: bool = False, inference_step=None,
               inference_guidance_weight=None, use_classifier_free_guidance=None,
               temperature=1.0, generator=None):
        """The recipes' private Euler integrator (its signature and result), which third-party
        code calls and wraps; ``sample`` calls a replacement of it."""
        return self._integrator("euler", batch_size, step_fn, unguided_step_fn, device,
                                return_all_steps, inference_step, inference_guidance_weight,
                                use_classifier_free_guidance, temperature, generator)

    def _midpoint(self, batch_size: int, step_fn: StepFn,
                  unguided_step_fn: Optional[StepFn] = None, device=torch.device("cpu"),
                  return_all_steps: bool = False, inference_step=None,
                  inference_guidance_weight=None, use_classifier_free_guidance=None,
                  temperature=1.0, generator=None):
        """The recipes' private midpoint integrator (its signature and result)."""
        return self._integrator("midpoint", batch_size, step_fn, unguided_step_fn, device,
                                return_all_steps, inference_step, inference_guidance_weight,
                                use_classifier_free_guidance, temperature, generator)

    def _sde(self, batch_size: int, step_fn: StepFn, unguided_step_fn: Optional[StepFn] = None,
             device=torch.device("cpu"), inference_step=None, timesteps=None,
             inference_guidance_weight=None, noise_level=0.7, samples_list=None, generator=None,
             sde_type="sde", use_classifier_free_guidance=False, temperature=1.0):
        """The recipes' private SDE sampler (its signature): ``(x, log_prob [B], all_steps
        [B, T+1, ...], timesteps [T+1])``."""
        _, cuda_graph, compile = base.passed_through() or (None, None, None)
        rollout = RolloutOptions(timesteps, noise_level, samples_list, sde_type, True)
        options = self._options("sde", inference_step, unguided_step_fn, inference_guidance_weight,
                                use_classifier_free_guidance, temperature, generator,
                                rollout=rollout)
        fields, options = self._fields(step_fn, unguided_step_fn, use_classifier_free_guidance,
                                       inference_guidance_weight, options)
        return self._sample(fields, batch_size, device, cuda_graph, options, compile)

    @base.capture_like(sample)
    @torch.no_grad()
    def capture(self, batch_size, step_fn, unguided_step_fn, device, return_all_steps,
                inference_step, timesteps, int_method, inference_guidance_weight,
                use_classifier_free_guidance, temperature, *, warmup, compile, generator,
                noise_level, samples_list, sde_type, return_info) -> RolloutSampler:
        """Capture one whole call (initial noise, every field call, every step's noise draw and
        fused update, the log-prob reductions) in a CUDA graph; ``sampler()`` replays it and
        returns what :meth:`sample` returns. A ``generator`` (one, or one per row) advances on
        every replay; ``samples_list`` tensors are read on every replay (update them in place).
        """
        method, weight, use = self._resolve(int_method, inference_guidance_weight,
                                            use_classifier_free_guidance, unguided_step_fn)
        steps = self.num_inference_steps if inference_step is None else inference_step
        form = _form(method, return_all_steps, return_info)
        fields, options = self._call(method, step_fn, unguided_step_fn, steps, weight, use,
                                     temperature, generator, form, timesteps, noise_level,
                                     samples_list, sde_type)
        captured = self._capture(fields, batch_size, device, warmup, options, compile)
        return RolloutSampler(captured, form, method == "sde")


def _form(method: str, return_all_steps, return_info) -> str:
    """What a call returns: ``"info"`` (the SDE's dict; ``return_info`` is the SDE's alone),
    ``"all_steps"`` (the pair) or ``"x"``."""
    if return_info and method == "sde":
        return "info"
    return "all_steps" if return_all_steps else "x"


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


# What `sample` runs itself, unless replaced on the instance or a subclass.
_OWN = {name: getattr(FlowMatching, name) for name in ("_euler", "_midpoint", "_sde")}
