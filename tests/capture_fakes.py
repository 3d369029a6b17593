"""Stand-ins that run the CUDA-graph paths on CPU: ``captures_on_cpu`` (the cache's and
``capture``'s path with recording captures), ``fake_cuda`` (the captured sampler itself, with
the CUDA calls it makes recorded) and :class:`OpRecorder`."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flowmatch_fast import graph, sampling
from flowmatch_fast.graph_cache import GraphCache


class OpRecorder(TorchDispatchMode):
    """The aten ops run under it, by name, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class RecordingCapture:
    """Stands in for ``CapturedSampler`` in the sampling path: the capture runs the loop once
    (its outputs are the graph's buffers, ``ops`` the aten ops a graph would record) and it holds
    what the real one holds: ``run`` only with ``keep_alive``, the ``static_inputs`` always."""

    def __init__(self, run, device, pool=None, order=None, keep_alive=True, static_inputs=(),
                 warmup=2, generator=None, generators=()):
        self._run = run if keep_alive else None
        self._static_inputs = tuple(static_inputs)
        with OpRecorder() as recorder:
            self.outputs = run()
        self.ops = recorder.ops

    def __call__(self):
        if isinstance(self.outputs, tuple):
            return tuple(t.clone() for t in self.outputs)
        return self.outputs.clone()


@pytest.fixture
def captures_on_cpu(monkeypatch):
    """The sampling path of ``cuda_graph=True`` and ``capture`` run on CPU: everything before
    the plan sees the CUDA device it was asked for, the plan is made for the CPU, captures are
    ``RecordingCapture``s (returned, in order of capture)."""
    made = []
    plan = sampling.Sampling._plan
    monkeypatch.setattr(sampling.Sampling, "_plan",
                        lambda self, batch, device, options, captured=False:
                        plan(self, batch, "cpu", options, captured))
    monkeypatch.setattr(sampling, "cuda_device", lambda device: device)
    monkeypatch.setattr(sampling, "CapturedSampler",
                        lambda *a, **kw: made.append(RecordingCapture(*a, **kw)) or made[-1])
    monkeypatch.setattr(GraphCache, "pool", lambda self, device: (None, None))
    return made


class FakeCuda:
    """Stands in for the ``torch.cuda`` calls of :class:`flowmatch_fast.graph.CapturedSampler`,
    on CPU: ``log`` records, in order, each call that depends on where it runs, with the current
    device and stream at that moment (``current``, ``stream``)."""

    def __init__(self):
        self.current = 0
        self.stream = FakeStream(self, "default")
        self.log = []

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = previous

    @contextlib.contextmanager
    def use_stream(self, stream):
        previous, self.stream = self.stream, stream
        try:
            yield
        finally:
            self.stream = previous

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        self.log.append(("capture", self.current, stream.name))
        yield


class FakeStream:
    def __init__(self, cuda, name):
        self.cuda, self.name = cuda, name

    def wait_stream(self, other):
        self.cuda.log.append(("wait", self.name, other.name))


class FakeGraph:
    """Registers generators; a replay advances each registered one by what one draw takes, as a
    CUDA graph advances its registered generators by what its capture drew from them."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.generators = []

    def register_generator_state(self, generator):
        self.cuda.log.append(("register", generator.name, self.cuda.current))
        if generator not in self.generators:
            self.generators.append(generator)

    def replay(self):
        self.cuda.log.append(("replay", self.cuda.current, self.cuda.stream.name))
        for g in self.generators:
            self.cuda.log.append(("draw", g.name, g.state))
            g.draw()


class FakeGenerator:
    """A generator whose state a run advances (``draw``)."""

    def __init__(self, name):
        self.name, self.state = name, 0

    def draw(self):
        self.state += 1

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


class HeldTensor:
    """A static input of a sampler: records the streams it is recorded on."""

    def __init__(self, cuda):
        self.cuda = cuda

    def record_stream(self, stream):
        self.cuda.log.append(("record_stream", stream.name))


@pytest.fixture
def fake_cuda(monkeypatch):
    """A :class:`FakeCuda` in place of the CUDA calls ``CapturedSampler`` makes."""
    fake = FakeCuda()
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "CUDAGraph", lambda: FakeGraph(fake))
    monkeypatch.setattr(cuda, "device", fake.device)
    monkeypatch.setattr(cuda, "Stream", lambda device=None: FakeStream(fake, "side"))
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: fake.stream)
    monkeypatch.setattr(cuda, "stream", fake.use_stream)
    monkeypatch.setattr(cuda, "graph", fake.graph)
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "get_rng_state", lambda device=None: "default-state")
    monkeypatch.setattr(cuda, "set_rng_state", lambda state, device=None: None)
    monkeypatch.setattr(graph, "cuda_device", torch.device)
    return fake
