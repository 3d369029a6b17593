"""What the CUDA-backend test files share: the extension (or a skip) and the host emulation."""

import importlib

import pytest

from flowmatch_fast.kernels.cuda import loader as cuda_loader

EXT = cuda_loader.EXTENSION


def ext_or_skip():
    try:
        return importlib.import_module(EXT)
    except ImportError as exc:
        pytest.skip(f"{EXT} is not built ({exc})")


@pytest.fixture
def emulated(monkeypatch):
    """The extension, with FLOWMATCH_FAST_CUDA_EMULATE=1 set for the test (CPU tensors run the
    kernels' code on the host) and the skew hooks back at 0 afterwards."""
    ext = ext_or_skip()
    monkeypatch.setenv(cuda_loader.EMULATE_ENV, "1")
    yield ext
    ext.set_host_result_skew(0)
    ext.set_host_mix_skew(0)
