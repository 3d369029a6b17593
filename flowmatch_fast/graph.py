"""The whole sampling loop captured in one CUDA graph, and the bounded cache of such graphs.

``CapturedSampler`` warms the loop up on a side stream, then captures noise, every ``step_fn``
call and every fused update into one ``torch.cuda.CUDAGraph``; a call replays it. Noise is drawn
inside the graph from the global CUDA generator, so each replay draws fresh noise and, after
``torch.manual_seed(s)``, a replay gives bitwise what an eager ``sample`` gives.

What the field must keep to be captured (the usual CUDA-graph contract):
- static shapes and dtypes, and the same control flow on every call;
- inputs other than ``x`` and ``t`` read from tensors that stay put (update them in place,
  ``cond.copy_(new_cond)``, between replays; never rebind them);
- no host synchronisation (no ``.item()``, ``.cpu()``, ``print(tensor)``, data-dependent ``if``).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
import weakref
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class GraphStats:
    """Counters of the automatic cache (``FlowMatching(cuda_graph=True)``)."""

    captures: int = 0
    replays: int = 0
    first_calls: int = 0  # a signature's first call: run eagerly, captured on its second call
    eager_fallbacks: int = 0  # calls run eagerly: cache full, or noise=/generator= given
    evictions: int = 0  # graphs dropped (their field was garbage-collected, or clear())
    failed_captures: int = 0


def cuda_device(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(
            f"CUDA-graph capture needs a CUDA device; got device {str(device)!r}. "
            "Use FlowMatching.sample on CPU, or pass device='cuda'."
        )
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ReplayOrder:
    """Replays of graphs that share buffers (one graph, or one memory pool), one at a time.

    Each replay and the copy of its output are enqueued under ``lock`` on the caller's current
    stream, after the stream of the previous replay (``stream``) when that was another one.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.stream = None


class CapturedSampler:
    """A sampling call captured once and replayed: ``sampler()`` returns a fresh result.

    ``run`` is the eager sampling function (no arguments) whose every CUDA op is captured; it must
    return a tensor or a tuple of tensors. ``sampler(static_output=True)`` returns the graph's own
    output buffers instead of copies: they are overwritten by the next replay.
    """

    def __init__(self, run: Callable, device, warmup: int = 2, pool=None, keep_alive: bool = True,
                 generator: Optional[torch.Generator] = None, static_inputs=(),
                 order: Optional[ReplayOrder] = None):
        self.device = cuda_device(device)
        self._order = order if order is not None else ReplayOrder()
        # Holding ``run`` keeps the field (and the tensors it reads) alive as long as the graph;
        # the cache passes keep_alive=False and evicts the graph when the field is collected.
        # ``static_inputs``: tensors made before capture that the graph reads on every replay
        # (an explicit time grid): held here whatever keep_alive says.
        self._run = run if keep_alive else None
        self._static_inputs = tuple(static_inputs)
        self.graph = torch.cuda.CUDAGraph()
        self.generator = generator
        if generator is not None:
            if not hasattr(self.graph, "register_generator_state"):
                raise RuntimeError("capturing with generator= needs torch >= 2.5 "
                                   "(CUDAGraph.register_generator_state)")
            self.graph.register_generator_state(generator)
        with torch.cuda.device(self.device):
            rng_state = _rng_state(self.device, generator)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side):  # warm-up: JIT compiles, handles, allocator
                    for _ in range(warmup):
                        run()
                torch.cuda.current_stream(self.device).wait_stream(side)
                # Capture draws nothing from the generator now, so restoring its state keeps the
                # first replay on the same noise as the next eager call would have drawn.
                _set_rng_state(self.device, generator, rng_state)
                self.outputs = _capture(self.graph, run, pool, side)
            except BaseException:
                _set_rng_state(self.device, generator, rng_state)
                self.graph = None
                raise
        self.replays = 0

    def __call__(self, static_output: bool = False):
        order = self._order
        with order.lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            if order.stream is not None and order.stream != stream:
                stream.wait_stream(order.stream)
            self.graph.replay()
            order.stream = stream
            self.replays += 1
            if static_output:
                return self.outputs
            if isinstance(self.outputs, tuple):
                return tuple(t.clone() for t in self.outputs)
            return self.outputs.clone()


def _rng_state(device, generator):
    return generator.get_state() if generator is not None else torch.cuda.get_rng_state(device)


def _set_rng_state(device, generator, state):
    if generator is not None:
        generator.set_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def _capture(graph, run, pool, stream):
    """Capture ``run()`` into ``graph``; on failure re-raise the user's own exception."""
    error = None
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            try:
                outputs = run()
            except BaseException as exc:  # end the capture first, then re-raise this one
                error = exc
    except BaseException as exc:
        if error is None:
            raise
        # capture_end failed because the capture was already broken by ``error``: drop this one.
        del exc
    if error is not None:
        torch.cuda.synchronize()
        raise error
    return outputs


def field_key(step_fn):
    """(hashable identity, object to watch for garbage collection) of a field.

    Bound methods are keyed by (instance, function): ``model.step`` is a new object on every
    attribute access, but the same field.
    """
    owner = getattr(step_fn, "__self__", None)
    func = getattr(step_fn, "__func__", None)
    if owner is not None and func is not None:
        return ("method", id(owner), func), owner
    return ("callable", id(step_fn)), step_fn


class GraphCache:
    """At most ``max_graphs`` captured samplers, keyed by exactly what a graph bakes in.

    :meth:`call` is the whole policy. A signature's first call runs eagerly and is remembered
    (``stats.first_calls``); its second call captures, and later calls replay. So a field made
    afresh for every call (a new lambda each time) never captures a graph that nobody replays.
    Past the bound, new signatures run eagerly (``stats.eager_fallbacks``) rather than evicting
    graphs in use. A graph is evicted when its field is garbage-collected, or by :meth:`clear`.

    Threads: lookups, captures and replays are serialised by one lock, and the graphs of a
    device (which share a memory pool) by one :class:`ReplayOrder`. Eager calls run outside it.
    """

    def __init__(self, max_graphs: int = 8):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 0:
            raise ValueError(f"max_graphs must be an int >= 0, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.stats = GraphStats()
        self._graphs: dict = {}
        self._watchers: dict = {}
        self._seen: dict = {}  # signatures called once, each with the finalizer that forgets it
        self._pinned: dict = {}  # fields that cannot be weakly referenced: held until clear()
        self._pools: dict = {}
        self._orders: dict = {}
        # Re-entrant: a finalizer (_evict) can run in this thread while it holds the lock.
        self._lock = threading.RLock()

    def __getstate__(self):
        # Graphs, pools, locks and finalizers belong to this process and this object: a copy
        # (deepcopy, pickle, torch.save) starts with an empty cache and fresh stats.
        return {"max_graphs": self.max_graphs}

    def __setstate__(self, state):
        self.__init__(state["max_graphs"])

    def __len__(self):
        return len(self._graphs)

    def keys(self):
        return list(self._graphs)

    def pool(self, device: torch.device):
        """One memory pool per device, shared by its graphs, and the :class:`ReplayOrder` that
        makes them replay one at a time."""
        with self._lock:
            if device not in self._pools:
                self._pools[device] = torch.cuda.graph_pool_handle()
                self._orders[device] = ReplayOrder()
            return self._pools[device], self._orders[device]

    def call(self, key, watch, build: Callable[[], "CapturedSampler"], eager: Callable):
        """Replay the graph of ``key``; on a miss run ``eager()``, or capture with ``build()``
        when the signature was seen before and there is room. ``watch`` is the field object, or a
        tuple of them (two fields under guidance: the graph goes when either is collected)."""
        with self._lock:
            sampler = self._graphs.get(key)
            if sampler is not None:
                self.stats.replays += 1
                return sampler()
            if len(self._graphs) >= self.max_graphs:
                self.stats.eager_fallbacks += 1
            elif self._first_sight(key, watch):
                self.stats.first_calls += 1
            else:
                return self._add(key, watch, build)()
        return eager()

    def count_eager_fallback(self) -> None:
        with self._lock:
            self.stats.eager_fallbacks += 1

    def _first_sight(self, key, watch) -> bool:
        """Remember ``key`` until one of its fields is collected; True the first time it is seen.

        A field that cannot be weakly referenced cannot be forgotten when it dies (and its id
        reused): its signature is captured on its first call and the field pinned instead."""
        if key in self._seen:
            for finalizer in self._seen.pop(key):
                finalizer.detach()
            return False
        finalizers, pinned = _watch(watch, _forget_in, self, key)
        if pinned:
            for finalizer in finalizers:
                finalizer.detach()
            return False
        self._seen[key] = finalizers
        return True

    def _add(self, key, watch, build):
        try:
            sampler = build()
        except BaseException:
            self.stats.failed_captures += 1
            raise
        self.stats.captures += 1
        self._graphs[key] = sampler
        self._watchers[key], pinned = _watch(watch, _evict_from, self, key)
        if pinned:
            # Not weak-referenceable (__slots__ without __weakref__, builtins): hold it, so
            # that its id() - part of the key - cannot be reused by another field.
            self._pinned[key] = pinned[0] if len(pinned) == 1 else tuple(pinned)
        return sampler

    def _evict(self, key):
        with self._lock:
            if self._graphs.pop(key, None) is not None:
                self.stats.evictions += 1
            watchers = self._watchers.pop(key, ())
            self._pinned.pop(key, None)
        for watcher in watchers:
            watcher.detach()

    def clear(self):
        """Drop every graph and forget every signature seen once."""
        with self._lock:
            for key in list(self._graphs):
                self._evict(key)
            for finalizers in self._seen.values():
                for finalizer in finalizers:
                    finalizer.detach()
            self._seen.clear()


def _watch(watch, callback, cache, key):
    """Finalizers calling ``callback(weakref(cache), key)`` when any field of ``watch`` (one
    field, or a tuple of them: both fields under 1.5's guidance) is collected, and the fields
    that cannot be weakly referenced. The finalizers hold the cache weakly: dropping the sampler
    frees its graphs even while the fields live on."""
    finalizers, pinned = [], []
    for obj in watch if isinstance(watch, tuple) else (watch,):
        try:
            finalizers.append(weakref.finalize(obj, callback, weakref.ref(cache), key))
        except TypeError:
            pinned.append(obj)
    return finalizers, pinned


def _evict_from(cache_ref, key):
    cache = cache_ref()
    if cache is not None:
        cache._evict(key)


def _forget_in(cache_ref, key):
    cache = cache_ref()
    if cache is not None:
        with cache._lock:
            finalizers = cache._seen.pop(key, ())
        for finalizer in finalizers:  # the other fields' watchers
            finalizer.detach()


def warn_not_cuda(device) -> None:
    warnings.warn(
        f"cuda_graph=True is ignored on device {str(device)!r}: sampling runs eagerly "
        "(CUDA graphs need a CUDA device); this warning is shown once per sampler",
        RuntimeWarning,
        stacklevel=4,
    )
