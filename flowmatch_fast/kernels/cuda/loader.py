"""Loading the CUDA extension and deciding whether it can run on a device.

The kernels live in the extension ``flowmatch_fast._cuda_euler`` (csrc/), built by setup.py when
nvcc is found. Nothing here touches the GPU at import: the extension is imported on first use,
and a missing or unusable build is reported (with the command that fixes it, from
:func:`flowmatch_fast._install.rebuild_hint`) only when the backend is asked for.

Host emulation: with ``FLOWMATCH_FAST_CUDA_EMULATE=1`` the backend also takes CPU tensors and
runs the same kernel code on the host (csrc/launch.cuh walks the same grid of blocks and
threads), through the same launch path; only the stream and the launch differ. CI runs the
parity suite that way. GPU-only: streams and the device guard, CUDA graphs, concurrent threads,
and the device compilation itself (tests/test_cuda_binary.py inspects SASS and PTX; on a GPU,
test_emulation_matches_the_device compares the two).
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from ..._install import rebuild_hint

EXTENSION = "flowmatch_fast._cuda_euler"
EMULATE_ENV = "FLOWMATCH_FAST_CUDA_EMULATE"
ARCHS_ENV = "FLOWMATCH_FAST_CUDA_ARCHS"

_ext = None  # the extension module, once imported
_import_error: Optional[BaseException] = None
STATE_CODES: dict = {}  # torch dtype -> the binding's dtype code
FIELD_CODES: dict = {}
MODES: dict = {}  # the binding's velocity modes: "field", "cfg", "mix"
_runtime_error: Optional[str] = None  # the extension's CUDA runtime could not see a GPU
_runtime_checked = False
_arch_reasons: dict = {}  # device index -> None or why the build holds no code for it


def load():
    """Import the extension once; ``None`` (and the error kept) when it is not built."""
    global _ext, _import_error
    if _ext is None and _import_error is None:
        try:
            ext = importlib.import_module(EXTENSION)
        except ImportError as exc:
            _import_error = exc
            return None
        codes = ext.dtype_codes()
        for name in ("float32", "float64"):
            STATE_CODES[getattr(torch, name)] = codes[name]
        for name in ("float16", "bfloat16", "float32", "float64"):
            FIELD_CODES[getattr(torch, name)] = codes[name]
        MODES.update(ext.velocity_modes())
        _ext = ext
    return _ext


def emulating() -> bool:
    """Whether ``FLOWMATCH_FAST_CUDA_EMULATE`` asks for the host emulation on CPU tensors."""
    return os.environ.get(EMULATE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _check_runtime(ext) -> Optional[str]:
    """Once per process: can the extension's own (static) CUDA runtime use the driver?"""
    global _runtime_error, _runtime_checked
    if not _runtime_checked:
        try:
            if ext.device_count() < 1:
                _runtime_error = "the extension's CUDA runtime sees no GPU"
        except RuntimeError as exc:
            _runtime_error = str(exc)
        _runtime_checked = True
    return _runtime_error


def runs_on(target: str, cap: int) -> bool:
    """Whether an embedded target (``sm_90``, ``sm_90a``, ``compute_90``) runs on capability cap."""
    kind, arch = target.split("_", 1)
    suffix = arch[-1] if arch[-1] in "af" else ""
    number = int(arch[:-1] if suffix else arch)
    if kind == "compute":  # PTX: JIT-compiled by the driver for this or any newer GPU
        return cap == number if suffix == "a" else cap >= number
    if suffix == "a":  # arch-specific machine code: that exact GPU only
        return cap == number
    return cap // 10 == number // 10 and cap >= number  # same major, same or newer minor


def _arch_reason(ext, device: torch.device) -> Optional[str]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _arch_reasons:
        major, minor = torch.cuda.get_device_capability(index)
        cap = major * 10 + minor
        targets = ext.compiled_archs()
        reason = None
        if not any(runs_on(t, cap) for t in targets):
            reason = (f"the extension holds code for {', '.join(targets)}, none of which runs on "
                      f"this sm_{cap} GPU; {rebuild_hint(f'{ARCHS_ENV}={cap}')}")
        _arch_reasons[index] = reason
    return _arch_reasons[index]


# Under torch.compile, unavailable_reason runs for real at trace time and its answer becomes a
# constant of the graph (it calls into the extension, which Dynamo cannot trace); a no-op
# decorator for eager calls. Whether the backend runs on a device does not change in a process.
def _constant_under_compile(fn):
    fn._dynamo_marked_constant = True  # = torch.compiler.assume_constant_result (see backends.py)
    return fn


@_constant_under_compile
def unavailable_reason(device) -> Optional[str]:
    """``None`` when this backend can run on ``device``; else what is wrong and the fix."""
    device = torch.device(device)
    emulated = device.type == "cpu" and emulating()
    if device.type != "cuda" and not emulated:
        return (f"the cuda backend runs on CUDA tensors; got device {device} (set {EMULATE_ENV}=1 "
                "to run its kernels on CPU tensors through the host emulation, for tests)")
    ext = load()
    if ext is None:
        return (f"the compiled extension {EXTENSION} is not built "
                f"({type(_import_error).__name__}: {_import_error}); {rebuild_hint()}")
    if emulated:
        return None
    reason = _check_runtime(ext)
    if reason is not None:
        return reason
    return _arch_reason(ext, device)


def require():
    """The extension, or ``RuntimeError`` with why it cannot be loaded and the fix."""
    ext = load()
    if ext is None:
        raise RuntimeError(unavailable_reason(torch.device("cuda")))
    return ext
