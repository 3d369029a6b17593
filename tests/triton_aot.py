"""Ahead-of-time compile of the Triton kernels for a GPU target (no GPU needed): every
specialization ``sample`` can launch, for tests/test_triton_compile.py."""

import torch

from flowmatch_fast.kernels.contract import METHODS
from flowmatch_fast.kernels.triton.launch import BLOCK, NUM_WARPS, _kernels

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                 torch.float64: "fp64"}


# Guidance variants: none, the R1 extra's doubled batch, Alpamayo 1.5's mix of two fields.
GUIDANCE_VARIANTS = (False, "batch", "mix")


def specializations():
    """Every Euler variant ``sample`` can launch: (state, field, traj, guided, contiguous)."""
    for state in (torch.float32, torch.float64):
        for field in _TRITON_TYPES:
            for traj in (False, True):
                for guided in GUIDANCE_VARIANTS:
                    for contiguous in (True, False):
                        yield state, field, traj, guided, contiguous


def stage_specializations():
    """Every Runge-Kutta stage variant the integrators launch, as ``compile_for_target`` kwargs."""
    flag_sets = []
    for method, stages in METHODS.items():
        if method == "euler":
            continue
        for j, st in enumerate(stages):
            flags = dict(has_acc=st.uses_acc, acc_w2=st.acc_weight == 2.0,
                         write_acc=st.write_acc, from_acc=st.from_acc, coef_one=st.coef == 1.0,
                         last=j == len(stages) - 1)
            if flags not in flag_sets:
                flag_sets.append(flags)
    for flags in flag_sets:
        last = flags.pop("last")
        for state in (torch.float32, torch.float64):
            for field in _TRITON_TYPES:
                for guided in GUIDANCE_VARIANTS:
                    for traj in ((False, True) if last else (False,)):
                        yield dict(state=state, field=field, traj=traj, guided=guided,
                                   stage=flags)


def sde_specializations():
    """The SDE step's variants (float32 state): (field, guided, contiguous, traj, replay)."""
    for field in _TRITON_TYPES:
        for guided in (False, "mix"):
            for contiguous in (True, False):
                for replay in (False, True):
                    yield field, guided, contiguous, True, replay
    yield torch.float32, False, True, False, False  # without the trajectory


def compile_sde_for_target(field, guided=False, contiguous=True, traj=True, replay=False, arch=90):
    """Compile one SDE-step specialization ahead of time, as :func:`compile_for_target`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernels()[2]
    f = _TRITON_TYPES[field]
    sig = {"x_ptr": "*fp32", "v_ptr": "*" + f, "vu_ptr": "*" + f, "table_ptr": "*fp32",
           "noise_ptr": "*fp32", "out_ptr": "*fp32", "traj_ptr": "*fp32", "lp_ptr": "*fp32",
           "step": "i32", "w_bits": "i64", "n_total": "i32", "row_len": "i32",
           "traj_row_stride": "i32"}
    sig.update({name: "i32" for name in ("d1", "d2", "d3", "d4", "d5")})
    sig.update({name: "i64" for name in ("s0", "s1", "s2", "s3", "s4", "s5")})
    constexprs = dict(BLOCK=BLOCK, V_NDIM=1 if contiguous else 3, V_CONTIG=contiguous, ROWS=traj,
                      HAS_TRAJ=traj, GUIDED=bool(guided), MIX=guided == "mix",
                      M_F64=field == torch.float64, REPLAY=replay)
    sig.update({name: "constexpr" for name in constexprs})
    aligned = [n for n in sig if n.endswith("_ptr") and n != "table_ptr"] + [
        "n_total", "row_len", "traj_row_stride"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": NUM_WARPS, "enable_fp_fusion": False})


def compile_for_target(state, field, traj=False, guided=False, contiguous=True, arch=90,
                       enable_fp_fusion=False, stage=None):
    """Compile one specialization ahead of time for ``sm_<arch>`` (no GPU needed); returns the
    compiled kernel, whose ``.asm`` dict holds ``ttir``/``ttgir``/``llir``/``ptx``/``cubin``.

    ``guided``: one of ``GUIDANCE_VARIANTS`` (``"batch"`` writes the doubled output).

    ``stage``: ``None`` for the Euler kernel, else the stage kernel's flags (``has_acc``,
    ``acc_w2``, ``write_acc``, ``from_acc``, ``coef_one``). Pointers are declared 16-byte
    aligned and sizes multiples of 16, as the runtime specializes them for tensors from
    PyTorch's allocator and Alpamayo's 128-element rows.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernels()[0 if stage is None else 1]
    out_t = "fp64" if torch.float64 in (state, field) else "fp32"
    f = _TRITON_TYPES[field]
    sig = {"x_ptr": "*" + _TRITON_TYPES[state]}
    if stage is None:
        sig.update({"v_ptr": "*" + f, "vu_ptr": "*" + f, "grid_ptr": "*fp32",
                    "out_ptr": "*" + out_t, "traj_ptr": "*" + out_t, "step": "i32",
                    "w_bits": "i64"})
    else:
        sig.update({"k_ptr": "*" + f, "ku_ptr": "*" + f, "acc_ptr": "*" + out_t,
                    "grid_ptr": "*fp32", "out_ptr": "*" + out_t, "acc_out_ptr": "*" + out_t,
                    "traj_ptr": "*" + out_t, "step": "i32", "coef_bits": "i64", "w_bits": "i64"})
    sig.update({"n_total": "i32", "row_len": "i32", "traj_row_stride": "i32", "dup_offset": "i32"})
    sig.update({name: "i32" for name in ("d1", "d2", "d3", "d4", "d5")})
    sig.update({name: "i64" for name in ("s0", "s1", "s2", "s3", "s4", "s5")})
    constexprs = dict(BLOCK=BLOCK, V_NDIM=1 if contiguous else 3, V_CONTIG=contiguous,
                      ROWS=traj, HAS_TRAJ=traj, DUP_OUT=guided == "batch", GUIDED=bool(guided),
                      MIX=guided == "mix", M_F64=field == torch.float64)
    if stage is None:
        constexprs.update(P_F64=field == torch.float64, S_F64=out_t == "fp64")
    else:
        constexprs.update(C_F64=out_t == "fp64", HAS_ACC=stage["has_acc"], ACC_W2=stage["acc_w2"],
                          WRITE_ACC=stage["write_acc"], FROM_ACC=stage["from_acc"],
                          COEF_ONE=stage["coef_one"])
    sig.update({name: "constexpr" for name in constexprs})
    aligned = [n for n in sig if n.endswith("_ptr")] + ["n_total", "row_len", "traj_row_stride",
                                                        "dup_offset"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": NUM_WARPS, "enable_fp_fusion": enable_fp_fusion})
