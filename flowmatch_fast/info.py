"""``python -m flowmatch_fast info``: what a bug report needs, like ``python -m torch.utils.collect_env``.

Package and how it was installed, Python, torch (and its CUDA), Triton, the NVIDIA driver, the
compiled extension (archs, CUDA runtime), each backend's availability with the reason, and the
environment variables flowmatch_fast reads. Never fails: what cannot be read is reported.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.metadata
import os
import platform
import sys
from typing import List, Optional

# Read by the package (backend choice, emulation), its build (setup.py) and its tests.
ENV_VARS = (
    "FLOWMATCH_FAST_BACKEND", "FLOWMATCH_FAST_CUDA_EMULATE", "TRITON_INTERPRET",
    "FLOWMATCH_FAST_SKIP_CUDA_BUILD", "FLOWMATCH_FAST_CUDA_ARCHS", "CUDA_HOME", "CUDA_PATH",
    "MAX_JOBS", "CUDA_VISIBLE_DEVICES", "FLOWMATCH_TEST_SEED",
)
DESCRIPTION = "Print what a bug report needs: versions, the extension, backends, environment."


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    """The NVIDIA driver's version and the CUDA version it supports, read without a GPU."""
    parts = []
    try:
        with open("/proc/driver/nvidia/version") as f:
            parts.append(f.readline().strip())
    except OSError:
        pass
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            parts.append(f"supports CUDA {v.value // 1000}.{v.value % 1000 // 10}")
    except (OSError, AttributeError):
        pass
    return "; ".join(parts) or "none found (no libcuda.so.1)"


def _extension() -> List[str]:
    from .kernels.cuda import loader

    try:
        ext = importlib.import_module(loader.EXTENSION)
    except ImportError as exc:
        return [f"not built ({exc})"]
    return [f"{ext.__file__}", ext.build_info()]


def report() -> str:
    """The report, as text."""
    import torch

    import flowmatch_fast
    from . import backends
    from ._install import install_kind

    lines = [
        f"flowmatch_fast : {flowmatch_fast.__version__} at {os.path.dirname(flowmatch_fast.__file__)}"
        f" ({install_kind()})",
        f"Python         : {sys.version.split()[0]} ({sys.executable}), {platform.platform()}",
        f"torch          : {torch.__version__}, built with CUDA {torch.version.cuda or '(none: CPU build)'}",
        f"Triton         : {_version('triton')}",
        f"NVIDIA driver  : {_driver()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}          : {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("GPU            : none visible to torch (torch.cuda.is_available() is False)")
    ext = _extension()
    lines.append(f"extension      : {ext[0]}")
    lines += [f"                 {more}" for more in ext[1:]]
    for device in ("cpu", "cuda"):
        lines.append(f"backends ({device}) :")
        for name, reason in backends.available_backends(device).items():
            lines.append(f"  {name:<7}: {'available' if reason is None else 'unavailable: ' + reason}")
    lines.append("environment    :")
    lines += [f"  {var}={os.environ[var]!r}" if var in os.environ else f"  {var} (unset)"
              for var in ENV_VARS]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``info`` takes no options."""


def main(args: Optional[argparse.Namespace] = None) -> int:
    print(report())
    return 0
