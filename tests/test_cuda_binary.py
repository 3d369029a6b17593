"""The compiled CUDA extension as a binary: built wherever nvcc is, sm_90 machine code and PTX of
every kernel variant, no fused multiply-add in the SASS or the PTX, 128-bit accesses, and the
rules that say which embedded target runs on which GPU. CPU-only: nvcc and cuobjdump, no GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

from cuda_ext import EXT, ext_or_skip
from flowmatch_fast.kernels.cuda import launch as cuda_euler
from flowmatch_fast.kernels.cuda import loader as cuda_loader

SKIP_BUILD = os.environ.get("FLOWMATCH_FAST_SKIP_CUDA_BUILD", "").strip().lower() in (
    "1", "true", "yes", "on")
ARCHS_OVERRIDDEN = bool(os.environ.get("FLOWMATCH_FAST_CUDA_ARCHS", "").strip())


def _so_path():
    return ext_or_skip().__file__


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
def test_extension_is_built_when_nvcc_is_on_path(monkeypatch):
    try:
        ext = importlib.import_module(EXT)
    except ImportError as exc:
        pytest.fail(f"nvcc is on PATH but {EXT} does not import ({exc}); the install step must "
                    "build it: pip install --no-build-isolation -e .")
    assert ext.MAX_DIMS >= 6
    assert callable(ext.euler_step) and callable(ext.stage_step)
    assert set(ext.dtype_codes()) == {"float16", "bfloat16", "float32", "float64"}
    assert set(ext.velocity_modes()) == {"field", "cfg", "mix"}
    assert ext.HOST == -1  # what x.get_device() says of a CPU tensor (cuda_euler passes it on)
    assert "CUDA runtime" in ext.build_info()
    if not ARCHS_OVERRIDDEN:
        assert ext.compiled_archs() == ["sm_80", "sm_90", "compute_90"]
    monkeypatch.delenv(cuda_euler.EMULATE_ENV, raising=False)
    assert cuda_euler.unavailable_reason(torch.device("cpu")) is not None  # imports fine


def test_binary_holds_sm90_machine_code_and_ptx():
    archs = ext_or_skip().compiled_archs()
    elf = _dump("--list-elf")
    for target in (a for a in archs if a.startswith("sm_")):
        assert re.search(rf"\.{target}\.cubin", elf), (target, elf)
    ptx = _dump("--list-ptx")
    for target in (a for a in archs if a.startswith("compute_")):
        assert re.search(rf"\.sm_{target[len('compute_'):]}\.ptx", ptx), (target, ptx)
    if not ARCHS_OVERRIDDEN:
        assert ".sm_90.cubin" in elf and ".sm_90.ptx" in ptx
    # Every variant of the kernels is in the sm_90 image: 2 state x 4 field dtypes x 24 flags
    # (contiguous, 3 velocity modes, trajectory, doubled) for the Euler update; 2 x 4 x
    # (contiguous, 3 modes) for the stage (its other flags are run-time, see csrc/stage_kernel.cu);
    # 4 field dtypes x (contiguous, 3 modes) for the SDE step (float32 state only).
    if "sm_90" in archs:
        usage = _dump("--dump-resource-usage", "-arch", "sm_90")
        for kernel, count in (("EulerKernel", 2 * 4 * 24), ("StageKernel", 2 * 4 * 6),
                              ("SdeKernel", 4 * 6)):
            found = re.findall(rf"Function (_ZN3fmf12device_entryINS_\d+{kernel}\w+):\s+REG:(\d+) "
                               r"STACK:(\d+) "
                               r"SHARED:\d+ LOCAL:(\d+)", usage)
            assert len({name for name, *_ in found}) == count, (kernel, len(found))
            for name, regs, stack, local in found:  # no spills, no local arrays
                assert stack == "0" and local == "0", (name, regs, stack, local)


def _sass_functions(sass):
    """{mangled name: SASS text} of a cuobjdump -sass listing."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


def test_sm90_sass_has_no_fused_multiply_add_and_uses_128_bit_accesses():
    if "sm_90" not in ext_or_skip().compiled_archs():
        pytest.skip("built without sm_90")
    funcs = _sass_functions(_dump("-sass", "-arch", "sm_90"))
    kernels = {k: v for k, v in funcs.items() if "EulerKernel" in k or "StageKernel" in k}
    assert len([k for k in kernels if "EulerKernel" in k]) == 192
    assert len([k for k in kernels if "StageKernel" in k]) == 48
    # The SDE step's one division is div.rn.f32 (IEEE, checked in the PTX below), which ptxas
    # expands into FFMA-based Newton steps that are correctly rounded by construction: its
    # SASS holds FFMA for that reason alone, so the FFMA check covers the other two kernels.
    assert len([k for k in funcs if "SdeKernel" in k]) == 24
    for name, text in kernels.items():
        # FFMA/DFMA would fuse dt * v + x (one rounding instead of two). HFMA2.MMA with zero
        # operands (-RZ, RZ) is only ptxas's idiom for loading a constant into a register.
        assert not re.search(r"\b[FD]FMA\b", text), name
        for line in re.findall(r"HFMA2[^;]*;", text):
            assert re.search(r"-RZ, RZ", line), (name, line)
    # f32 state, f32 contiguous field, no flags: 128-bit loads and stores, FMUL then FADD; the
    # same for the stage kernel (f32, contiguous, not guided), and f64 math in its f64 variant.
    # device_entry<EulerKernel<state, field, CONTIG, MODE, TRAJ, DOUBLED>>, <StageKernel<..., MODE>>
    f32 = kernels["_ZN3fmf12device_entryINS_11EulerKernelILi2ELi2ELb1ELi0ELb0ELb0EEEEEvT_"]
    stage_f32 = kernels["_ZN3fmf12device_entryINS_11StageKernelILi2ELi2ELb1ELi0EEEEEvT_"]
    for text in (f32, stage_f32):
        assert re.search(r"LDG\.E\.128", text) and re.search(r"STG\.E\.128", text)
        assert "FMUL" in text and "FADD" in text
    stage_f64 = kernels["_ZN3fmf12device_entryINS_11StageKernelILi3ELi3ELb1ELi0EEEEEvT_"]
    assert "DMUL" in stage_f64 and "DADD" in stage_f64
    # The Alpamayo 1.5 mix (MODE 2) with a 16-bit field rounds each product and the sum to the
    # field dtype with the hardware's round-to-nearest-even conversions (cvt.rn.f16/bf16.f32),
    # f32 math between them (kept FMUL, FADD: no FFMA, checked above for every variant).
    for field, cvt in ((0, r"F2FP?\.F16\.F32"), (1, r"F2FP?\.BF16\.F32")):
        for kernel in (f"_ZN3fmf12device_entryINS_11EulerKernelILi2ELi{field}ELb1ELi2ELb0ELb0EEEEEvT_",
                       f"_ZN3fmf12device_entryINS_11StageKernelILi2ELi{field}ELb1ELi2EEEEEvT_"):
            text = kernels[kernel]
            assert re.search(cvt, text) and "FMUL" in text and "FADD" in text, kernel


def test_ptx_has_no_fused_multiply_add_and_rounds_every_op():
    """The embedded PTX is what the driver JIT-compiles for GPUs newer than the SASS targets: no
    fma, every float add/sub/mul carries .rn (an explicit rounding, which ptxas never
    contracts), every float32 division is div.rn (IEEE), in all three kernels."""
    archs = ext_or_skip().compiled_archs()
    if not any(a.startswith("compute_") for a in archs):
        pytest.skip("built without PTX")
    ptx = _dump("-ptx")
    for kernel in ("EulerKernel", "StageKernel", "SdeKernel"):
        assert re.search(rf"\.entry _ZN3fmf12device_entryINS_\d+{kernel}", ptx), kernel
    assert not re.search(r"^\s*fma\.", ptx, re.MULTILINE)
    # the SDE step's division: IEEE round-to-nearest (div.rn), never div.approx / div.full
    divs = re.findall(r"^\s*(?:@%p\d+ )?(div\S*\.f32)\s", ptx, re.MULTILINE)
    assert divs and set(divs) == {"div.rn.f32"}, sorted(set(divs))
    ops = re.findall(r"^\s*(?:@%p\d+ )?((?:add|sub|mul)\S*\.f(?:32|64))\s", ptx, re.MULTILINE)
    assert ops and all(".rn." in op for op in ops), sorted(set(ops))



def test_host_code_has_no_fused_multiply_add():
    """The host emulation's arithmetic is compiled without contraction (-ffp-contract=off): no
    FMA instruction in the module's machine code (x86-64 vfmadd*/vfnmadd*, AArch64 fmadd/fmsub)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump")
    res = subprocess.run([objdump, "-d", "--no-show-raw-insn", _so_path()], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "device_entry" in res.stdout or "EulerKernel" in res.stdout  # the kernels' host code
    fma = re.findall(r"\b(v?f(?:n)?m(?:add|sub)\d*[sp][sd]|f(?:n)?m(?:add|sub))\b", res.stdout)
    assert not fma, sorted(set(fma))


def test_runs_on_rules():
    assert cuda_loader.runs_on("sm_90", 90)
    assert not cuda_loader.runs_on("sm_90", 100)
    assert cuda_loader.runs_on("sm_80", 86) and not cuda_loader.runs_on("sm_86", 80)
    assert cuda_loader.runs_on("compute_90", 120) and not cuda_loader.runs_on("compute_90", 89)
    assert cuda_loader.runs_on("sm_90a", 90) and not cuda_loader.runs_on("sm_90a", 100)

