import collections
import os
import random
import time

import pytest
import torch


def pytest_report_header(config):
    return [
        f"flowmatch_fast tests: torch {torch.__version__}, backend request "
        f"{os.environ.get('FLOWMATCH_FAST_BACKEND', 'auto')!r}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"random base seed {BASE_SEED} (set FLOWMATCH_TEST_SEED to replay)"
    ]


# Fresh random cases each run; the seed is printed in the header and in every failure message.
BASE_SEED = int(os.environ.get("FLOWMATCH_TEST_SEED", int(time.time()) % 100000))


@pytest.fixture
def case_rng(request):
    """A per-test RNG derived from the base seed and the test id (replayable)."""
    return random.Random(f"{BASE_SEED}:{request.node.nodeid}")


def _gpu_only(report) -> bool:
    """A skip because there is no GPU: a ``gpu``-marked test, or a skip saying it needs CUDA."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    # A skipped module (pytest.importorskip) arrives as a CollectReport, without keywords.
    return "gpu" in getattr(report, "keywords", ()) or "CUDA device" in reason


def pytest_terminal_summary(terminalreporter):
    """The seed (``-q`` hides the header), one line for the GPU-only skips, one per other reason."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if r.when != "teardown"]
    gpu_only = [r for r in skipped if _gpu_only(r)]
    others = collections.Counter(
        r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
        for r in skipped if not _gpu_only(r))
    write = terminalreporter.write_line
    write(f"flowmatch_fast: random base seed {BASE_SEED} (replay: FLOWMATCH_TEST_SEED={BASE_SEED})")
    if gpu_only:
        write(f"flowmatch_fast: {len(gpu_only)} GPU-only tests skipped (no CUDA device here; "
              "they run on a GPU machine: bash bench/gpu_suite.sh)")
    for reason, count in sorted(others.items()):
        write(f"flowmatch_fast: {count} skipped: {reason.removeprefix('Skipped: ')}")


def pytest_collection_modifyitems(items):
    """The one GPU skip: ``@pytest.mark.gpu`` skips without a CUDA device,
    ``@pytest.mark.gpu(devices=2)`` without two. Asked once the tests are collected, never at
    import; the skip is reported at the test's own line."""
    have = None
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        if have is None:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = marker.kwargs.get("devices", 1)
        if have < devices:
            item.add_marker(pytest.mark.skip(
                reason="needs a CUDA device" if have == 0 else f"needs {devices} CUDA devices"))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Each test that takes it runs on CPU, and on a CUDA device (``gpu``: skipped without one)."""
    return torch.device(request.param)


# Each fused backend where it runs: Triton on CPU tensors (TRITON_INTERPRET=1), the CUDA kernels
# on CPU tensors (their host emulation, FLOWMATCH_FAST_CUDA_EMULATE=1), both on a GPU.
TARGETS = [pytest.param((name, dev), id=f"{name}-{dev}",
                        marks=[pytest.mark.gpu] if dev == "cuda" else [])
           for name, dev in (("triton", "cpu"), ("cuda", "cpu"), ("triton", "cuda"), ("cuda", "cuda"))]


@pytest.fixture(params=TARGETS)
def target(request):
    """(backend module, device) of one fused backend; skipped with the reason where it cannot run."""
    from flowmatch_fast import backends  # not at import: tests/test_test_report.py runs this file alone

    name, dev = request.param
    reason = backends.unavailable_reason(name, torch.device(dev))
    if reason is not None:
        pytest.skip(reason)
    return backends.resolve(name, torch.device(dev)), torch.device(dev)


class FusedLaunches:
    """Kernel launches of the fused backend a kernel pass selects (``FLOWMATCH_FAST_BACKEND`` =
    ``triton`` or ``cuda``), counted while one test runs: a parity test checks with it that its
    cases ran the kernels, not a silent fallback to the reference (which passes any parity
    check). In the other passes ``backend`` is None and :meth:`expect` checks nothing."""

    def __init__(self, backend):
        self.backend = backend
        self.count = 0

    def expect(self, launches: int, what: str) -> None:
        """The launches since the last ``expect`` (or the test's start) were ``launches``."""
        got, self.count = self.count, 0
        if self.backend is not None:
            assert got == launches, (f"{what}: {got} {self.backend} kernel launches, expected "
                                     f"{launches} (the others fell back to the reference)")


@pytest.fixture
def fused_launches(monkeypatch):
    """A :class:`FusedLaunches` counting each launch the selected kernels make: Triton's
    ``_launch`` (the interpreter on CPU, or a GPU), the CUDA extension's three entry points (its
    host emulation on CPU, or a GPU). A launch of no elements launches nothing and counts 0."""
    from flowmatch_fast import backends

    name = backends.check_backend_name(None)
    counter = FusedLaunches(name if name in ("triton", "cuda") else None)

    def counting(launch):
        def counted(*args, **kwargs):
            counter.count += 1
            return launch(*args, **kwargs)
        return counted

    if counter.backend == "triton":
        from flowmatch_fast.kernels.triton import launch

        monkeypatch.setattr(launch, "_launch", counting(launch._launch))
    elif counter.backend == "cuda":
        from flowmatch_fast.kernels.cuda import loader

        ext = loader.load()
        if ext is not None:  # else sample raises: the backend was asked for explicitly
            for entry in ("euler_step", "stage_step", "sde_step"):
                monkeypatch.setattr(ext, entry, counting(getattr(ext, entry)))
    return counter
