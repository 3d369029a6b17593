"""Stand-ins that run the CUDA-graph paths of sampling on CPU: ``captures_on_cpu`` (the cache's
and ``capture``'s path with recording captures) and :class:`OpRecorder`."""

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from flowmatch_fast import sampling
from flowmatch_fast.graph import GraphCache


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
                 warmup=2, generator=None):
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
