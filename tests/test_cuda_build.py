"""The compiled CUDA backend (flowmatch_fast._cuda_euler): build, binary contents, errors, parity.

CPU-runnable: the extension is built wherever nvcc is (fail, not skip, when it is missing: CI
builds it in its normal install step), its binary holds sm_90 machine code of both kernels (the
Euler update and the Runge-Kutta stage) without fused multiply-adds, its host-side indexing and
argument checks are right, without a GPU every entry point says what is wrong, and
``torch.compile(fullgraph=True)`` traces a cuda-backend ``sample`` into the custom ops (on meta
tensors). On a CUDA machine (``-m gpu``): bitwise parity with the reference over dtypes, sizes,
layouts, guidance, trajectory and doubled outputs, misaligned pointers, streams and graphs, for
the Euler update and for every stage of every Runge-Kutta method; compiled sampling equals eager.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import zlib

import pytest
import torch

from flowmatch_fast import FlowMatching
from flowmatch_fast.integrators import METHODS
from flowmatch_fast.kernels import cuda_euler, reference
from flowmatch_fast.kernels.reference import TimeGrid, result_dtype, stage_dtype

EXT = "flowmatch_fast._cuda_euler"
SKIP_BUILD = os.environ.get("FLOWMATCH_FAST_SKIP_CUDA_BUILD", "").strip().lower() in (
    "1", "true", "yes", "on")
ARCHS_OVERRIDDEN = bool(os.environ.get("FLOWMATCH_FAST_CUDA_ARCHS", "").strip())
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ext_or_skip():
    try:
        return importlib.import_module(EXT)
    except ImportError as exc:
        pytest.skip(f"{EXT} is not built ({exc})")


def _so_path():
    return _ext_or_skip().__file__


def _cuobjdump():
    """cuobjdump on PATH, else the one the triton wheel ships, else the CUDA toolkit's."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = []
    spec = importlib.util.find_spec("triton")  # locate only: importing triton is not needed
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin",
                                       "cuobjdump"))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.skip("no cuobjdump (PATH, the triton wheel, $CUDA_HOME/bin)")


def _dump(*args):
    tool = _cuobjdump()
    res = subprocess.run([tool, *args, _so_path()], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


# ------------------------------------------------------------------------------- the build
@pytest.mark.skipif(shutil.which("nvcc") is None or SKIP_BUILD,
                    reason="no nvcc on PATH, or FLOWMATCH_FAST_SKIP_CUDA_BUILD=1")
def test_extension_is_built_when_nvcc_is_on_path():
    try:
        ext = importlib.import_module(EXT)
    except ImportError as exc:
        pytest.fail(f"nvcc is on PATH but {EXT} does not import ({exc}); the install step must "
                    "build it: pip install --no-build-isolation -e .")
    assert ext.MAX_DIMS >= 6
    assert callable(ext.euler_step) and callable(ext.stage_step)
    assert set(ext.dtype_codes()) == {"float16", "bfloat16", "float32", "float64"}
    assert "CUDA runtime" in ext.build_info()
    if not ARCHS_OVERRIDDEN:
        assert ext.compiled_archs() == ["sm_80", "sm_90", "compute_90"]
    assert cuda_euler.unavailable_reason(torch.device("cpu")) is not None  # imports fine


def test_binary_holds_sm90_machine_code_and_ptx():
    archs = _ext_or_skip().compiled_archs()
    elf = _dump("--list-elf")
    for target in (a for a in archs if a.startswith("sm_")):
        assert re.search(rf"\.{target}\.cubin", elf), (target, elf)
    ptx = _dump("--list-ptx")
    for target in (a for a in archs if a.startswith("compute_")):
        assert re.search(rf"\.sm_{target[len('compute_'):]}\.ptx", ptx), (target, ptx)
    if not ARCHS_OVERRIDDEN:
        assert ".sm_90.cubin" in elf and ".sm_90.ptx" in ptx
    # Every variant of both kernels is in the sm_90 image: 2 state x 4 field dtypes x 16 flags
    # for the Euler update; 2 x 4 x (contiguous, guided) for the stage (its other flags are
    # run-time, see csrc/stage_kernel.cu).
    if "sm_90" in archs:
        usage = _dump("--dump-resource-usage", "-arch", "sm_90")
        for kernel, count in (("12euler_kernel", 2 * 4 * 16), ("12stage_kernel", 2 * 4 * 4)):
            found = re.findall(rf"Function (_ZN3fmf{kernel}\w+):\s+REG:(\d+) STACK:(\d+) "
                               r"SHARED:\d+ LOCAL:(\d+)", usage)
            assert len({name for name, *_ in found}) == count, (kernel, len(found))
            for name, regs, stack, local in found:  # no spills, no local arrays
                assert stack == "0" and local == "0", (name, regs, stack, local)


def _sass_functions(sass):
    """{mangled name: SASS text} of a cuobjdump -sass listing."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


def test_sm90_sass_has_no_fused_multiply_add_and_uses_128_bit_accesses():
    if "sm_90" not in _ext_or_skip().compiled_archs():
        pytest.skip("built without sm_90")
    funcs = _sass_functions(_dump("-sass", "-arch", "sm_90"))
    kernels = {k: v for k, v in funcs.items() if "euler_kernel" in k or "stage_kernel" in k}
    assert len([k for k in kernels if "euler_kernel" in k]) == 128
    assert len([k for k in kernels if "stage_kernel" in k]) == 32
    for name, text in kernels.items():
        # FFMA/DFMA would fuse dt * v + x (one rounding instead of two). HFMA2.MMA with zero
        # operands (-RZ, RZ) is only ptxas's idiom for loading a constant into a register.
        assert not re.search(r"\b[FD]FMA\b", text), name
        for line in re.findall(r"HFMA2[^;]*;", text):
            assert re.search(r"-RZ, RZ", line), (name, line)
    # f32 state, f32 contiguous field, no flags: 128-bit loads and stores, FMUL then FADD; the
    # same for the stage kernel (f32, contiguous, not guided), and f64 math in its f64 variant.
    f32 = kernels["_ZN3fmf12euler_kernelILi2ELi2ELb1ELb0ELb0ELb0EEEvNS_6ParamsIXT_EXT0_EEE"]
    stage_f32 = kernels["_ZN3fmf12stage_kernelILi2ELi2ELb1ELb0EEEvNS_11StageParamsIXT_EXT0_EEE"]
    for text in (f32, stage_f32):
        assert re.search(r"LDG\.E\.128", text) and re.search(r"STG\.E\.128", text)
        assert "FMUL" in text and "FADD" in text
    stage_f64 = kernels["_ZN3fmf12stage_kernelILi3ELi3ELb1ELb0EEEvNS_11StageParamsIXT_EXT0_EEE"]
    assert "DMUL" in stage_f64 and "DADD" in stage_f64


def test_ptx_has_no_fused_multiply_add_and_rounds_every_op():
    """The embedded PTX is what the driver JIT-compiles for GPUs newer than the SASS targets: no
    fma, and every float add/sub/mul carries .rn (an explicit rounding, which ptxas never
    contracts), in both kernels."""
    archs = _ext_or_skip().compiled_archs()
    if not any(a.startswith("compute_") for a in archs):
        pytest.skip("built without PTX")
    ptx = _dump("-ptx")
    for kernel in ("euler_kernel", "stage_kernel"):
        assert re.search(rf"\.entry _ZN3fmf\d+{kernel}", ptx), kernel
    assert not re.search(r"^\s*fma\.", ptx, re.MULTILINE)
    ops = re.findall(r"^\s*(?:@%p\d+ )?((?:add|sub|mul)\S*\.f(?:32|64))\s", ptx, re.MULTILINE)
    assert ops and all(".rn." in op for op in ops), sorted(set(ops))


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
    ext = _ext_or_skip()
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
    ext = _ext_or_skip()
    assert ext.coalesce([4, 1, 3, 5], [15, 99, 5, 1]) == ([60], [1])  # contiguous: one dim
    assert ext.coalesce([4, 3, 5], [0, 5, 1]) == ([4, 15], [0, 1])  # [1, *dims] broadcast
    assert ext.coalesce([2, 3, 5], [0, 0, 1]) == ([6, 5], [0, 1])
    assert ext.coalesce([3, 4], [1, 3]) == ([3, 4], [1, 3])  # transposed: nothing merges
    assert ext.coalesce([1, 1], [7, 9]) == ([], [])


def test_runs_on_rules():
    assert cuda_euler._runs_on("sm_90", 90)
    assert not cuda_euler._runs_on("sm_90", 100)
    assert cuda_euler._runs_on("sm_80", 86) and not cuda_euler._runs_on("sm_86", 80)
    assert cuda_euler._runs_on("compute_90", 120) and not cuda_euler._runs_on("compute_90", 89)
    assert cuda_euler._runs_on("sm_90a", 90) and not cuda_euler._runs_on("sm_90a", 100)


def test_stage_binding_checks_its_arguments_before_any_cuda_call():
    """Validation happens on the host, before the launch: these raise without a GPU."""
    ext = _ext_or_skip()
    codes = ext.dtype_codes()
    f32, bf16 = codes["float32"], codes["bfloat16"]

    def call(**over):
        args = dict(x=16, state_code=f32, k=32, k_uncond=0, field_code=bf16, acc=0, out=48,
                    acc_out=0, doubled=False, traj=0, traj_row=0, traj_stride=0, sizes=[2, 3],
                    field_strides=[3, 1], grid=64, step=0, coef=0.5, acc_w2=False,
                    from_acc=False, guidance_weight=1.0, device=0, stream=0)
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
    with pytest.raises(ValueError, match="dims after coalescing"):
        call(sizes=[2] * 9, field_strides=[4 ** (8 - d) for d in range(9)])  # nothing merges
    assert call(sizes=[0, 3], field_strides=[3, 1]) is None  # nothing to write: no launch


def test_custom_ops_are_registered_with_their_mutations():
    """torch.compile records the launches as these ops; they write only their output buffers."""
    assert cuda_euler._OPS_REGISTERED
    euler = str(torch.ops.flowmatch_fast.cuda_euler_step.default._schema)
    stage = str(torch.ops.flowmatch_fast.cuda_stage_step.default._schema)

    def mutated(schema):  # the arguments annotated Tensor(a!) or Tensor(a!)?
        return set(re.findall(r"Tensor\(\w+!\)\?? (\w+)", schema))

    assert mutated(euler) == {"out", "traj"}, euler
    assert mutated(stage) == {"out", "acc_out", "traj"}, stage
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
    monkeypatch.setattr(cuda_euler, "unavailable_reason", lambda device: None)
    steps = 3
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)

        def stop(*args):
            raise _Traced

        return stop

    def field(*, x, t):
        return torch.sin(1.7 * x) - 0.5 * x * t + t

    fm = FlowMatching(x_dims=(64, 2), backend="cuda", num_inference_steps=steps)

    def run():
        return fm.sample(6, field, device="meta", int_method=method, **kwargs)

    torch._dynamo.reset()
    with pytest.raises(_Traced):
        torch.compile(run, fullgraph=True, backend=record)()
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    op = "flowmatch_fast.cuda_euler_step" if method == "euler" else "flowmatch_fast.cuda_stage_step"
    assert targets.count(op) == steps * len(METHODS[method]), targets
    other = "flowmatch_fast.cuda_stage_step" if method == "euler" else "flowmatch_fast.cuda_euler_step"
    assert other not in targets


def test_without_the_ops_compile_traces_the_reference(monkeypatch):
    """A torch that rejected the registration: compiled code falls back to the reference ops."""
    monkeypatch.setattr(cuda_euler, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(cuda_euler, "_OPS_REGISTERED", False)
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

    monkeypatch.setattr(cuda_euler, "_runtime_checked", False)
    monkeypatch.setattr(cuda_euler, "_runtime_error", None)
    monkeypatch.setattr(cuda_euler, "_arch_reasons", {})
    expected = backends.unavailable_reason("cuda", torch.device("cuda"))
    monkeypatch.setattr(cuda_euler, "_runtime_checked", False)
    monkeypatch.setattr(cuda_euler, "_runtime_error", None)
    monkeypatch.setattr(cuda_euler, "_arch_reasons", {})

    def probe(x):
        reason = backends.unavailable_reason("cuda", torch.device("cuda"))
        return x + (0.0 if reason is None else 1.0)

    torch._dynamo.reset()
    got = torch.compile(probe, fullgraph=True, backend="eager")(torch.zeros(1))
    assert got.item() == (0.0 if expected is None else 1.0)


def test_stage_step_rejects_other_acc_weights():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="acc_weight must be 1 or 2"):
        cuda_euler.stage_step(x, x, TimeGrid(torch.linspace(0, 1, 3), 2, 2), 0, 0.5, x,
                              acc_weight=3.0)


# ----------------------------------------------------------------------- without a GPU
def test_cuda_backend_on_cpu_says_what_is_wrong():
    reason = cuda_euler.unavailable_reason(torch.device("cpu"))
    assert "CUDA tensors" in reason and "cpu" in reason
    fm = FlowMatching(x_dims=4, backend="cuda")
    with pytest.raises(RuntimeError, match="cuda.*not available on cpu.*CUDA tensors"):
        fm.sample(2, lambda *, x, t: x)


def test_unbuilt_extension_reason_names_the_fix(monkeypatch):
    monkeypatch.setattr(cuda_euler, "_ext", None)
    monkeypatch.setattr(cuda_euler, "_import_error", ImportError("No module named 'x'"))
    reason = cuda_euler.unavailable_reason(torch.device("cuda"))
    assert EXT in reason and "not built" in reason and "pip install" in reason
    grid = TimeGrid(torch.linspace(0, 1, 3), 2, 2)
    with pytest.raises(RuntimeError, match="not built"):
        cuda_euler.euler_step(torch.zeros(2, 3), torch.zeros(2, 3), grid, 0)
    with pytest.raises(RuntimeError, match="not built"):
        cuda_euler.stage_step(torch.zeros(2, 3), torch.zeros(2, 3), grid, 0, 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without GPU")
def test_without_gpu_the_extension_raises_clear_errors(monkeypatch):
    ext = _ext_or_skip()
    try:
        count = ext.device_count()
    except RuntimeError as exc:
        assert re.search(r"cuda\w*Error\w*: ", str(exc)), exc  # CUDA's error name and message
    else:
        assert count == 0
    monkeypatch.setattr(cuda_euler, "_runtime_checked", False)
    monkeypatch.setattr(cuda_euler, "_runtime_error", None)
    reason = cuda_euler.unavailable_reason(torch.device("cuda"))
    assert reason is not None and ("cudaGetDeviceCount" in reason or "no GPU" in reason)
    x = torch.zeros(2, 3)
    grid = TimeGrid(torch.linspace(0, 1, 3), 2, 2)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_euler.euler_step(x, x, grid, 0)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_euler.stage_step(x, x, grid, 0, 0.5, x, 2.0, True)


# -------------------------------------------------------------------------- GPU parity
FIELD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)
SENTINEL = 1234.5


def _grid(steps, batch, ndim, device, seed=0):
    """A non-uniform grid, so that dt is an arbitrary float32 (not a power of two)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(steps + 1, generator=g).sort().values.to(device)
    return TimeGrid(values, batch, ndim)


def _make_field(layout, shape, dtype, device, gen):
    data = torch.randn(shape, generator=gen).mul_(3)
    if layout == "contiguous":
        return data.to(device, dtype)
    if layout == "transposed":
        return data.to(device, dtype).transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "step":  # every third element of a wider buffer
        wide = torch.zeros(*shape[:-1], 3 * shape[-1], dtype=dtype, device=device)
        return wide[..., ::3].copy_(data)
    if layout == "batch1":  # [1, *dims], broadcast by euler_step itself
        return data[:1].to(device, dtype)
    if layout == "expanded":  # already expanded: batch stride 0
        return data[:1].to(device, dtype).expand(shape)
    if layout == "misaligned":  # one element past an aligned start
        flat = torch.zeros(data.numel() + 1, dtype=dtype, device=device)
        return flat[1:].view(shape).copy_(data)
    raise ValueError(layout)


def _both(x, v, grid, i, *, traj=False, doubled=False, vu=None, w=1.0, misaligned_out=False,
          out_none=False):
    """Run the reference and the CUDA kernel on identical fresh buffers; return both results."""
    dtype = result_dtype(x.dtype, v)
    rows = x.shape[0]
    results = []
    for step in (reference.euler_step, cuda_euler.euler_step):
        shape = (2 * rows if doubled else rows, *x.shape[1:])
        if out_none:
            out = None
        elif misaligned_out:
            numel = torch.Size(shape).numel()
            out = torch.full((numel + 1,), SENTINEL, dtype=dtype, device=x.device)[1:].view(shape)
        else:
            out = torch.full(shape, SENTINEL, dtype=dtype, device=x.device)
        states = None
        if traj:
            states = torch.full((rows, grid.steps + 1, *x.shape[1:]), SENTINEL, dtype=dtype,
                                device=x.device)
        res = step(x, v, grid, i, out, states[:, i + 1] if traj else None, vu, w)
        results.append((res, states))
    torch.cuda.synchronize()
    return results


def _assert_same(results, what):
    (ref, ref_states), (got, got_states) = results
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    assert torch.equal(got, ref), f"{what}: max diff {(got.double() - ref.double()).abs().max()}"
    if ref_states is not None:
        assert torch.equal(got_states, ref_states), f"{what}: trajectory differs"


@pytest.fixture
def cuda():
    reason = cuda_euler.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the cuda backend is not available: {reason}")
    return torch.device("cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("numel", [1, 3, 127, 1000003])
def test_parity_dtypes_and_odd_sizes(cuda, numel):
    gen = torch.Generator().manual_seed(numel)
    for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
        for shape in ((1, numel), (numel, 1)) if numel < 1000 else ((1, numel),):
            x = torch.randn(shape, generator=gen).to(cuda, state)
            v = _make_field("contiguous", shape, field, cuda, gen)
            grid = _grid(5, shape[0], 2, cuda, seed=numel)
            for i in (0, 3):
                _assert_same(_both(x, v, grid, i), (state, field, shape, i))
            _assert_same(_both(x, v, grid, 2, out_none=True), (state, field, shape, "out=None"))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "step", "batch1", "expanded",
                                    "misaligned"])
@pytest.mark.parametrize("shape", [(6, 64, 2), (3, 5, 7), (2, 3, 4, 5, 6), (4, 1025)],
                         ids=lambda s: "x".join(map(str, s)))
def test_parity_layouts_guidance_traj_doubled(cuda, layout, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, shape)).encode()))
    grid = _grid(7, shape[0], len(shape), cuda, seed=len(shape))
    for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
        x = torch.randn(shape, generator=gen).to(cuda, state)
        v = _make_field(layout, shape, field, cuda, gen)
        vu = _make_field(layout, shape, field, cuda, gen)
        for traj, guided in itertools.product((False, True), (False, True)):
            what = (layout, shape, state, field, traj, guided)
            kwargs = dict(vu=vu, w=2.5, doubled=True) if guided else {}
            _assert_same(_both(x, v, grid, 4, traj=traj, **kwargs), what)


@pytest.mark.gpu
@needs_gpu
def test_parity_misaligned_state_and_output(cuda):
    gen = torch.Generator().manual_seed(7)
    shape = (3, 130)
    grid = _grid(4, shape[0], 2, cuda)
    for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
        flat = torch.randn(torch.Size(shape).numel() + 1, generator=gen).to(cuda, state)
        x = flat[1:].view(shape)  # contiguous but not 16-byte aligned
        v = _make_field("contiguous", shape, field, cuda, gen)
        _assert_same(_both(x, v, grid, 1), (state, field, "x"))
        _assert_same(_both(x, v, grid, 1, misaligned_out=True), (state, field, "out"))
        vu = _make_field("misaligned", shape, field, cuda, gen)
        _assert_same(_both(x, v, grid, 2, vu=vu, w=-0.75, doubled=True, traj=True),
                     (state, field, "vu"))


@pytest.mark.gpu
@needs_gpu
def test_parity_rows_that_break_vectors(cuda):
    """Trajectory rows and doubled halves that do not start on a vector boundary."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((5, 3), (3, 1, 3), (7, 2), (2, 6)):
        grid = _grid(3, shape[0], len(shape), cuda)
        for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
            x = torch.randn(shape, generator=gen).to(cuda, state)
            v = _make_field("contiguous", shape, field, cuda, gen)
            vu = _make_field("contiguous", shape, field, cuda, gen)
            _assert_same(_both(x, v, grid, 1, traj=True, vu=vu, w=2.5, doubled=True),
                         (shape, state, field))


@pytest.mark.gpu
@needs_gpu
def test_side_stream_and_other_device(cuda):
    gen = torch.Generator().manual_seed(11)
    shape = (4, 1000)
    x = torch.randn(shape, generator=gen).to(cuda)
    v = _make_field("transposed", shape, torch.bfloat16, cuda, gen)
    grid = _grid(3, 4, 2, cuda)
    expected = reference.euler_step(x, v, grid, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_euler.euler_step(x, v, grid, 1)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)
    if torch.cuda.device_count() > 1:  # x on cuda:1 while cuda:0 is current
        dev1 = torch.device("cuda", 1)
        x1, v1 = x.to(dev1), v.to(dev1)
        grid1 = TimeGrid(grid.values.to(dev1), 4, 2)
        got1 = cuda_euler.euler_step(x1, v1, grid1, 1)
        assert torch.cuda.current_device() == 0
        assert torch.equal(got1.cpu(), expected.cpu())


@pytest.mark.gpu
@needs_gpu
def test_graph_capture_reads_dt_on_the_device(cuda):
    gen = torch.Generator().manual_seed(5)
    shape = (6, 64, 2)
    x = torch.randn(shape, generator=gen).to(cuda)
    v = _make_field("batch1", shape, torch.float16, cuda, gen)
    grid = _grid(4, 6, 3, cuda)
    out = torch.empty(shape, device=cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (loads the kernel) outside the capture
        cuda_euler.euler_step(x, v, grid, 2, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_euler.euler_step(x, v, grid, 2, out)
    for seed in (1, 2):
        grid.values.copy_(_grid(4, 6, 3, cuda, seed=seed).values)  # new dt, same buffer
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, reference.euler_step(x, v, TimeGrid(grid.values, 6, 3), 2))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("return_all_steps", [False, True])
def test_sample_matches_torch_backend(cuda, return_all_steps):
    def field(*, x, t):
        return (torch.sin(1.7 * x) - 0.5 * x * t + t).to(torch.bfloat16)

    results = []
    for backend in ("torch", "cuda"):
        torch.manual_seed(0)
        fm = FlowMatching(x_dims=[64, 2], backend=backend, num_inference_steps=10)
        results.append(fm.sample(6, field, device=cuda, return_all_steps=return_all_steps))
    if return_all_steps:
        assert all(torch.equal(a, b) for a, b in zip(*results))
    else:
        assert torch.equal(*results)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_guided_sample_matches_torch_backend(cuda, method):
    """Guidance (doubled batch, out with 2B rows, w = 2.5) and a multi-stage method."""
    def field(*, x, t):
        return torch.cos(x) * t + x[..., :1]  # [2B, 64, 2]; both halves see the same x

    results = []
    for backend in ("torch", "cuda"):
        fm = FlowMatching(x_dims=[64, 2], backend=backend, num_inference_steps=6)
        gen = torch.Generator(cuda).manual_seed(3)
        results.append(fm.sample(5, field, device=cuda, int_method=method, guidance=True,
                                 guidance_weight=2.5, generator=gen, return_all_steps=True))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.gpu
@needs_gpu
def test_parity_past_2_to_the_31_elements(cuda):
    """The 64-bit index path (n > INT32_MAX): batch-broadcast field and trajectory rows."""
    if torch.cuda.get_device_properties(cuda).total_memory < 80 * 2**30:
        pytest.skip("needs 80 GiB of GPU memory")
    rows, cols = 3, 2**31 // 3 + 77  # n = 2^31 + 229
    x = torch.empty(rows, cols, device=cuda).normal_()
    v = torch.randn(1, cols, device=cuda, dtype=torch.bfloat16)
    grid = _grid(2, rows, 2, cuda)
    expected = reference.euler_step(x, v, grid, 1)
    got = cuda_euler.euler_step(x, v, grid, 1)
    assert torch.equal(got, expected)
    del got
    traj_buf = torch.empty(rows, 2, cols, device=cuda)  # slot i+1 of a 2-slot trajectory
    cuda_euler.euler_step(x, v, grid, 0, traj=traj_buf[:, 1])
    assert torch.equal(traj_buf[:, 1], reference.euler_step(x, v, grid, 0))


# ------------------------------------------------------------- GPU parity: Runge-Kutta stages
# Every distinct stage of the multi-stage methods (midpoint, heun, rk4), and the last stages,
# which write the trajectory slot in integrators.integrate.
STAGES = sorted({st for name, sts in METHODS.items() if name != "euler" for st in sts})
LAST_STAGES = {sts[-1] for name, sts in METHODS.items() if name != "euler"}
STAGE_LAYOUTS = ("contiguous", "transposed", "batch1", "expanded", "step")


def _nan_buffer(shape, dtype, device, misaligned=False):
    """A NaN-poisoned buffer: an element the kernel forgets to write fails torch.equal."""
    if not misaligned:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    numel = torch.Size(shape).numel()
    return torch.full((numel + 1,), float("nan"), dtype=dtype, device=device)[1:].view(shape)


def _stage_both(x, k, grid, i, st, *, acc=None, ku=None, w=1.0, doubled=False, traj=False,
                out_none=False, misaligned_out=False):
    """reference.stage_step and cuda_euler.stage_step on identical fresh (poisoned) buffers."""
    c = stage_dtype(x.dtype, k, acc)
    rows = x.shape[0]
    inputs = [t.clone() for t in (x, k, acc, ku) if t is not None]
    results = []
    for step in (reference.stage_step, cuda_euler.stage_step):
        out = None
        if not out_none:
            out = _nan_buffer(((2 if doubled else 1) * rows, *x.shape[1:]), c, x.device,
                              misaligned_out)
        states = None
        if traj:
            states = _nan_buffer((rows, grid.steps + 1, *x.shape[1:]), c, x.device)
        new, acc_out = step(x, k, grid, i, st.coef, acc, st.acc_weight, st.write_acc,
                            st.from_acc, out, states[:, i + 1] if traj else None, ku, w)
        results.append((new, acc_out, states))
    torch.cuda.synchronize()
    after = [t for t in (x, k, acc, ku) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after)), "an input was written"
    return results


def _assert_same_stage(results, i, what):
    (r_new, r_acc, r_states), (b_new, b_acc, b_states) = results
    assert b_new.dtype == r_new.dtype and b_new.shape == r_new.shape, what
    assert b_new.is_contiguous(), what
    assert torch.equal(b_new, r_new), (
        f"{what}: max diff {(b_new.double() - r_new.double()).abs().nan_to_num(float('inf')).max()}")
    assert (r_acc is None) == (b_acc is None), what
    if r_acc is not None:
        assert b_acc.dtype == r_acc.dtype and b_acc.is_contiguous(), what
        assert torch.equal(b_acc, r_acc), f"{what}: accumulator differs"
    if r_states is not None:
        assert not b_states[:, i + 1].isnan().any(), f"{what}: trajectory slot not fully written"
        assert torch.equal(b_states.nan_to_num(7.0), r_states.nan_to_num(7.0)), (
            f"{what}: trajectory differs (or written outside its slot)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout", STAGE_LAYOUTS)
def test_stage_parity_programs_dtypes_guidance_layouts(cuda, layout):
    """Every stage of every method x state x field dtype x guided (doubled out) x layout; the
    last stages also write the trajectory slot. The accumulator comes in C, as from the
    previous stage, or in the state's dtype (widened by stage_step) on alternate cases."""
    shape = (6, 64, 2)
    gen = torch.Generator().manual_seed(zlib.crc32(layout.encode()))
    grid = _grid(5, shape[0], len(shape), cuda, seed=3)
    for n, (st, state, field, guided) in enumerate(
        itertools.product(STAGES, STATE_DTYPES, FIELD_DTYPES, (False, True))
    ):
        x = torch.randn(shape, generator=gen).to(cuda, state)
        k = _make_field(layout, shape, field, cuda, gen)
        ku = _make_field(layout, shape, field, cuda, gen) if guided else None
        acc = None
        if st.uses_acc:
            acc_dtype = stage_dtype(state, k, None) if n % 2 else state
            acc = torch.randn(shape, generator=gen).to(cuda, acc_dtype)
        i = n % grid.steps
        what = (layout, st, state, field, guided, i)
        results = _stage_both(x, k, grid, i, st, acc=acc, ku=ku, w=2.5 if guided else 1.0,
                              doubled=guided, traj=st in LAST_STAGES)
        _assert_same_stage(results, i, what)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 3), (3, 1, 3), (2, 1025), (1, 1000003)],
                         ids=lambda s: "x".join(map(str, s)))
def test_stage_parity_odd_sizes_and_misaligned_buffers(cuda, shape):
    """Sizes that leave scalar tails, trajectory rows and doubled halves off vector boundaries,
    misaligned state / field / accumulator / output pointers, and out=None."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    grid = _grid(4, shape[0], len(shape), cuda, seed=len(shape))
    rk4 = METHODS["rk4"]
    for state, field in itertools.product(STATE_DTYPES, FIELD_DTYPES):
        c = stage_dtype(state, torch.empty(0, dtype=field), None)
        numel = torch.Size(shape).numel()
        x = torch.randn(numel + 1, generator=gen).to(cuda, state)[1:].view(shape)
        k = _make_field("misaligned", shape, field, cuda, gen)
        acc = torch.randn(numel + 1, generator=gen).to(cuda, c)[1:].view(shape)
        for j, st in enumerate(rk4):
            what = (shape, state, field, j)
            a = acc if st.uses_acc else None
            _assert_same_stage(_stage_both(x, k, grid, 1, st, acc=a), 1, what)
            _assert_same_stage(_stage_both(x, k, grid, 2, st, acc=a, misaligned_out=True,
                                           traj=True), 2, what + ("misaligned out",))
            _assert_same_stage(_stage_both(x, k, grid, 3, st, acc=a, out_none=True), 3,
                               what + ("out=None",))
            if numel < 1000:
                ku = _make_field("contiguous", shape, field, cuda, gen)
                _assert_same_stage(_stage_both(x, k, grid, 0, st, acc=a, ku=ku, w=-0.75,
                                               doubled=True, traj=True), 0, what + ("guided",))


@pytest.mark.gpu
@needs_gpu
def test_stage_fallbacks_give_the_same_bits(cuda):
    """What the kernel does not cover goes to the reference: an accumulator that alone makes C
    float64, a broadcast accumulator, fields of two dtypes, an out of another dtype."""
    gen = torch.Generator().manual_seed(9)
    shape = (4, 33)
    grid = _grid(3, shape[0], 2, cuda)
    st = METHODS["rk4"][1]  # has_acc, acc_w2, write_acc
    x = torch.randn(shape, generator=gen).to(cuda)
    k = torch.randn(shape, generator=gen).to(cuda, torch.bfloat16)
    acc64 = torch.randn(shape, generator=gen).to(cuda, torch.float64)
    _assert_same_stage(_stage_both(x, k, grid, 1, st, acc=acc64), 1, "float64 accumulator")
    acc_b = torch.randn(1, shape[1], generator=gen).to(cuda).expand(shape)
    _assert_same_stage(_stage_both(x, k, grid, 1, st, acc=acc_b), 1, "broadcast accumulator")
    ku = torch.randn(shape, generator=gen).to(cuda, torch.float16)
    _assert_same_stage(_stage_both(x, k, grid, 1, st, acc=acc_b.contiguous(), ku=ku, w=2.0,
                                   doubled=True), 1, "mixed field dtypes")
    out = torch.empty(shape, device=cuda, dtype=torch.float64)
    new, acc_out = cuda_euler.stage_step(x, k, grid, 1, st.coef, acc_b.contiguous(), 2.0, True,
                                         False, out)
    ref, ref_acc = reference.stage_step(x, k, grid, 1, st.coef, acc_b.contiguous(), 2.0, True,
                                        False, torch.empty_like(out))
    assert new is out and torch.equal(new, ref) and torch.equal(acc_out, ref_acc)


@pytest.mark.gpu
@needs_gpu
def test_stage_graph_capture_reads_dt_on_the_device(cuda):
    gen = torch.Generator().manual_seed(6)
    shape = (6, 64, 2)
    st = METHODS["heun"][1]  # from_acc, coef 0.5
    x = torch.randn(shape, generator=gen).to(cuda)
    k = _make_field("batch1", shape, torch.float16, cuda, gen)
    acc = torch.randn(shape, generator=gen).to(cuda)
    grid = _grid(4, 6, 3, cuda)
    out = torch.empty(shape, device=cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        cuda_euler.stage_step(x, k, grid, 2, st.coef, acc, 1.0, False, True, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_euler.stage_step(x, k, grid, 2, st.coef, acc, 1.0, False, True, out)
    for seed in (1, 2):
        grid.values.copy_(_grid(4, 6, 3, cuda, seed=seed).values)
        graph.replay()
        torch.cuda.synchronize()
        want, _ = reference.stage_step(x, k, TimeGrid(grid.values, 6, 3), 2, st.coef, acc, 1.0,
                                       False, True)
        assert torch.equal(out, want)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", ["midpoint", "heun", "rk4"])
def test_multistage_sample_matches_torch_backend(cuda, method):
    def field(*, x, t):
        return (torch.sin(1.7 * x) - 0.5 * x * t + t).to(torch.bfloat16)

    results = []
    for backend in ("torch", "cuda"):
        torch.manual_seed(0)
        fm = FlowMatching(x_dims=[64, 2], backend=backend, num_inference_steps=7)
        results.append(fm.sample(6, field, device=cuda, int_method=method, return_all_steps=True))
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ------------------------------------------------------------------- GPU: torch.compile
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method, kwargs", [
    ("euler", {}),
    ("rk4", {}),
    ("heun", dict(guidance=True, guidance_weight=2.5, return_all_steps=True,
                  inference_step=4)),
], ids=["euler", "rk4", "heun-guided-traj"])
def test_torch_compile_fullgraph_matches_eager(cuda, method, kwargs):
    """torch.compile(fullgraph=True, backend="eager") of cuda-backend sampling runs (the launches
    as the custom ops) and gives eager's bits under the same seed."""
    def field(*, x, t):
        return torch.sin(1.7 * x) - 0.5 * x * t + t

    fm = FlowMatching(x_dims=(64, 2), backend="cuda")

    def run():
        return fm.sample(6, field, device="cuda", int_method=method, **kwargs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = run()
    torch.manual_seed(0)
    compiled = torch.compile(run, fullgraph=True, backend="eager")()
    if isinstance(eager, tuple):
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    else:
        assert torch.equal(eager, compiled)
