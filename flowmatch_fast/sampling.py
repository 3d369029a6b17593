"""The sampling machinery both ``FlowMatching`` classes share: one call's :class:`Options`,
validated once into a plan (the backend resolved there: the one place for ``"auto"``), the
eager run, and the CUDA-graph policy (the cache's ``call`` looks up, captures or falls back and
counts). The classes keep their own public signatures and delegate here."""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple, Optional

import torch

from . import arguments, backends, compiled, sde
from . import noise as noise_mod
from .base import as_int
from .graph import CapturedSampler, capturing, cast_cache_off, cuda_device, warn_not_cuda
from .graph_cache import GraphCache, field_key
from .integrators import METHODS, Trajectory, integrate
from .kernels.contract import Guidance, TimeGrid

INT_METHODS = tuple(METHODS)


class Sampling:
    """The mixin of both classes' modules: planning, the integration call, the bounded
    CUDA-graph cache, ``capture``. ``guidance`` in a plan is ``None``, ``"batch"`` (our R1 extra:
    one field on the doubled batch) or ``"mix"`` (Alpamayo 1.5: a second, unguided field)."""

    _methods = INT_METHODS  # what a plan's method may be (the RL class: its own three)

    def _init_sampling(self, int_method, num_inference_steps, backend, cuda_graph,
                       max_graphs, compile=False) -> None:
        """Keep the options both classes share (their attributes of those names): ours are
        checked now; the originals' (``int_method``, ``num_inference_steps``) where a call uses
        them, as the originals take any value and fail only there."""
        self.int_method = int_method
        self.num_inference_steps = num_inference_steps
        self.backend = backends.check_backend_name(backend)
        self.cuda_graph = arguments.check_bool("cuda_graph", cuda_graph)
        self._graphs = GraphCache(max_graphs)
        self.compile_mode = compiled.check_mode(compile)  # not `compile`: nn.Module.compile
        self._compiled = compiled.CompiledCalls(max_graphs)
        self._warned_not_cuda = False

    def _plan(self, batch_size, device, options: "Options", captured=False) -> "_Plan":
        """Validate one call's arguments and resolve everything that must be known up front
        (``options.weight``: already checked by the class, read only under guidance)."""
        (return_all_steps, inference_step, int_method, guidance, weight, temperature, timesteps,
         shift, noise, generator, rollout) = options
        batch_size = arguments.check_positive_int("batch_size", batch_size, minimum=0)
        device = arguments.sampling_device(device)
        method = int_method or self.int_method  # the originals' `or`: "" means the attribute
        if method not in self._methods:
            raise ValueError(f"int_method must be one of {self._methods}; got {method!r}")
        shaped = arguments.grid_dtype(plain=False)  # of an explicit or shifted grid
        if rollout is not None:  # the RL class's SDE: its own grid of Python numbers
            steps = as_int("inference_step", inference_step)
            rollout = sde.plan_rollout(rollout, steps, (batch_size, *self.x_dims), device)
            grid_values = grid_key = None
        elif timesteps is not None:
            if shift is not None:
                raise ValueError("give either timesteps= or shift=, not both")
            grid_values, grid_key = arguments.check_timesteps(timesteps, device, shaped)
            steps = grid_values.numel() - 1
            if inference_step and as_int("inference_step", inference_step) != steps:
                raise ValueError(f"inference_step={inference_step} but timesteps has {steps + 1} "
                                 f"entries ({steps} steps); they must agree")
        else:
            grid_values = grid_key = None
            steps = arguments.steps_or_attribute(inference_step, self.num_inference_steps)
        shift = arguments.check_shift(shift, steps, shaped)  # None for shift=1: the plain grid
        temperature = arguments.check_scalar("temperature", temperature)
        if noise is not None:
            if generator is not None:
                raise ValueError("give either noise= or generator=, not both (noise draws nothing)")
            arguments.check_noise(noise, (batch_size, *self.x_dims), device)
        generator = noise_mod.check_generators(generator, batch_size, device)
        if rollout is None:
            grid_dtype = arguments.grid_dtype(plain=grid_values is None and shift is None)
        else:  # every step draws from the generators too; the SDE's table is float32 always
            rollout, grid_dtype = rollout._replace(generators=generator), torch.float32
        x_dims = tuple(self.x_dims)
        backend = _resolve(self.backend, device, batch_size, x_dims, captured, grid_dtype)
        return _Plan(batch_size, device, x_dims, steps, method, bool(return_all_steps), backend,
                     guidance, weight if guidance else 1.0, temperature, grid_values, grid_key,
                     shift, noise, generator, grid_dtype, rollout)

    def _plan_state(self) -> tuple:
        """The attributes :meth:`_plan` reads, for the compiled mode's repeat path (a call with
        the same arguments and these runs the last region unplanned): a subclass whose plan
        reads more attributes adds them here."""
        steps = self.num_inference_steps
        return self.int_method, steps, type(steps), tuple(self.x_dims), self.backend

    def _run(self, plan: "_Plan", step_fn, unguided_fn=None):
        """The eager sampling call (also what a CUDA graph captures)."""
        x = _initial_state(plan)
        if plan.rollout is not None:
            return sde.rollout(plan, x, step_fn, unguided_fn)
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

    def _sample(self, fields: tuple, batch_size, device, cuda_graph, options: "Options",
                compile=None):
        """``sample``'s body: eager, compiled (:mod:`flowmatch_fast.compiled`), or through the
        graph cache keyed on every field's identity (``fields``: the fields the plan calls,
        guided first; each watched for eviction) and the plan."""
        use_graph = self.cuda_graph if cuda_graph is None else arguments.check_bool("cuda_graph", cuda_graph)
        mode = self.compile_mode if compile is None else compiled.check_mode(compile)
        device = arguments.sampling_device(device)
        on_cuda = device.type == "cuda"
        in_user_graph = on_cuda and not torch.compiler.is_compiling() and capturing(device)
        # The cache serves CUDA calls outside the caller's own capture, and not noise=: a cached
        # graph would read a tensor the caller may drop (capture(noise=...) keeps it alive), nor
        # an RL replay of stored samples (the same). A call's CUDA generators are copied in and
        # out of the graph's own (CPU ones: eager).
        graph_wanted = use_graph and on_cuda and not in_user_graph
        replay = options.rollout is not None and options.rollout.samples_list is not None
        cacheable = (graph_wanted and options.noise is None and not replay
                     and noise_mod.graph_safe(options.generator))
        # Compiled: never inside a capture or a trace in progress (the caller's own), nor for an
        # RL rollout that replays stored samples (the caller's tensors, which a region would
        # bake in) or draws its steps from generators (a draw a traced region cannot hold: the
        # region would break at each step and recompile per step index).
        compiling = (bool(mode) and not in_user_graph and not torch.compiler.is_compiling()
                     and compilable(options))
        token = None
        if compiling and not cacheable:
            token = compiled.call_token(self, fields, batch_size, device, on_cuda, options)
            out = self._compiled.repeat(token, fields)
            if out is not None:
                return out
        plan = self._plan(batch_size, device, options, captured=in_user_graph or cacheable)
        if use_graph and not on_cuda and not self._warned_not_cuda:
            self._warned_not_cuda = True
            warn_not_cuda(plan.device)
        if compiling and not cacheable:
            return self._compiled.sample(self._run, fields, plan, mode, token)
        run = functools.partial(self._run, plan, *fields)
        if not cacheable:
            if graph_wanted:  # noise= or generator= given
                self._graphs.count_eager_fallback()
            return self._run(plan, *fields)
        fkeys, watches = zip(*(field_key(f) for f in fields))
        graph_device = cuda_device(plan.device)
        pool, order = self._graphs.pool(graph_device)

        gens = plan.generator

        def build():  # the grid is built here, once per capture, not on every cached call
            held = plan if gens is None else plan.with_generators(noise_mod.private_twins(gens))
            if compiling:  # the compiled region inside our graph
                return self._compiled.captured(self._run, fields, held, mode, pool=pool,
                                               order=order, keep_alive=False)
            held = held.with_grid()
            run = cast_cache_off(functools.partial(self._run, held, *fields), graph_device.type)
            return CapturedSampler(run, graph_device, pool=pool, order=order, keep_alive=False,
                                   generators=held.generator or (),
                                   static_inputs=held.static_inputs())

        def eager():  # a first call, a full cache's or a failed capture's fallback: not captured
            return self._run(plan.resolved(self.backend, captured=False), *fields)

        key = (*fkeys, plan.key(), noise_mod.pattern(gens), "compiled" if compiling else "eager")
        return self._graphs.call(key, watches, build, eager,
                                 None if gens is None else {"generators": gens})

    def _capture(self, fields: tuple, batch_size, device, warmup, options: "Options",
                 compile=None):
        """``capture``'s body: one sampling call captured in a CUDA graph (compiled first when
        ``compile`` or the constructor's says so)."""
        mode = self.compile_mode if compile is None else compiled.check_mode(compile)
        device = arguments.sampling_device(device)
        if device.type != "cuda":
            raise RuntimeError(
                f"FlowMatching.capture needs a CUDA device; got {str(device)!r}. "
                "On CPU, call FlowMatching.sample (eager) instead."
            )
        plan = self._plan(batch_size, device, options, captured=True)
        if mode and compilable(options):
            return self._compiled.captured(self._run, fields, plan, mode, warmup=warmup)
        plan = plan.with_grid()
        run = cast_cache_off(functools.partial(self._run, plan, *fields), plan.device.type)
        if noise_mod.on_host(plan.generator, plan.device):
            raise RuntimeError("capture needs generators on the CUDA device: a CPU generator "
                               "draws on the host, which a CUDA graph cannot replay")
        return CapturedSampler(run, plan.device, warmup=warmup, generators=plan.generator or (),
                               static_inputs=plan.static_inputs())

    @property
    def compile_stats(self) -> compiled.CompileStats:
        """Counters of the compiled mode (``compile=True``): compiles, compiled calls, first
        calls, compile seconds, ... (a snapshot)."""
        return self._compiled.stats

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
    generator: object = None  # None, a torch.Generator, or a list of them (one per row)
    rollout: Optional["sde.RolloutOptions"] = None  # the RL class's SDE options


class _Plan(NamedTuple):
    """Everything one sampling call resolved before running (and what a graph bakes in)."""

    batch_size: int
    device: torch.device
    x_dims: tuple
    steps: int
    method: str
    return_all_steps: bool
    backend: object  # the backend module, resolved for an eager or a captured run (resolved())
    guidance: Optional[str]  # None, "batch" (doubled batch) or "mix" (a second field)
    weight: float  # for "mix" also a 0-dim tensor or NumPy scalar (arguments.mix_weight)
    temperature: float
    grid_values: Optional[torch.Tensor]
    grid_key: Optional[bytes]  # the explicit grid's float32 bits, read on the host at validation
    shift: Optional[float]
    noise: Optional[torch.Tensor]
    generator: Optional[tuple]  # noise.check_generators: one generator, or one per row
    grid_dtype: torch.dtype  # arguments.grid_dtype: follows the default dtype
    rollout: Optional["sde.Rollout"] = None

    def with_generators(self, generators: tuple) -> "_Plan":
        """This plan drawing from ``generators`` instead (the initial noise and an SDE's steps)."""
        rollout = None if self.rollout is None else self.rollout._replace(generators=generators)
        return self._replace(generator=generators, rollout=rollout)

    def resolved(self, requested: str, captured: bool) -> "_Plan":
        """This plan with the ``requested`` backend resolved for an eager (``captured=False``)
        or a captured run: the two may differ (``auto`` weighs Triton's launch cost)."""
        return self._replace(backend=_resolve(requested, self.device, self.batch_size,
                                              self.x_dims, captured, self.grid_dtype))

    def key(self):
        """The cache key: what a captured graph bakes in (noise/generator excluded).

        Floats enter as their bits (a NaN weight matches itself, -0.0 is not 0.0); read now:
        the default dtype (of the noise and the grid), the autocast state and the matmul
        precision switches (of the field's kernels, :func:`precision_state`)."""
        device = self.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        autocast = torch.is_autocast_enabled(device.type)
        return (device, self.x_dims, self.batch_size, self.steps, self.method,
                self.return_all_steps, self.backend.__name__, self.guidance,
                arguments.scalar_key(self.weight), struct.pack("<d", self.temperature),
                self.grid_key, self.shift,
                torch.get_default_dtype(),
                (autocast, torch.get_autocast_dtype(device.type)) if autocast else False,
                precision_state(), None if self.rollout is None else self.rollout.key())

    def default_grid(self) -> torch.Tensor:
        """The grid without ``timesteps=``: ``linspace`` on the device, then the shift if any
        (built afresh by every eager call: the caller owns what ``return_all_steps`` returns)."""
        values = torch.linspace(0.0, 1.0, self.steps + 1, device=self.device,
                                dtype=self.grid_dtype)
        return values if self.shift is None else arguments.shifted_grid(values, self.shift)

    def static_inputs(self) -> tuple:
        """The tensors made before capture that a graph of this plan reads on every replay (its
        grid; an SDE's table of per-step scalars, ``t`` values and returned grid; a replayed
        rollout's stored samples): a captured sampler holds them as long as it lives."""
        held = () if self.grid_values is None else (self.grid_values,)
        return held if self.rollout is None else held + self.rollout.inputs()

    def with_grid(self) -> "_Plan":
        """This plan with its grid built now, for a CUDA graph to hold as a static input (as an
        explicit grid is): a replay then reruns none of the grid's kernels (``linspace``; with a
        shift, 8 elementwise ops and 2 fills more), whose values never change. The same ops as
        an eager call's :meth:`default_grid`, so the same bits."""
        if self.grid_values is not None or self.rollout is not None:  # the SDE holds its own
            return self
        return self._replace(grid_values=self.default_grid())


def compilable(options: Options) -> bool:
    """Whether a call can run as a compiled region: not an RL rollout that replays stored samples
    (the caller's tensors, which a region would bake in) or draws its steps from generators (a
    draw a traced region cannot hold: it would break at each step and recompile per step)."""
    ro = options.rollout
    return ro is None or (ro.samples_list is None and options.generator is None)


def _initial_state(plan: _Plan) -> torch.Tensor:
    """The state the loop starts from: ``noise=``, or a draw (``generator=``: one, or one per
    row) times the temperature (a separate op, as Alpamayo 1.5 and the recipes: ``x * 1.0`` is
    ``x`` bitwise, so it is skipped); a replayed rollout starts at its first stored sample."""
    if plan.rollout is not None and plan.rollout.samples is not None:
        return plan.rollout.samples[0]
    if plan.noise is not None:
        x = plan.noise
    else:
        x = noise_mod.randn((plan.batch_size, *plan.x_dims), plan.generator, plan.device)
    return x if plan.temperature == 1.0 else x * plan.temperature


def _resolve(requested: str, device, batch_size: int, x_dims: tuple, captured: bool, grid_dtype):
    """The backend module for a plan's state (``batch_size`` x ``x_dims`` elements)."""
    return backends.resolve(requested, device, batch_size * math.prod(x_dims), captured,
                            grid_dtype)


def precision_state() -> tuple:
    """The switches that change what a field's matmuls and convolutions compute on a GPU
    (TF32, the float32 matmul precision, reduced-precision reductions, fp16 accumulation): a
    graph replays the kernels chosen at its capture, so a change must select another graph.
    C++ flags read directly (about 0.3 us each; the key is built by every cached call)."""
    c = torch._C
    try:
        legacy = (c._get_cublas_allow_tf32(), c._get_cudnn_allow_tf32(),
                  c._get_float32_matmul_precision())
    except RuntimeError:  # the legacy and the new TF32 switches set both: PyTorch refuses to read
        legacy = None     # the legacy ones; the new ones below say it all
    return (legacy, *(get() for get in _PRECISION_GETTERS))


def _precision_getters() -> tuple:
    """The precision switches this torch has beyond the legacy ones (torch >= 2.4 is supported;
    the new TF32 switches came later)."""
    c = torch._C
    getters = [c._get_cublas_allow_fp16_reduced_precision_reduction,
               c._get_cublas_allow_bf16_reduced_precision_reduction]
    if hasattr(c, "_get_cublas_allow_fp16_accumulation"):
        getters.append(c._get_cublas_allow_fp16_accumulation)
    if hasattr(c, "_get_fp32_precision_getter"):
        getters += [functools.partial(c._get_fp32_precision_getter, "cuda", op)
                    for op in ("matmul", "conv", "rnn")]
    return tuple(getters)


_PRECISION_GETTERS = _precision_getters()
