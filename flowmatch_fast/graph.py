"""The whole sampling loop captured in one CUDA graph (the bounded cache of such graphs is
:mod:`flowmatch_fast.graph_cache`).

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

import threading
import warnings
from typing import Callable, Optional, Sequence

import torch


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
                 order: Optional[ReplayOrder] = None, generators: Sequence[torch.Generator] = ()):
        self.device = cuda_device(device)
        self._order = order if order is not None else ReplayOrder()
        # Holding ``run`` keeps the field (and the tensors it reads) alive as long as the graph;
        # the cache passes keep_alive=False and evicts the graph when the field is collected.
        # ``static_inputs``: tensors made before capture that the graph reads on every replay
        # (an explicit time grid): held here whatever keep_alive says.
        self._run = run if keep_alive else None
        self._static_inputs = tuple(static_inputs)
        self._replay_streams: set = set()  # the streams the static inputs are recorded on
        # The generators the run draws from (``generator=``, or ``generators``: one per row),
        # each advanced by every replay; none: the device's default generator.
        self.generator = generator
        self.generators = tuple(generators) + (() if generator is None else (generator,))
        self.graph = torch.cuda.CUDAGraph()
        if self.generators and not hasattr(self.graph, "register_generator_state"):
            raise RuntimeError("capturing with generator= needs torch >= 2.5 "
                               "(CUDAGraph.register_generator_state)")
        with torch.cuda.device(self.device):
            # Inside the guard: registering makes the graph's seed and offset tensors on the
            # current device (a cuda:1 generator registered with cuda:0 current had them there).
            for g in self.generators:
                self.graph.register_generator_state(g)
            rng_state = _rng_states(self.device, self.generators)
            try:
                side = warm_up(run, self.device, warmup)
                # Capture draws nothing from the generator now, so restoring its state keeps the
                # first replay on the same noise as the next eager call would have drawn.
                _set_rng_states(self.device, self.generators, rng_state)
                self.outputs = _capture(self.graph, run, pool, side)
            except BaseException:
                _set_rng_states(self.device, self.generators, rng_state)
                self.graph = None
                raise
        self.replays = 0

    def __call__(self, static_output: bool = False, generators=None):
        """Replay. ``generators``: the caller's, one per registered generator (the graph cache
        registers its own, made at capture): their states are copied into the registered ones
        before the replay and back after it, so that the call draws from them and leaves them
        where an eager call leaves them (a graph advances a registered generator by what its
        capture drew from it)."""
        order = self._order
        with order.lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            if order.stream is not None and order.stream != stream:
                stream.wait_stream(order.stream)
            if stream not in self._replay_streams:
                # The static inputs (the held grid) were made on the capturing stream; a replay
                # on another stream reads them: the allocator then keeps their memory until that
                # stream's work is done, even if the graph is evicted while a replay is in flight.
                self._replay_streams.add(stream)
                for held in self._static_inputs:
                    if hasattr(held, "record_stream"):  # a tensor (a compiled region is held too)
                        held.record_stream(stream)
            if generators is not None:
                for mine, theirs in zip(self.generators, generators):
                    mine.set_state(theirs.get_state())
            self.graph.replay()
            if generators is not None:
                for mine, theirs in zip(self.generators, generators):
                    theirs.set_state(mine.get_state())
            order.stream = stream
            self.replays += 1
            if static_output:
                return self.outputs
            if isinstance(self.outputs, tuple):
                return tuple(t.clone() for t in self.outputs)
            return self.outputs.clone()


def _rng_states(device, generators):
    if generators:
        return [g.get_state() for g in generators]
    return torch.cuda.get_rng_state(device)


def _set_rng_states(device, generators, states):
    if generators:
        for g, state in zip(generators, states):
            g.set_state(state)
    else:
        torch.cuda.set_rng_state(states, device)


def capturing(device: torch.device) -> bool:
    """True while ``device``'s current stream is being captured (the caller's own graph)."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def cast_cache_off(run: Callable, device_type: str = "cuda") -> Callable:
    """``run`` as a capture must call it: under the caller's autocast for ``device_type`` (when
    it is on), re-entered with the same dtype and autocast's weight-cast cache off.

    With the cache on, the warm-up fills it with low-precision copies of the weights and the
    capture records reads of those copies: freed when the caller's outermost autocast context
    exits (later replays read freed memory), and blind to in-place weight updates. PyTorch's
    ``make_graphed_callables`` refuses autocast with caching for this reason.
    """
    def run_without_cast_cache():
        if not torch.is_autocast_enabled(device_type):
            return run()
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                            enabled=True, cache_enabled=False):
            return run()

    return run_without_cast_cache


def warm_up(fn: Callable, device, warmup: int) -> torch.cuda.Stream:
    """Call ``fn()`` ``warmup`` times on a new side stream of ``device`` (JIT compiles, cuBLAS
    handles and allocator blocks happen here, never inside a capture); the device's current
    stream then waits for it. Returns the side stream, for the capture that follows."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return side


def capture_callable(fn: Callable, device=None, warmup: int = 2, pool=None):
    """``fn()`` captured in a new ``torch.cuda.CUDAGraph`` after ``warmup`` calls on a side
    stream: ``(graph, output)``; ``graph.replay()`` reruns it into ``output``'s buffers.

    ``device``: a CUDA device (the current one when None); ``pool``: a memory pool handle shared
    with other graphs. An exception raised by ``fn`` during the capture is re-raised as it is.
    """
    device = cuda_device("cuda" if device is None else device)
    graph = torch.cuda.CUDAGraph()
    fn = cast_cache_off(fn, device.type)
    with torch.cuda.device(device):
        side = warm_up(fn, device, warmup)
        return graph, _capture(graph, fn, pool, side)


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


def warn_not_cuda(device) -> None:
    warnings.warn(
        f"cuda_graph=True is ignored on device {str(device)!r}: sampling runs eagerly "
        "(CUDA graphs need a CUDA device); this warning is shown once per sampler",
        RuntimeWarning,
        stacklevel=4,
    )
