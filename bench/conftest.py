"""pytest-benchmark glue: GPU cases skip without a GPU; a summary prints ratios to the original."""

import collections
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

_MEDIANS = collections.defaultdict(dict)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device(request.param)


@pytest.fixture
def run_benchmark(benchmark, request):
    """``run_benchmark(group, name, fn, device)``: time ``fn`` (synchronised) and remember it."""

    def run(group, name, fn, device, rounds=30):
        benchmark.group = group
        benchmark.name = f"{group}:{name}"
        if torch.device(device).type == "cuda":
            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=3, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            _MEDIANS[group][name] = stats.stats.median

    return run


@pytest.fixture
def side_by_side(request):
    """``side_by_side(group, fns, device, reps)``: every variant of ``fns`` timed interleaved in one
    loop (``flowmatch_fast.timing.time_interleaved``: ratios unbiased by a drifting machine),
    medians remembered for the summary; returns ``{name: Timing}``. Skips under
    ``--benchmark-disable`` (CI's single pass), after the test's own checks."""
    from flowmatch_fast.timing import time_interleaved

    def run(group, fns, device, reps=100):
        if request.config.getoption("benchmark_disable", False):
            pytest.skip("timed by make bench (--benchmark-disable: checks only)")
        timings = time_interleaved(fns, device, reps)
        _MEDIANS[group].update({name: tm.median for name, tm in timings.items()})
        return timings

    return run


# The compiled mode's two ratios (issue 23), printed where a group has the variants.
_COMPILE_RATIOS = (("ours-compile", "ours-eager", "speedup of compile=True over ours eager"),
                   ("ours-compile", "torch.compile-original",
                    "compile=True / torch.compile of the original (default mode)"))


def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS:
        return
    terminalreporter.section("flowmatch_fast: median per call, and ratio to the original loop")
    for group, rows in sorted(_MEDIANS.items()):
        base = rows.get("original")
        for name, median in sorted(rows.items(), key=lambda kv: kv[1]):
            ratio = f"{median / base:6.3f}x of original" if base else ""
            terminalreporter.write_line(f"{group:28s} {name:16s} {median * 1e6:11.1f} us  {ratio}")
        for ours, other, what in _COMPILE_RATIOS:
            if ours in rows and other in rows:
                a, b = (rows[ours], rows[other]) if "speedup" not in what else (rows[other], rows[ours])
                terminalreporter.write_line(f"{group:28s} {what}: {a / b:.2f}x")


def pytest_configure(config):
    # A case skipped for lack of a GPU or a backend never reaches its benchmark: not a problem.
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")
