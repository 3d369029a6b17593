"""``compile=True``: a whole sampling call as one ``torch.compile`` region, bitwise the eager call.

The region is the plan's eager run function (``Sampling._run``: the noise draw, every field
call, every update, guidance, every Runge-Kutta stage) with the plain-torch updates, so that
Inductor fuses each update with the field's last kernels. Nothing here knows the method: a
class whose run function is ``run(plan, *fields)``, whose plan is a NamedTuple like
``sampling._Plan`` (``key()``, ``with_grid()`` building every tensor a call may hold: the grid,
per-step scalars; ``backend``, ``noise``, ``generator``, ``batch_size``, ``x_dims``, ``device``)
and whose ``_plan_state()`` names the attributes its planning reads gets the same mode. What keeps it bitwise with the eager original
(measured on CPU, torch 2.13: elementwise, ``tanh(x @ W)`` and SiLU-MLP bf16 fields, 10 and 50
steps; the tests pin it):

- Inductor's eager-numerics options (:data:`OPTIONS`), given to each ``torch.compile`` call, never
  set in the global Inductor config: ``emulate_precision_casts`` rounds each low-precision
  intermediate where eager rounds it, ``fallback_random`` draws with torch's own generator;
- the plan's tensors enter the region as inputs, built eagerly: the time grid once per signature
  (``with_grid()``; Inductor's own ``linspace`` gives other bits for 50 steps), and the noise of a
  call with ``noise=`` or ``generator=`` (a generator cannot enter a traced region: its noise is
  drawn just before it, the same draw an eager call makes);
- ``dynamic=False``: one graph per signature, every shape static.

A field whose compiled form is not bitwise (a reduction Inductor orders its own way, e.g. a
LayerNorm) gives what the original loop gives with the same field compiled: the loop adds no
difference of its own. ``compile="checked"`` runs the eager call beside each signature's first
compiled call and warns with the largest difference when they differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
import types
import warnings
import weakref

import torch

from . import noise as noise_mod
from .graph import CapturedSampler
from .graph_cache import GraphCache, field_key
from .kernels import reference

MODES = (False, True, "checked")
# Inductor's eager-numerics mode (see the module docstring); a fresh dict per compile call.
OPTIONS = {"emulate_precision_casts": True, "fallback_random": True}
# Inductors also have some of these (torch 2.13: the eager_numerics ones; older releases the
# first, spelt so): IEEE division in their Triton code (else a float32 tensor division is the
# approximate div.full.f32 on a GPU), and no flush of subnormals to zero. Passed where this
# torch knows them. (The RL log-prob's division stays eager anyway: ops.sde_log_prob.)
EAGER_NUMERICS_IF_PRESENT = ("emulate_divison_rounding", "eager_numerics.division_rounding",
                             "eager_numerics.disable_ftz")


@functools.lru_cache(maxsize=None)
def compile_options() -> dict:
    """:data:`OPTIONS` and those of :data:`EAGER_NUMERICS_IF_PRESENT` this torch's Inductor has
    (read once, when the first region compiles)."""
    import torch._inductor.config as inductor

    known = inductor.get_config_copy()
    return {**OPTIONS, **{k: True for k in EAGER_NUMERICS_IF_PRESENT if k in known}}


def check_mode(value):
    """``compile=``: ``False``, ``True`` or ``"checked"``."""
    if value is True or value is False:
        return value
    if isinstance(value, str):
        if value == "checked":
            return value
        raise ValueError(f"compile must be False, True or 'checked'; got {value!r}")
    raise TypeError(f"compile must be False, True or 'checked'; got {type(value).__name__} "
                    f"({value!r})")


def check_usable() -> None:
    """Raise a ``RuntimeError`` saying why when ``torch.compile`` cannot run in this Python."""
    from torch._dynamo import eval_frame

    try:
        eval_frame.check_if_dynamo_supported()
    except RuntimeError as exc:
        raise RuntimeError(f"compile=True needs torch.compile, which cannot run here ({exc}); "
                           "sample with compile=False: the eager path gives the same numbers"
                           ) from exc


@dataclasses.dataclass
class CompileStats:
    """Counters of one sampler's compiled calls (``fm.compile_stats``, a snapshot)."""

    compiles: int = 0  # regions compiled: one per signature, on its second call
    compiled_calls: int = 0  # calls run by a compiled region (each compile's first call included)
    first_calls: int = 0  # a signature's first call: run eagerly
    eager_fallbacks: int = 0  # calls run eagerly because the cache was full
    evictions: int = 0  # regions dropped (their field was garbage-collected)
    failed_compiles: int = 0
    compile_seconds: float = 0.0  # wall time of the compiles (each one's first call), summed
    checked_mismatches: int = 0  # compile="checked": first compiled calls that differed


_REGIONS = itertools.count()


def region(run, template, names):
    """``torch.compile`` of ``run(template with <names> set to the tensors, *fields)``.

    The function gets a code object of its own: Dynamo keeps its compiled entries and its
    recompile count per code object, so one shared function would make every signature of every
    sampler in the process count against one recompile limit (8) and walk one list of guards;
    this way each region holds one entry, freed with the region."""
    def sampling_call(fields, *tensors):
        return run(template._replace(**dict(zip(names, tensors))), *fields)

    code = sampling_call.__code__.replace(co_name=f"flowmatch_fast_region_{next(_REGIONS)}")
    fn = types.FunctionType(code, sampling_call.__globals__, code.co_name, None,
                            sampling_call.__closure__)
    return torch.compile(fn, options=dict(compile_options()), dynamic=False)


def tensor_fields(plan) -> tuple:
    """The names of the plan's fields that hold tensors: the region's inputs."""
    return tuple(n for n, v in zip(plan._fields, plan) if isinstance(v, torch.Tensor))


class _Region:
    """The compiled region of one signature, built from a call's plan (plain-torch updates,
    noise drawn: no generator): its inputs are the plan's tensors, those the call brings
    (noise, an explicit grid) and those ``with_grid()`` adds, built once and held here (the
    default or shifted grid). The cache calls ``entry()`` where it would replay a graph: that
    only hands the entry out, and the caller runs it outside the cache's lock."""

    __slots__ = ("fn", "names", "held", "__weakref__")

    def __init__(self, run, plan):
        full = plan.with_grid()
        self.names = tensor_fields(full)
        self.held = tuple(getattr(full, n) if getattr(plan, n) is None else None
                          for n in self.names)
        self.fn = region(run, full._replace(**dict.fromkeys(self.names)), self.names)

    def __call__(self):
        return self

    def inputs(self, plan) -> tuple:
        return tuple(getattr(plan, n) if h is None else h for n, h in zip(self.names, self.held))


def compiled_plan(plan):
    """The plan a region runs: plain-torch updates, and the noise of ``generator=`` drawn now
    (a generator cannot enter a traced region; the same draw the eager call makes). An RL
    rollout keeps its generators for its steps' draws, where the region breaks its graph."""
    plan = plan._replace(backend=reference)
    if plan.generator is None:
        return plan
    noise = noise_mod.randn((plan.batch_size, *plan.x_dims), plan.generator, plan.device)
    return plan._replace(noise=noise, generator=None)


def call_token(sampler, fields, batch_size, device, on_cuda, options):
    """Everything that decides a call's plan and cache key, as a tuple compared by value, or
    ``None`` when some part cannot be compared that way (a tensor: noise or a grid; a generator;
    a list of timesteps; a CUDA device without an index; autocast on): those calls take the
    full path. Types are part of it (``True == 1``), and the sign of a zero weight or
    temperature (``-0.0 == 0.0``, but each rounds its own way)."""
    kinds = tuple(map(type, options))
    if (type(batch_size) is not int or not _PLAIN.issuperset(kinds)
            or torch._C._is_any_autocast_enabled() or (on_cuda and device.index is None)):
        return None
    w, temperature = options.weight, options.temperature
    return (batch_size, device, options, kinds, w == 0 and math.copysign(1.0, w),
            temperature == 0 and math.copysign(1.0, temperature),
            *[field_key(f)[0] for f in fields], sampler._plan_state(), torch.get_default_dtype())


_PLAIN = frozenset((type(None), bool, int, float, str))


class CompiledCalls:
    """One sampler's compiled sampling calls, held by a :class:`GraphCache` (through its
    ``call``): the graph cache's key (field identities and the plan's ``key()``), its bound,
    its eviction when a field is garbage-collected, and its first-call policy.

    First call eager, second compiles: a compile costs seconds (see the README's table), so
    compiling on first sight would make a field made afresh for every call (a new lambda each
    time) pay that on every call and fill the cache with regions nobody reuses; with this policy
    such a field always runs eagerly, at eager speed, and a field passed again pays one eager
    call before its compile.

    Repeated calls skip planning: a call whose :func:`call_token` equals the last compiled
    call's, with that call's fields still alive, runs its region directly. Beyond its region a
    call costs 16 us that way and 52 us through planning, the key and the cache (this 2-core
    CPU, loaded; bench/test_bench.py's compile-overhead rows).
    """

    def __init__(self, max_entries: int):
        self._cache = GraphCache(max_entries, builds="compiled")
        self._seconds = 0.0
        self._fast_calls = 0
        self._mismatches = 0
        self._graph_compiles = 0
        self._last = None  # (token, weak refs: the fields' watched objects, the region; inputs)

    def __getstate__(self):  # a copy of the sampler starts empty, as its graph cache does
        return {"max_entries": self._cache.max_graphs}

    def __setstate__(self, state):
        self.__init__(state["max_entries"])

    def __len__(self):
        return len(self._cache)

    @property
    def stats(self) -> CompileStats:
        s = self._cache.stats
        return CompileStats(s.captures + self._graph_compiles,
                            s.captures + s.replays + self._fast_calls, s.first_calls,
                            s.eager_fallbacks, s.evictions, s.failed_captures, self._seconds,
                            self._mismatches)

    def repeat(self, token, fields):
        """The last compiled call again when ``token`` is its token; else ``None``."""
        last = self._last
        if token is None or last is None or last[0] != token:
            return None
        for ref in last[1]:
            if ref() is None:  # a field of that call is gone (its id may be reused), or the region
                return None
        self._fast_calls += 1
        return last[1][-1]().fn(fields, *last[2])

    def sample(self, run, fields, plan, mode, token=None):
        """One call in compiled mode (``plan`` validated): eager on a signature's first call or
        when the cache is full, else its region (compiled on the second call)."""
        check_usable()
        plan = compiled_plan(plan)  # noise of generator= drawn once, for whichever path runs
        keys, watches = zip(*(field_key(f) for f in fields))
        key = (*keys, plan.key(), None if plan.noise is None else plan.noise.dtype)
        first = []

        def build():
            entry = _Region(run, plan)
            call = functools.partial(entry.fn, fields, *entry.inputs(plan))
            t0 = time.perf_counter()
            with named_failures():
                if mode == "checked":
                    out, same = checked(call, lambda: run(plan.with_grid(), *fields), plan.device)
                    self._mismatches += not same
                else:
                    out = call()
            self._seconds += time.perf_counter() - t0
            first.append(out)
            return entry

        entry = self._cache.call(key, watches, build, _no_region)
        if entry is None:
            return run(plan, *fields)
        inputs = entry.inputs(plan)
        if token is not None:
            refs = _weak_refs((*watches, entry))
            self._last = None if refs is None else (token, refs, inputs)
        return first[0] if first else entry.fn(fields, *inputs)

    def captured(self, run, fields, plan, mode, **sampler_args):
        """A :class:`CapturedSampler` of the compiled region (compiled in its warm-up, never
        inside the capture; Inductor's own CUDA graphs stay off: ours holds the region)."""
        check_usable()
        generators = plan.generator  # None, or noise.check_generators' tuple
        plan = plan._replace(backend=reference, generator=None).with_grid()
        if generators is not None:  # the region takes the noise, drawn in the graph per replay
            plan = plan._replace(noise=torch.empty(plan.batch_size, *plan.x_dims,
                                                   device=plan.device))
        entry = _Region(run, plan)  # every tensor an input of each call: what the graph reads

        def call():
            p = plan if generators is None else plan._replace(noise=noise_mod.randn(
                (plan.batch_size, *plan.x_dims), generators, plan.device))
            return entry.fn(fields, *entry.inputs(p))

        t0 = time.perf_counter()
        with named_failures():
            if mode == "checked":
                state = _rng_state(plan.device, generators)
                eager = plan if generators is None else plan._replace(noise=None,
                                                                      generator=generators)
                same = checked(call, lambda: run(eager, *fields), plan.device, generators)[1]
                self._mismatches += not same
                _set_rng_state(plan.device, generators, state)  # the first replay draws this call's
            sampler = CapturedSampler(call, plan.device, generators=generators or (),
                                      static_inputs=(*(getattr(plan, n) for n in entry.names),
                                                     entry), **sampler_args)
        self._graph_compiles += 1
        self._seconds += time.perf_counter() - t0
        return sampler


def _no_region():
    return None


def _weak_refs(objects):
    try:
        return tuple(weakref.ref(o) for o in objects)
    except TypeError:  # a field that cannot be weakly referenced: no fast path for it
        return None


@contextlib.contextmanager
def named_failures():
    """Inductor's failure to compile a region, raised as ours: what failed and what to do."""
    import torch._dynamo

    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        cause = getattr(exc, "inner_exception", None) or exc
        raise RuntimeError(
            f"compile=True: Inductor could not compile this sampling call "
            f"({type(cause).__name__}: {cause}); sample with compile=False (the eager path "
            "gives the same numbers)") from exc


def checked(compiled, eager, device, generators=None):
    """``(compiled(), same)``, having run ``eager()`` first from the same RNG state; warns with
    the largest difference when the results differ. The RNG ends where one call leaves it."""
    state = _rng_state(device, generators)
    want = eager()
    _set_rng_state(device, generators, state)
    got = compiled()
    diff = max_difference(got, want)
    if diff is not None:
        warnings.warn(
            f"compile='checked': the compiled sampling call differs from the eager one (max abs "
            f"difference {diff:.3g}). The loop adds no difference of its own: the field's "
            "compiled form rounds differently (e.g. a reduction in another order). Sample with "
            "compile=False for the eager numbers", RuntimeWarning, stacklevel=2)
    return got, diff is None


def max_difference(got, want):
    """``None`` when ``got`` equals ``want`` (tensors or tuples of them, NaN matching NaN), else
    the largest absolute difference (``inf`` where NaNs or shapes disagree)."""
    if isinstance(want, tuple):
        diffs = [max_difference(g, w) for g, w in zip(got, want)]
        diffs = [d for d in diffs if d is not None]
        return max(diffs) if diffs else None
    if got.shape != want.shape or got.dtype != want.dtype:
        return math.inf
    if torch.equal(got, want) or torch.equal(got.isnan(), want.isnan()) and torch.equal(
            got.nan_to_num(0.0), want.nan_to_num(0.0)):
        return None
    if not torch.equal(got.isnan(), want.isnan()):
        return math.inf
    return (got.double() - want.double()).abs().nan_to_num(0.0).max().item()


def _rng_state(device, generators=None):
    if generators:
        return [g.get_state() for g in generators]
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(device, generators, state):
    if generators:
        for g, one in zip(generators, state):
            g.set_state(one)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
