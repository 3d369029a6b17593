"""Backend selection: auto's choices, explicit requests, and their errors (no GPU needed)."""

import pytest
import torch

from flowmatch_fast import backends
from flowmatch_fast.kernels import reference
from flowmatch_fast.kernels.cuda import launch as cuda_euler
from flowmatch_fast.kernels.triton import launch as triton_euler

CUDA = torch.device("cuda")


@pytest.fixture
def pretend(monkeypatch):
    """Pretend which backends can run on a CUDA device."""

    def set_available(*names):
        for name, mod in (("triton", triton_euler), ("cuda", cuda_euler)):
            reason = None if name in names else f"{name} pretended missing"
            monkeypatch.setattr(mod, "unavailable_reason", lambda device, r=reason: r)

    return set_available


def test_auto_prefers_the_compiled_kernel(pretend):
    pretend("triton", "cuda")
    for numel, captured in ((768, False), (768, True), (1 << 24, False)):
        assert backends.resolve("auto", CUDA, numel, captured) is cuda_euler


def test_auto_without_the_extension_weighs_triton_launch_cost(pretend):
    pretend("triton")
    assert backends.resolve("auto", CUDA, 768, captured=False) is reference  # eager, small
    assert backends.resolve("auto", CUDA, 768, captured=True) is triton_euler  # in a graph
    big = backends.AUTO_TRITON_MIN_NUMEL
    assert backends.resolve("auto", CUDA, big, captured=False) is triton_euler  # bandwidth-bound
    assert backends.resolve("auto", CUDA, big - 1, captured=False) is reference


def test_auto_with_nothing_compiled_is_plain_torch(pretend):
    pretend()
    assert backends.resolve("auto", CUDA, 1 << 24, captured=True) is reference
    assert backends.resolve("auto", torch.device("cpu")) is reference


def test_explicit_request_never_falls_back(pretend):
    pretend("cuda")
    with pytest.raises(RuntimeError, match="'triton' is not available on cuda: triton pretended"):
        backends.resolve("triton", CUDA)
    pretend("triton")
    assert backends.resolve("triton", CUDA, 768, captured=False) is triton_euler
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        backends.resolve("cuda", CUDA)


def test_real_reasons_on_this_machine(monkeypatch):
    monkeypatch.delenv("FLOWMATCH_FAST_CUDA_EMULATE", raising=False)  # the emulated pass sets it
    reasons = backends.available_backends("cpu")
    assert reasons["torch"] is None
    assert "CUDA tensors" in reasons["cuda"]


def test_a_backend_that_cannot_read_the_default_dtypes_grid_is_skipped_or_refused(pretend):
    """Under a float64 default the original's grid is float64: the CUDA kernels read float32
    grids only (``GRID_DTYPES``), so auto takes Triton or plain torch and an explicit request
    raises naming the default dtype; a 16-bit default's grid only plain torch reads."""
    from flowmatch_fast import FlowMatching
    from flowmatch_fast.sampling import Options

    pretend("triton", "cuda")
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        f64 = torch.float64
        assert backends.resolve("auto", CUDA, 768, True, f64) is triton_euler
        assert backends.resolve("auto", CUDA, 768, False, f64) is reference
        assert backends.resolve("triton", CUDA, 768, False, f64) is triton_euler
        with pytest.raises(RuntimeError, match=r"'cuda' cannot sample under the default dtype "
                                               r"torch\.float64: .* float32 time grid"):
            backends.resolve("cuda", CUDA, 768, True, f64)
        # the plan asks with its own grid's dtype
        fm = FlowMatching(x_dims=(64, 2), backend="auto")
        assert fm._plan(6, CUDA, Options(), captured=True).backend is triton_euler
        assert fm._plan(6, CUDA, Options(shift=3.0), captured=True).backend is triton_euler
        torch.set_default_dtype(torch.bfloat16)  # shifted/explicit grids are float32 there
        assert fm._plan(6, CUDA, Options(), captured=True).backend is reference
        assert fm._plan(6, CUDA, Options(shift=3.0), captured=True).backend is cuda_euler
        with pytest.raises(RuntimeError, match=r"'triton' cannot sample under the default dtype "
                                               r"torch\.bfloat16"):
            FlowMatching(x_dims=(64, 2), backend="triton")._plan(6, CUDA, Options())
    finally:
        torch.set_default_dtype(previous)
    assert fm._plan(6, CUDA, Options(), captured=True).backend is cuda_euler
