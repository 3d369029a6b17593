"""Timing of zero-argument callables side by side: the demo's and the benchmarks' one helper."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, NamedTuple

import torch


class Timing(NamedTuple):
    """Seconds per call: the median and the 10th / 90th percentiles (the spread beside it)."""

    median: float
    p10: float
    p90: float


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timing(times) -> Timing:
    if len(times) < 2:
        return Timing(times[0], times[0], times[0])
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[0], q[-1])


def time_interleaved(fns: Dict[str, Callable], device, reps: int = 100, rounds: int = 5,
                     warmup: int = 3) -> Dict[str, Timing]:
    """``{name: Timing}`` of each zero-argument callable in ``fns``, the variants interleaved.

    Every variant is called ``warmup`` times (at most a third of ``reps``, at least once, so a
    short run is not mostly warm-up); then ``rounds`` rounds each time ``reps // rounds`` calls
    of every variant in turn, the order rotating per round, so a clock or thermal drift during
    the run spreads over all variants instead of favouring the last ones. Each call is timed
    alone: CUDA events on a GPU, the host clock elsewhere.
    """
    on_cuda = torch.device(device).type == "cuda"
    names = list(fns)
    rounds = min(rounds, reps)
    for name in names:
        for _ in range(min(warmup, max(1, reps // 3))):
            fns[name]()
    synchronize(device)
    per_round = max(1, reps // rounds)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if on_cuda:
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in range(per_round)]
                for start, end in events:
                    start.record()
                    fn()
                    end.record()
                torch.cuda.synchronize()
                times[name] += [s.elapsed_time(e) / 1e3 for s, e in events]
            else:
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
    return {name: _timing(ts) for name, ts in times.items()}
