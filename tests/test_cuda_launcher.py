"""What the CUDA backend's launch path decides, checked on the host through the extension and its
host emulation (no GPU): index math and coalescing, argument checks, which launches run in the
extension (counted), the vector-path choice, 64-bit offsets, fields with more dims than the
binding holds, the host's 16-bit widening, that a one-ulp error in the kernels fails the parity
checks, the stream and device a launch goes to, the errors without a GPU or without the
extension, and the custom ops torch.compile records. GPU-only behaviour at the end (-m gpu).
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from bitwise import assert_bitwise, sample_both
from cuda_ext import EXT, emulated, ext_or_skip  # noqa: F401  (emulated: a fixture)
from fields import smooth
from flowmatch_fast import FlowMatching, alpamayo1_5
from flowmatch_fast.graph import capture_callable
from flowmatch_fast.integrators import METHODS
from flowmatch_fast import ops
from flowmatch_fast.kernels import reference
from flowmatch_fast.kernels.cuda import launch as cuda_euler
from flowmatch_fast.kernels.cuda import loader as cuda_loader
from flowmatch_fast.kernels.contract import Guidance, Stage, TimeGrid
from oracle import spec_sample

# ------------------------------------------------------------------ host-side index math
def _expected_offsets(shape, strides, indices):
    out = []
    for e in indices:
        off = 0
        for size, stride in zip(reversed(shape), reversed(strides)):
            off += (e % size) * stride
            e //= size
        out.append(off)
    return out


@pytest.mark.parametrize("force64", [False, True])
def test_field_indexing_matches_torch_strides(force64):
    ext = ext_or_skip()
    base = torch.empty(0)
    views = [
        base.new_empty(3, 4, 5),
        base.new_empty(3, 5, 4).transpose(1, 2),
        base.new_empty(3, 4, 11)[:, :, ::2],
        base.new_empty(1, 4, 5).expand(3, 4, 5),
        base.new_empty(3, 1, 5).expand(3, 4, 5),
        base.new_empty(2, 3, 1, 5, 7, 2).permute(5, 0, 1, 2, 4, 3),  # rank 6
        base.new_empty(6, 7).t()[:, 1:],
        base.new_empty(1, 1),
        base.new_empty(1000003, 2)[:, 0].view(1, 1000003),
    ]
    for view in views:
        shape, strides = list(view.shape), list(view.stride())
        n = view.numel()
        indices = sorted(set(list(range(min(n, 300))) + [n - 1, n // 2, n // 3]))
        got = ext.field_offsets(shape, strides, indices, force64)
        assert got == _expected_offsets(shape, strides, indices), (shape, strides)


def test_coalesce_merges_and_keeps_broadcasts():
    ext = ext_or_skip()
    assert ext.coalesce([4, 1, 3, 5], [15, 99, 5, 1]) == ([60], [1])  # contiguous: one dim
    assert ext.coalesce([4, 3, 5], [0, 5, 1]) == ([4, 15], [0, 1])  # [1, *dims] broadcast
    assert ext.coalesce([2, 3, 5], [0, 0, 1]) == ([6, 5], [0, 1])
    assert ext.coalesce([3, 4], [1, 3]) == ([3, 4], [1, 3])  # transposed: nothing merges
    assert ext.coalesce([1, 1], [7, 9]) == ([], [])


def test_stage_binding_checks_its_arguments_before_any_cuda_call():
    """Validation happens on the host, before the launch: these raise without a GPU."""
    ext = ext_or_skip()
    codes = ext.dtype_codes()
    f32, bf16 = codes["float32"], codes["bfloat16"]

    def call(**over):
        args = dict(x=16, state_code=f32, k=32, k_uncond=0, field_code=bf16, acc=0, out=48,
                    acc_out=0, doubled=False, traj=0, traj_row=0, traj_stride=0, sizes=[2, 3],
                    field_strides=[3, 1], grid=64, step=0, coef=0.5, acc_w2=False,
                    from_acc=False, guidance_weight=1.0, device=0, stream=0, mode=0)
        args.update(over)
        return ext.stage_step(**args)

    with pytest.raises(ValueError, match="state dtype"):
        call(state_code=codes["float16"])
    with pytest.raises(ValueError, match="field dtype"):
        call(field_code=9)
    with pytest.raises(ValueError, match="null tensor pointer"):
        call(x=0)
    with pytest.raises(ValueError, match="trajectory"):
        call(traj=80, traj_row=4, traj_stride=9)  # 4 does not divide the 6 elements
    with pytest.raises(ValueError, match="negative step"):
        call(step=-1)
    with pytest.raises(ValueError, match="unknown velocity mode 9"):
        call(mode=9)
    with pytest.raises(ValueError, match="null tensor pointer"):
        call(mode=ext.velocity_modes()["cfg"])  # guidance without the unconditional field
    with pytest.raises(ValueError, match="bad device index"):
        call(device=-2)
    with pytest.raises(ValueError, match="dims after coalescing"):
        call(sizes=[2] * 9, field_strides=[4 ** (8 - d) for d in range(9)])  # nothing merges
    assert call(sizes=[0, 3], field_strides=[3, 1]) is None  # nothing to write: no launch


def test_custom_ops_are_registered_with_their_mutations():
    """torch.compile records the launches as these ops; they write only their output buffers."""
    assert ops.REGISTERED
    euler = str(torch.ops.flowmatch_fast.cuda_euler_step.default._schema)
    stage = str(torch.ops.flowmatch_fast.cuda_stage_step.default._schema)

    def mutated(op):  # the arguments the schema marks as written (Tensor(a!))
        schema = op.default._schema
        return {a.name for a in schema.arguments
                if a.alias_info is not None and a.alias_info.is_write}

    assert mutated(torch.ops.flowmatch_fast.cuda_euler_step) == {"out", "traj"}, euler
    assert mutated(torch.ops.flowmatch_fast.cuda_stage_step) == {"out", "acc_out", "traj"}, stage
    assert euler.endswith("-> ()") and stage.endswith("-> ()")


class _Traced(Exception):
    """Raised by the recording backend instead of running the graph (meta tensors hold no data)."""


@pytest.mark.parametrize("method, kwargs", [
    ("euler", {}),
    ("rk4", {}),
    ("heun", dict(guidance=True, guidance_weight=2.5, return_all_steps=True)),
    ("midpoint", dict(return_all_steps=True)),
], ids=["euler", "rk4", "heun-guided-traj", "midpoint-traj"])
def test_torch_compile_traces_cuda_sampling_into_the_ops(monkeypatch, method, kwargs):
    """fullgraph=True: a cuda-backend sample traces as one graph (no break), one op per update.

    Traced on meta tensors (Dynamo runs on fake tensors anyway, so no GPU is needed); the
    backend records the graph and stops. The GPU test below runs the same graph for real.
    """
    steps = 3
    fm = FlowMatching(x_dims=(64, 2), backend="cuda", num_inference_steps=steps)
    graph = _traced_graph(monkeypatch, lambda: fm.sample(6, _smooth, device="meta",
                                                         int_method=method, **kwargs))
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    op = "flowmatch_fast.cuda_euler_step" if method == "euler" else "flowmatch_fast.cuda_stage_step"
    assert targets.count(op) == steps * len(METHODS[method]), targets
    other = "flowmatch_fast.cuda_stage_step" if method == "euler" else "flowmatch_fast.cuda_euler_step"
    assert other not in targets


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_torch_compile_traces_the_1_5_guided_update_into_the_ops(monkeypatch, method):
    """Alpamayo 1.5's guided sampling under torch.compile(fullgraph=True): one op per stage with
    mix=True, the two fields' mix inside it (no plain-torch mix in the graph)."""
    monkeypatch.setattr(reference, "mixed_velocity", None)  # tracing it would fail
    steps = 3
    fm = alpamayo1_5.FlowMatching(method, steps, 2.5, (64, 2), True, backend="cuda")
    unguided = lambda *, x, t: _smooth(x=-x, t=t)  # noqa: E731
    graph = _traced_graph(monkeypatch, lambda: fm.sample(6, _smooth, unguided, device="meta"))
    op = "flowmatch_fast.cuda_euler_step" if method == "euler" else "flowmatch_fast.cuda_stage_step"
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and str(n.target) == op]
    assert len(calls) == steps * len(METHODS[method])
    assert all(n.args[-1] is True for n in calls), [n.args for n in calls]  # the op's mix


def _smooth(*, x, t):
    return torch.sin(1.7 * x) - 0.5 * x * t + t


def _traced_graph(monkeypatch, run):
    """The one graph torch.compile(run, fullgraph=True) records of cuda-backend sampling on meta
    tensors (Dynamo runs on fake tensors anyway, so no GPU is needed); the recording backend
    stops before running it."""
    monkeypatch.setattr(cuda_euler, "unavailable_reason", lambda device: None)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)

        def stop(*args):
            raise _Traced

        return stop

    torch._dynamo.reset()
    with pytest.raises(_Traced):
        torch.compile(run, fullgraph=True, backend=record)()
    assert len(graphs) == 1
    return graphs[0]


def test_without_the_ops_compile_traces_the_reference(monkeypatch):
    """A torch that rejected the registration: compiled code falls back to the reference ops."""
    monkeypatch.setattr(cuda_euler, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(ops, "REGISTERED", False)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # the reference ops run on meta tensors too

    fm = FlowMatching(x_dims=(8,), backend="cuda", num_inference_steps=2)
    torch._dynamo.reset()
    torch.compile(lambda: fm.sample(3, lambda *, x, t: x * t, device="meta", int_method="heun"),
                  fullgraph=True, backend=record)()
    assert len(graphs) == 1
    assert not any("flowmatch_fast" in str(n.target) for n in graphs[0].graph.nodes)


def test_availability_check_is_a_constant_under_compile(monkeypatch):
    """A first call under torch.compile (caches cold) must not break the graph: the check calls
    into the extension, which Dynamo cannot trace, so it runs at trace time as a constant."""
    from flowmatch_fast import backends

    monkeypatch.setattr(cuda_loader, "_runtime_checked", False)
    monkeypatch.setattr(cuda_loader, "_runtime_error", None)
    monkeypatch.setattr(cuda_loader, "_arch_reasons", {})
    expected = backends.unavailable_reason("cuda", torch.device("cuda"))
    monkeypatch.setattr(cuda_loader, "_runtime_checked", False)
    monkeypatch.setattr(cuda_loader, "_runtime_error", None)
    monkeypatch.setattr(cuda_loader, "_arch_reasons", {})

    def probe(x):
        reason = backends.unavailable_reason("cuda", torch.device("cuda"))
        return x + (0.0 if reason is None else 1.0)

    torch._dynamo.reset()
    got = torch.compile(probe, fullgraph=True, backend="eager")(torch.zeros(1))
    assert got.item() == (0.0 if expected is None else 1.0)


def test_stage_step_rejects_other_acc_weights():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="acc_weight must be 1 or 2"):
        cuda_euler.stage_step(x, x, TimeGrid(torch.linspace(0, 1, 3), 2, 2), 0,
                              Stage("start", 0.5, acc_weight=3.0), x)


# ----------------------------------------------------------------------- without a GPU
def test_cuda_backend_on_cpu_says_what_is_wrong(monkeypatch):
    monkeypatch.delenv(cuda_euler.EMULATE_ENV, raising=False)
    reason = cuda_euler.unavailable_reason(torch.device("cpu"))
    assert "CUDA tensors" in reason and "cpu" in reason and cuda_euler.EMULATE_ENV in reason
    fm = FlowMatching(x_dims=4, backend="cuda")
    with pytest.raises(RuntimeError, match="cuda.*not available on cpu.*CUDA tensors"):
        fm.sample(2, lambda *, x, t: x)


def test_unbuilt_extension_reason_names_the_fix(monkeypatch):
    monkeypatch.setattr(cuda_loader, "_ext", None)
    monkeypatch.setattr(cuda_loader, "_import_error", ImportError("No module named 'x'"))
    reason = cuda_euler.unavailable_reason(torch.device("cuda"))
    assert EXT in reason and "not built" in reason and "pip install" in reason
    grid = TimeGrid(torch.linspace(0, 1, 3), 2, 2)
    with pytest.raises(RuntimeError, match="not built"):
        cuda_euler.euler_step(torch.zeros(2, 3), torch.zeros(2, 3), grid, 0)
    with pytest.raises(RuntimeError, match="not built"):
        cuda_euler.stage_step(torch.zeros(2, 3), torch.zeros(2, 3), grid, 0, Stage("start", 0.5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without GPU")
def test_without_gpu_the_extension_raises_clear_errors(monkeypatch):
    ext = ext_or_skip()
    monkeypatch.delenv(cuda_euler.EMULATE_ENV, raising=False)
    try:
        count = ext.device_count()
    except RuntimeError as exc:
        assert re.search(r"cuda\w*Error\w*: ", str(exc)), exc  # CUDA's error name and message
    else:
        assert count == 0
    monkeypatch.setattr(cuda_loader, "_runtime_checked", False)
    monkeypatch.setattr(cuda_loader, "_runtime_error", None)
    reason = cuda_euler.unavailable_reason(torch.device("cuda"))
    assert reason is not None and ("cudaGetDeviceCount" in reason or "no GPU" in reason)
    x = torch.zeros(2, 3)
    grid = TimeGrid(torch.linspace(0, 1, 3), 2, 2)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_euler.euler_step(x, x, grid, 0)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_euler.stage_step(x, x, grid, 0, Stage("start", 0.5, 2.0, True), x)


# ---------------------------------------------------------------- the host emulation's switch
def test_emulation_is_off_without_the_variable(monkeypatch):
    """Without FLOWMATCH_FAST_CUDA_EMULATE, CPU tensors never reach the extension."""
    monkeypatch.delenv(cuda_euler.EMULATE_ENV, raising=False)
    assert cuda_euler.EMULATE_ENV in cuda_euler.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(cuda_loader, "load", lambda: ext_or_skip())
    ext = cuda_loader.load()
    before = ext.host_launches()["euler"]
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="CUDA tensors.*FLOWMATCH_FAST_CUDA_EMULATE"):
        cuda_euler.euler_step(x, x, TimeGrid(torch.linspace(0, 1, 3), 2, 2), 0)
    assert ext.host_launches()["euler"] == before


def test_emulation_makes_the_backend_available_on_cpu(emulated):
    assert cuda_euler.unavailable_reason(torch.device("cpu")) is None
    assert cuda_euler.unavailable_reason(torch.device("meta")) is not None


def _field(*, x, t):
    return smooth(x, t).to(torch.bfloat16)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_every_step_runs_in_the_extension(emulated, monkeypatch, method, guided):
    """Sampling with FLOWMATCH_FAST_BACKEND=cuda on CPU tensors (the CI pass) launches the
    emulated kernels once per stage of every step, and gives the oracle's / reference's bits."""
    monkeypatch.setenv("FLOWMATCH_FAST_BACKEND", "cuda")
    steps = 5
    kwargs = dict(guidance=True, guidance_weight=2.5) if guided else {}
    before = emulated.host_launches()
    torch.manual_seed(4)
    ours = FlowMatching(x_dims=(64, 2), num_inference_steps=steps).sample(
        6, _field, int_method=method, return_all_steps=True, **kwargs)
    after = emulated.host_launches()
    kernel = "euler" if method == "euler" else "stage"
    assert after[kernel] - before[kernel] == steps * len(METHODS[method])
    if method == "euler" and not guided:  # the SPEC's own loop
        torch.manual_seed(4)
        want = spec_sample((64, 2), 6, _field, steps=steps, return_all_steps=True)
    else:
        torch.manual_seed(4)
        want = FlowMatching(x_dims=(64, 2), num_inference_steps=steps, backend="torch").sample(
            6, _field, int_method=method, return_all_steps=True, **kwargs)
    assert torch.equal(ours[0], want[0]) and torch.equal(ours[1], want[1])


def test_host_widening_matches_torch_for_every_bit_pattern(emulated):
    """float16 / bfloat16 -> float32 as the kernels do it on the host, for all 65536 patterns
    (zeros, denormals, infinities, NaNs): the bits of torch's .to(float32); a NaN stays a NaN
    (its payload is not part of the contract: cvt.f32.f16 and CUDA's host conversion canonicalise it)."""
    codes = emulated.dtype_codes()
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        want = bits.view(dtype).float()
        raw = emulated.widen_host(codes[str(dtype).split(".")[1]], list(range(65536)))
        got = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), dtype
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32)), dtype
        assert nan.sum() > 0 and (want[~nan] == 0).sum() == 2 and want.isinf().sum() == 2


def _narrowing_cases():
    """float32 bit patterns for float -> float16 / bfloat16: every high half (every sign, exponent
    and bf16 mantissa) with low halves on and around the rounding boundaries (bf16 ties at 0x8000;
    float16 ties at 0x1000 for normals and at 0x2000, 0x4000, 0x8000 for denormals, the rest in
    the high half), plus random patterns."""
    high = torch.arange(65536, dtype=torch.int64) << 16
    lows = [0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2001, 0x3000, 0x4000, 0x4001, 0x7FFF,
            0x8000, 0x8001, 0x9000, 0xC000, 0xFFFF]
    cases = [high | low for low in lows]
    cases.append(torch.randint(0, 2**32, (1 << 20,), generator=torch.Generator().manual_seed(1)))
    bits = torch.cat(cases)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def test_host_narrowing_matches_torch_over_many_bit_patterns(emulated):
    """float32 -> float16 / bfloat16 as the kernels round on the host (kMix): the bits of torch's
    .to(), round to nearest even, for zeros, denormals (of both widths), overflow to inf, inf,
    exact ties either way; a NaN stays a NaN (payloads differ between torch's own scalar and
    vector conversions, and the device canonicalises them)."""
    codes = emulated.dtype_codes()
    values = _narrowing_cases()
    nan = values.isnan()
    for dtype in (torch.float16, torch.bfloat16):
        raw = emulated.narrow_host(codes[str(dtype).split(".")[1]], values.numpy().tobytes())
        got = torch.frombuffer(bytearray(raw), dtype=torch.int16)
        want = values.to(dtype).view(torch.int16)
        assert got.view(dtype)[nan].isnan().all(), dtype
        bad = (got != want) & ~nan
        assert not bad.any(), (dtype, values[bad][:5].tolist())
        # The cases hold what they claim: exact ties rounded up and down, overflow to inf.
        wide, rounded = values.double(), want.view(dtype).double()
        up, down = rounded.abs() > wide.abs(), rounded.abs() < wide.abs()
        # a tie: as far from the next pattern on the other side (sign-magnitude: +-1 in the bits)
        other = torch.where(up, want - 1, want + 1).view(dtype).double()
        tie = (wide - rounded).abs() == (wide - other).abs()
        assert (tie & up).sum() > 1000 and (tie & down).sum() > 1000, dtype
        assert (want.view(dtype).isinf() & values.isfinite()).any(), dtype


# -------------------------------------------------------------------- what the launcher decides
def _launch(step, x, v, *, out=None, traj=None, vu=None, acc=None, doubled=False):
    """One emulated launch of euler_step / stage_step, checked against the reference on the same
    inputs and NaN-poisoned buffers (``out`` and ``traj`` are used as given: their alignment is
    part of the case); returns what the host launcher recorded."""
    grid = TimeGrid(torch.tensor([0.0, 0.3, 1.0]), x.shape[0], x.dim())
    if out is None and doubled:
        out = torch.empty((2 * x.shape[0], *x.shape[1:]), dtype=torch.promote_types(
            x.dtype, torch.promote_types(torch.float32, v.dtype)))
    results = []
    for backend in (reference, cuda_euler):
        for buf in (out, traj):
            if buf is not None:
                buf.fill_(float("nan"))
        if step == "euler":
            r = backend.euler_step(x, v, grid, 1, out, traj, vu, Guidance("batch", 2.5))
        else:
            r, _ = backend.stage_step(x, v, grid, 1, Stage("start", 0.5, 2.0, True), acc, out,
                                      traj, vu, Guidance("batch", 2.5))
        results.append((r.clone(), None if traj is None else traj.clone()))
    (want, want_traj), (got, got_traj) = results
    assert torch.equal(got, want)
    assert traj is None or torch.equal(got_traj, want_traj)
    return cuda_loader.load().host_launches()


def _misaligned(shape, dtype=torch.float32):
    n = torch.Size(shape).numel()
    return torch.zeros(n + 1, dtype=dtype)[1:].view(shape).copy_(torch.randn(shape))


def test_vector_path_when_every_pointer_is_aligned(emulated):
    x = torch.randn(4, 64)
    cases = [  # (state, field, elements per vector: 16 bytes of the widest)
        (torch.float32, torch.float32, 4), (torch.float32, torch.bfloat16, 4),
        (torch.float32, torch.float64, 2), (torch.float64, torch.float16, 2),
    ]
    for state, field, vec in cases:
        for step in ("euler", "stage"):
            acc = torch.randn(4, 64, dtype=torch.promote_types(state, field))
            info = _launch(step, x.to(state), torch.randn(4, 64).to(field),
                           acc=acc if step == "stage" else None)
            assert info["kernel"] == step and info["contiguous"] and info["vectorized"], info
            assert info["vec"] == vec and info["index32"], (state, field, info)


def test_scalar_path_when_anything_breaks_a_vector(emulated):
    x, v = torch.randn(4, 64), torch.randn(4, 64)
    for what, kwargs in [
        ("misaligned state", dict(x=_misaligned((4, 64)))),
        ("misaligned field", dict(v=_misaligned((4, 64)))),
        ("misaligned output", dict(out=_misaligned((4, 64)))),
        ("misaligned unconditional field", dict(vu=_misaligned((4, 64)), doubled=True)),
        ("doubled half off a vector boundary", dict(x=torch.randn(3, 2), v=torch.randn(3, 2),
                                                    vu=torch.randn(3, 2), doubled=True)),
        ("trajectory rows of 6 elements", dict(x=torch.randn(4, 6), v=torch.randn(4, 6),
                                               traj=torch.zeros(4, 3, 6)[:, 1])),
    ]:
        args = dict(x=x, v=v)
        args.update(kwargs)
        info = _launch("euler", args.pop("x"), args.pop("v"), **args)
        assert info["contiguous"] and not info["vectorized"], (what, info)
    info = _launch("stage", x, v, acc=_misaligned((4, 64)))
    assert info["kernel"] == "stage" and not info["vectorized"], "misaligned accumulator"
    info = _launch("euler", x, torch.randn(64, 4).t())  # a transposed field: indexed loads
    assert not info["contiguous"] and not info["vectorized"]
    info = _launch("euler", x, torch.randn(1, 64).expand(4, 64))  # broadcast over the batch
    assert not info["contiguous"]


def test_grid_stride_loops_wrap_on_the_emulated_grid(emulated):
    """The emulated grid holds 8 blocks of 256 threads: 20485 float32 elements are 5121 vectors
    (plus a 1-element tail), so every thread runs 2-3 loop iterations."""
    info = _launch("euler", torch.randn(5, 4097), torch.randn(5, 4097))
    assert info["vectorized"] and info["blocks"] == 8
    info = _launch("euler", torch.randn(3, 5), torch.randn(3, 5))
    assert info["blocks"] == 1


def _sparse(path, numel, dtype):
    """A CPU tensor of ``numel`` elements mapped from a sparse file: pages exist only where
    written, so a few elements 2^31 apart cost a few pages of memory and disk, whatever the
    machine's RAM."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


def test_offsets_past_2_to_the_31_use_64_bits(emulated, tmp_path):
    """A few field elements 2^31 elements apart, and a trajectory slot whose rows are 2^31
    elements apart: offsets computed in 32 bits would wrap."""
    big = 2**31
    store = _sparse(tmp_path / "field", big + 64, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for sizes, strides in (((2, 8), (big, 1)), ((2, 3, 4), (0, big // 2, 1))):
        v = store.as_strided(sizes, strides)
        distinct = v[0] if strides[0] == 0 else v  # one batch row when broadcast over it
        distinct.copy_(torch.randn(distinct.shape, generator=gen))  # writes only those elements
        x = torch.randn(sizes, generator=gen)
        info = _launch("euler", x, v)
        assert not info["contiguous"] and info["index32"], info
        info = _launch("stage", x, v, acc=torch.randn(sizes, generator=gen))
        assert info["kernel"] == "stage" and not info["contiguous"]
    traj = _sparse(tmp_path / "states", big + 64, torch.float32).as_strided((2, 8), (big, 1))
    x, v = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)
    grid = TimeGrid(torch.tensor([0.0, 0.3, 1.0]), 2, 2)
    traj.fill_(float("nan"))
    cuda_euler.euler_step(x, v, grid, 1, None, traj)
    assert torch.equal(traj, reference.euler_step(x, v, grid, 1))


def test_more_field_dims_than_the_binding_holds(emulated):
    """A field with 9 dims that do not coalesce: Python makes it contiguous first (one launch,
    contiguous path); the binding itself rejects such dims with a clear error (above)."""
    shape = (2,) * 9
    assert len(shape) > emulated.MAX_DIMS
    v = torch.randn(tuple(reversed(shape))).permute(*reversed(range(9)))  # every stride reversed
    assert len(emulated.coalesce(list(v.shape), list(v.stride()))[0]) == 9
    before = emulated.host_launches()["euler"]
    info = _launch("euler", torch.randn(shape), v)
    assert info["euler"] == before + 1 and info["contiguous"]
    info = _launch("stage", torch.randn(shape), v, vu=v + 1, doubled=True)
    assert info["kernel"] == "stage" and info["contiguous"]


def test_a_one_ulp_error_in_the_kernels_fails_the_parity_checks(emulated, monkeypatch):
    """The mutation check: the host emulation's results moved one ulp up must fail the parity
    suite's comparison (sampling against the SPEC's loop) and the kernel-level comparison."""
    monkeypatch.setenv("FLOWMATCH_FAST_BACKEND", "cuda")
    args = ((64, 2), 6, 3, "contiguous", torch.bfloat16, torch.device("cpu"), 1, True)
    assert_bitwise(*sample_both(*args), "exact")
    emulated.set_host_result_skew(1)
    with pytest.raises(pytest.fail.Exception, match="not bitwise equal"):
        assert_bitwise(*sample_both(*args), "one ulp up")
    for step in ("euler", "stage"):
        with pytest.raises(AssertionError):
            _launch(step, torch.randn(3, 5), torch.randn(3, 5))


# -------------------------------------------------------------- the device and stream of a launch
def test_launch_goes_to_the_current_stream_of_the_tensors_device(monkeypatch):
    """The stream handle is that of the tensors' device (x.get_device()), not the current
    device's; the binding makes that device current around the launch (csrc/binding.cpp)."""
    asked = []
    monkeypatch.setattr(cuda_euler, "_raw_stream", lambda index: asked.append(index) or 4242)

    class OnDevice(torch.Tensor):  # a CPU tensor that reports a CUDA device index
        def get_device(self):
            return self.index

    for index in (1, 3):
        x = torch.zeros(1).as_subclass(OnDevice)
        x.index = index
        assert cuda_euler._target(x) == (index, 4242)
    assert asked == [1, 3]
    monkeypatch.delenv(cuda_euler.EMULATE_ENV, raising=False)
    with pytest.raises(RuntimeError, match="CUDA tensors; got x on cpu"):
        cuda_euler._target(torch.zeros(1))
    with pytest.raises(RuntimeError, match="CUDA tensors; got x on meta"):
        cuda_euler._target(torch.zeros(1, device="meta"))
    monkeypatch.setenv(cuda_euler.EMULATE_ENV, "1")
    assert cuda_euler._target(torch.zeros(1)) == (-1, 0) and asked == [1, 3]  # the host
    with pytest.raises(RuntimeError, match="got x on meta"):
        cuda_euler._target(torch.zeros(1, device="meta"))


@pytest.mark.gpu(devices=2)
@pytest.mark.parametrize("step", ["euler", "stage"])
def test_launch_on_device_1_while_device_0_is_current(step):
    """Tensors on cuda:1, cuda:0 current, cuda:1's current stream capturing a graph: the launch
    must land in that capture (right device, right stream), so a replay recomputes it."""
    dev = torch.device("cuda", 1)
    x = torch.randn(4, 33, device=dev)
    v = torch.randn(4, 33, device=dev, dtype=torch.bfloat16)
    grid = TimeGrid(torch.tensor([0.0, 0.25, 1.0], device=dev), 4, 2)
    out = torch.empty_like(x)

    def run():
        with torch.cuda.device(0):
            if step == "euler":
                cuda_euler.euler_step(x, v, grid, 0, out)
            else:
                cuda_euler.stage_step(x, v, grid, 0, Stage("start", 0.5), None, out)

    with torch.cuda.device(1):
        graph, _ = capture_callable(run, dev, warmup=1)
        grid.values.copy_(torch.tensor([0.0, 0.5, 1.0], device=dev))
        graph.replay()
        torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0
    want = (reference.euler_step(x, v, grid, 0) if step == "euler" else
            reference.stage_step(x, v, grid, 0, Stage("start", 0.5))[0])
    assert torch.equal(out, want)
