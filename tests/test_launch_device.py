"""Every Triton launch and every capture runs on the tensors' device (and its current stream),
whichever device is current: checked on CPU by watching the launch path, on 2+ GPUs for real."""

import contextlib

import pytest
import torch

from flowmatch_fast import FlowMatching, backends
from flowmatch_fast.kernels.triton import launch as triton_euler
from flowmatch_fast.kernels.contract import Guidance, Stage, TimeGrid


class Recorder:
    """Replaces the launch guard and the kernels: records each launch and the guard it ran in."""

    def __init__(self):
        self.inside = []  # devices of the guards entered, innermost last
        self.launches = []  # (kernel name, device of the guard around the launch)

    @contextlib.contextmanager
    def guard(self, device):
        self.inside.append(device)
        try:
            yield
        finally:
            self.inside.pop()

    def kernel(self, name):
        recorder = self

        class Kernel:
            def __getitem__(self, grid):
                def launch(*args, **meta):
                    recorder.launches.append((name, recorder.inside[-1] if recorder.inside else None))
                return launch

        return Kernel()


def test_every_triton_launch_enters_the_tensors_device(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(triton_euler, "launch_guard", rec.guard)
    monkeypatch.setattr(triton_euler, "_kernels", lambda: (rec.kernel("euler"), rec.kernel("stage")))
    x = torch.randn(3, 4, 2)
    v = torch.randn(3, 4, 2)
    grid = TimeGrid(torch.linspace(0, 1, 3), 3, x.dim())
    out = torch.empty_like(x)
    vu = torch.randn(3, 4, 2)
    for mix in (False, True):  # plain, and Alpamayo 1.5's mix of two fields
        guidance = Guidance("mix" if mix else "none", 2.5)
        v_uncond = vu if mix else None
        triton_euler.euler_step(x, v, grid, 0, None, None, v_uncond, guidance)
        triton_euler.stage_step(x, v, grid, 0, Stage("start", 0.5, write_acc=True), None, None,
                                None, v_uncond, guidance)
        triton_euler.launch_euler(x, v, v_uncond, grid.values, 0, out, None, 2.5, mix)
        triton_euler.launch_stage(x, v, v_uncond, None, grid.values, 0, 0.5, 1.0, False,
                                           out, None, None, 2.5, mix)
    assert rec.launches == [("euler", x.device), ("stage", x.device)] * 4


def test_the_guard_of_a_cuda_tensor_is_its_device():
    guard = triton_euler.launch_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(triton_euler.launch_guard(torch.device("cpu")), torch.cuda.device)


def _field(*, x, t):
    return torch.sin(1.7 * x) - 0.5 * x * t


@pytest.mark.gpu(devices=2)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_sampling_on_a_device_that_is_not_current(backend, method):
    dev = torch.device("cuda", 1)
    reason = backends.unavailable_reason(backend, dev)
    if reason:
        pytest.skip(reason)
    opts = dict(device=dev, return_all_steps=True, int_method=method)
    with torch.cuda.device(0):
        torch.manual_seed(5)
        want = FlowMatching(x_dims=(64, 2), backend="torch").sample(6, _field, **opts)
        fm = FlowMatching(x_dims=(64, 2), backend=backend)
        torch.manual_seed(5)
        got = fm.sample(6, _field, **opts)
        assert got[0].device == dev and torch.equal(got[0], want[0])
        sampler = fm.capture(6, _field, **opts)
        torch.manual_seed(5)
        replay = sampler()
        assert replay[0].device == dev and torch.equal(replay[0], want[0])
        cached = FlowMatching(x_dims=(64, 2), backend=backend, cuda_graph=True)
        for _ in range(3):
            torch.manual_seed(5)
            assert torch.equal(cached.sample(6, _field, **opts)[0], want[0])
        assert cached.graph_stats.captures == 1 and cached.graph_stats.replays == 1
        torch.cuda.synchronize(dev)
