"""The bounded cache of captured sampling calls (``FlowMatching(cuda_graph=True)``): which call
captures, replays or runs eagerly, its counters, and the bounds on what it remembers.

The captured samplers themselves are :mod:`flowmatch_fast.graph`'s.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import warnings
import weakref
from typing import Callable, Optional

import torch

from .graph import ReplayOrder

# Signatures remembered per graph the cache may hold: seen once (captured if called again), or
# whose capture failed (eager from then on). A call keyed on a per-request value (20,000 calls
# with 20,000 temperatures) remembers at most this many times max_graphs of them, the most
# recent; a signature forgotten that way runs eagerly once more, then captures.
SIGNATURES_PER_GRAPH = 4


@dataclasses.dataclass
class GraphStats:
    """Counters of the automatic cache (``FlowMatching(cuda_graph=True)``): each call it serves
    counts once, in captures, replays, first_calls, eager_fallbacks or failed_captures."""

    captures: int = 0
    replays: int = 0
    first_calls: int = 0  # a signature's first call: run eagerly, captured on its second call
    # calls run eagerly: cache full, noise=/generator= given, or a signature whose capture failed
    eager_fallbacks: int = 0
    evictions: int = 0  # graphs dropped (their field was garbage-collected, or clear())
    failed_captures: int = 0  # calls whose capture failed: run eagerly, the signature remembered


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


def _fields(watch) -> tuple:
    """``watch``: one field, or a tuple of them (both fields under 1.5's guidance)."""
    return watch if isinstance(watch, tuple) else (watch,)


def _weak_refs(watch, callback):
    """(plain weak references to the fields of ``watch`` that take one, calling ``callback`` when
    one dies; the fields that cannot be weakly referenced). Held by the cache: a dropped cache
    drops them and leaves nothing registered on a field (a ``weakref.finalize`` would stay in the
    global registry until its field dies)."""
    refs, pinned = [], []
    for obj in _fields(watch):
        try:
            refs.append(weakref.ref(obj, callback))
        except TypeError:  # __slots__ without __weakref__, builtins
            pinned.append(obj)
    return refs, pinned


class _Signatures:
    """Signatures with a value each, remembered until one of their fields is collected, at most
    ``bound`` of them (least recently used first out). A field that cannot be weakly
    referenced is held instead, so its ``id()`` (part of the key) cannot be reused while
    remembered."""

    def __init__(self, lock, bound: int):
        self._lock = lock
        self._bound = bound
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key):
        """The value of ``key`` (now the most recent), or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def add(self, key, value, watch) -> None:
        held = _weak_refs(watch, functools.partial(_forget, weakref.ref(self), key))
        self._entries[key] = (value, held)
        self._entries.move_to_end(key)
        while len(self._entries) > self._bound:
            self._entries.popitem(last=False)

    def pop(self, key) -> bool:
        return self._entries.pop(key, None) is not None

    def clear(self) -> None:
        self._entries.clear()


def _forget(table_ref, key, _dead):
    table = table_ref()
    if table is not None:
        with table._lock:
            table.pop(key)


class GraphCache:
    """At most ``max_graphs`` captured samplers, keyed by exactly what a graph bakes in.

    :meth:`call` is the whole policy. A signature's first call runs eagerly and is remembered
    (``stats.first_calls``); its second call captures, and later calls replay. So a field made
    afresh for every call (a new lambda each time) never captures a graph that nobody replays.
    Past the bound, new signatures run eagerly (``stats.eager_fallbacks``) rather than evicting
    graphs in use. A graph is evicted when its field is garbage-collected, or by :meth:`clear`.
    A capture that fails (a field that synchronises, say) runs the call eagerly and the
    signature eagerly from then on (``stats.failed_captures``, one warning). Signatures seen
    once or failed are remembered ``SIGNATURES_PER_GRAPH * max_graphs`` at most, each as long
    as its fields live.

    Threads: lookups, captures and replays are serialised by one lock, and the graphs of a
    device (which share a memory pool) by one :class:`ReplayOrder`. Eager calls run outside it.
    """

    # What the warning after a failed build says of it: a CUDA graph's, or (the compiled mode's
    # cache, flowmatch_fast.compiled) a torch.compile region's.
    FAILURES = {
        "graph": ("could not be captured in a CUDA graph", " (the field must keep the CUDA-graph "
                  "contract: no host synchronisation, static shapes)"),
        "compiled": ("could not be compiled", ""),
    }

    def __init__(self, max_graphs: int = 8, builds: str = "graph"):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 0:
            raise ValueError(f"max_graphs must be an int >= 0, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.builds = builds
        self.stats = GraphStats()
        # Re-entrant: a weak reference's callback can run in this thread while it holds the lock.
        self._lock = threading.RLock()
        self._graphs: dict = {}
        self._watchers: dict = {}  # key -> weak references to its fields (their death evicts)
        self._seen = _Signatures(self._lock, SIGNATURES_PER_GRAPH * max_graphs)
        self._failed = _Signatures(self._lock, SIGNATURES_PER_GRAPH * max_graphs)  # -> the cause
        self._pinned: dict = {}  # fields that cannot be weakly referenced: held until clear()
        self._pools: dict = {}
        self._orders: dict = {}

    def __getstate__(self):
        # Graphs, pools, locks and weak references belong to this process and this object: a
        # copy (deepcopy, pickle, torch.save) starts with an empty cache and fresh stats.
        return {"max_graphs": self.max_graphs, "builds": self.builds}

    def __setstate__(self, state):
        self.__init__(state["max_graphs"], state.get("builds", "graph"))

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

    def call(self, key, watch, build: Callable[[], Callable], eager: Callable,
             replay_args: Optional[dict] = None):
        """Replay the graph of ``key``; on a miss run ``eager()``, or capture with ``build()`` (a
        ``CapturedSampler``) when the signature was seen before and there is room. ``watch`` is
        the field object, or a tuple of them (two fields under guidance: the graph goes when
        either is collected). ``replay_args``: keywords of this call's replay (the call's
        generators, see ``CapturedSampler.__call__``)."""
        replay_args = replay_args or {}
        failure = None
        with self._lock:
            sampler = self._graphs.get(key)
            if sampler is not None:
                self.stats.replays += 1
                return sampler(**replay_args)
            if self._failed.get(key) is not None or len(self._graphs) >= self.max_graphs:
                self.stats.eager_fallbacks += 1
            elif self._first_sight(key, watch):
                self.stats.first_calls += 1
            else:
                try:
                    sampler = self._add(key, watch, build)
                except Exception as exc:  # not BaseException: KeyboardInterrupt propagates
                    self.stats.failed_captures += 1
                    # the cause as text: the exception's frames (the failed graph, its run)
                    # go now, before the eager run
                    failure = f"{type(exc).__name__}: {exc}"
                else:
                    return sampler(**replay_args)
        if failure is None:
            return eager()
        return self._run_uncaptured(key, watch, failure, eager)

    def _run_uncaptured(self, key, watch, failure: str, eager: Callable):
        """After a failed capture (``failure``: its cause): the call's eager result. An
        exception ``eager()`` raises is the field's own: it propagates, and nothing is
        remembered. Else the capture cannot work for this signature: it runs eagerly from now
        on, and one warning says why."""
        result = eager()
        with self._lock:
            self._failed.add(key, failure, watch)
        what, hint = self.FAILURES[self.builds]
        warnings.warn(
            f"flowmatch_fast: this sampling call {what} ({failure}); it ran eagerly, and calls "
            f"of the same signature will run eagerly from now on{hint}",
            RuntimeWarning,
            stacklevel=4,
        )
        return result

    def count_eager_fallback(self) -> None:
        with self._lock:
            self.stats.eager_fallbacks += 1

    def _first_sight(self, key, watch) -> bool:
        """Remember ``key`` until one of its fields is collected; True the first time it is seen.

        A field that cannot be weakly referenced cannot be forgotten when it dies (and its id
        reused): its signature is captured on its first call and the field pinned instead."""
        if self._seen.pop(key):
            return False
        if any(not _weak_referenceable(obj) for obj in _fields(watch)):
            return False
        self._seen.add(key, True, watch)
        return True

    def _add(self, key, watch, build):
        sampler = build()
        self.stats.captures += 1
        self._graphs[key] = sampler
        self._watchers[key], pinned = _weak_refs(
            watch, functools.partial(_evict_from, weakref.ref(self), key))
        if pinned:
            # Not weak-referenceable: hold it, so that its id() - part of the key - cannot be
            # reused by another field.
            self._pinned[key] = pinned[0] if len(pinned) == 1 else tuple(pinned)
        return sampler

    def _evict(self, key):
        with self._lock:
            if self._graphs.pop(key, None) is not None:
                self.stats.evictions += 1
            self._watchers.pop(key, None)
            self._pinned.pop(key, None)

    def clear(self):
        """Drop every graph and forget every signature seen once or failed."""
        with self._lock:
            for key in list(self._graphs):
                self._evict(key)
            self._seen.clear()
            self._failed.clear()


def _weak_referenceable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _evict_from(cache_ref, key, _dead):
    cache = cache_ref()
    if cache is not None:
        cache._evict(key)
