"""Ahead-of-time compile of every Triton specialization for sm_90 (Triton's compiler needs no GPU).

Catches a kernel that no longer builds before any GPU sees it, and checks the PTX: 128-bit
global loads and stores on the contiguous float32 path, and no fused multiply-add anywhere.
"""

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from flowmatch_fast.kernels.triton import launch as triton_euler  # noqa: E402

import triton_aot  # noqa: E402

pytestmark = pytest.mark.skipif(
    triton_euler.interpret_mode(),
    reason="ahead-of-time compilation needs Triton's compiler: run without TRITON_INTERPRET "
           "(make test does, in its first phase)")


def _ops(ptx):
    return set(re.findall(
        r"\b((?:ld|st)\.global[\w.]*|fma\.[\w.]*|mul\.[\w.]*|add\.[\w.]*|sub\.[\w.]*"
        r"|div\.[\w.]*)", ptx))


@pytest.fixture(scope="module")
def compiled():
    try:
        return {spec: triton_aot.compile_for_target(*spec, arch=90)
                for spec in triton_aot.specializations()}
    except Exception as exc:  # the compile API moved between Triton versions: say which
        raise AssertionError(f"AOT compile failed on Triton {triton.__version__}: {exc!r}") from exc


@pytest.fixture(scope="module")
def compiled_stages():
    return [(spec, triton_aot.compile_for_target(**spec, arch=90))
            for spec in triton_aot.stage_specializations()]


def test_every_stage_specialization_compiles_without_fma(compiled_stages):
    assert len(compiled_stages) >= 8 * 8 * 2
    for spec, kernel in compiled_stages:
        assert kernel.asm.get("cubin"), spec
        fmas = [op for op in _ops(kernel.asm["ptx"]) if op.startswith("fma")]
        assert not fmas, f"{spec}: contraction is on ({fmas})"


def test_every_specialization_compiles_for_sm90(compiled):
    assert len(compiled) == 2 * 4 * 2 * len(triton_aot.GUIDANCE_VARIANTS) * 2
    for spec, kernel in compiled.items():
        assert kernel.asm.get("cubin"), spec
        assert ".target sm_90" in kernel.asm["ptx"], spec


def test_no_fma_in_any_specialization(compiled):
    for spec, kernel in compiled.items():
        fmas = [op for op in _ops(kernel.asm["ptx"]) if op.startswith("fma")]
        assert not fmas, f"{spec}: contraction is on ({fmas})"


def test_contiguous_float32_uses_128_bit_accesses(compiled):
    for traj in (False, True):
        ops = _ops(compiled[(torch.float32, torch.float32, traj, False, True)].asm["ptx"])
        assert any(op.startswith("ld.global.v4") for op in ops), ops
        assert any(op.startswith("st.global.v4") for op in ops), ops
        assert "mul.rn.f32" in ops and "add.rn.f32" in ops, ops


def test_every_sde_specialization_compiles_with_ieee_division_and_no_fma():
    """The RL SDE step: no fma; its one division is div.rn.f32 (Triton's `/` would be an
    approximate div.full.f32); every float add, sub and mul carries .rn; 128-bit accesses on the
    contiguous float32 path."""
    for spec in triton_aot.sde_specializations():
        ops = _ops(triton_aot.compile_sde_for_target(*spec, arch=90).asm["ptx"])
        assert not [op for op in ops if op.startswith("fma")], spec
        assert {op for op in ops if op.startswith("div") and op.endswith("f32")} == {"div.rn.f32"}, (spec, ops)
        # every float add, sub and mul explicitly rounded (.rn: ptxas never contracts those)
        unrounded = [op for op in ops if re.match(r"(add|sub|mul)\.f(32|64)$", op)]
        assert not unrounded, (spec, unrounded)
        if spec[:3] == (torch.float32, False, True):
            assert any(op.startswith("ld.global.v4") for op in ops), (spec, ops)
            assert any(op.startswith("st.global.v4") for op in ops), (spec, ops)


def test_the_fma_check_can_fail():
    """With contraction on, the same kernel does hold an fma: the check above is not vacuous."""
    fused = triton_aot.compile_for_target(torch.float32, torch.float32, enable_fp_fusion=True)
    assert any(op.startswith("fma.rn.f32") for op in _ops(fused.asm["ptx"]))
