"""The compiled CUDA backend (flowmatch_fast._cuda_euler): build, binary contents, errors, parity.

CPU-runnable: the extension is built wherever nvcc is (fail, not skip, when it is missing: CI
builds it in its normal install step), its binary holds sm_90 machine code without fused
multiply-adds, its host-side indexing is right, and without a GPU every entry point says what
is wrong. On a CUDA machine (``-m gpu``): bitwise parity with the reference over dtypes, sizes,
layouts, guidance, trajectory and doubled outputs, misaligned pointers, streams and graphs.
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
from flowmatch_fast.kernels import cuda_euler, reference
from flowmatch_fast.kernels.reference import TimeGrid, result_dtype

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
    # Every variant of the kernel is in the sm_90 image: 2 state x 4 field dtypes x 16 flags.
    if "sm_90" in archs:
        usage = _dump("--dump-resource-usage", "-arch", "sm_90")
        found = re.findall(r"Function (_ZN3fmf12euler_kernel\w+):\s+REG:(\d+) STACK:(\d+) "
                           r"SHARED:\d+ LOCAL:(\d+)", usage)
        assert len({name for name, *_ in found}) == 2 * 4 * 16, len(found)
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
    kernels = {k: v for k, v in funcs.items() if "euler_kernel" in k}
    assert len(kernels) == 128
    for name, text in kernels.items():
        # FFMA/DFMA would fuse dt * v + x (one rounding instead of two). HFMA2.MMA with zero
        # operands (-RZ, RZ) is only ptxas's idiom for loading a constant into a register.
        assert not re.search(r"\b[FD]FMA\b", text), name
        for line in re.findall(r"HFMA2[^;]*;", text):
            assert re.search(r"-RZ, RZ", line), (name, line)
    # f32 state, f32 contiguous field, no flags: 128-bit loads and stores, FMUL then FADD.
    f32 = kernels["_ZN3fmf12euler_kernelILi2ELi2ELb1ELb0ELb0ELb0EEEvNS_6ParamsIXT_EXT0_EEE"]
    assert re.search(r"LDG\.E\.128", f32) and re.search(r"STG\.E\.128", f32)
    assert "FMUL" in f32 and "FADD" in f32


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
    with pytest.raises(RuntimeError, match="not built"):
        cuda_euler.euler_step(torch.zeros(2, 3), torch.zeros(2, 3),
                              TimeGrid(torch.linspace(0, 1, 3), 2, 2), 0)


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
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_euler.euler_step(x, x, TimeGrid(torch.linspace(0, 1, 3), 2, 2), 0)


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
