"""Backend availability and selection: the one place where ``"auto"`` is decided.

A backend is a module with ``euler_step`` (the contract in :mod:`flowmatch_fast.kernels`) and
``unavailable_reason(device) -> str | None``. An explicit request for a backend that cannot run
raises ``RuntimeError`` with the reason and the fix; only ``"auto"`` falls back, and logs once.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from .kernels import cuda_euler, reference, triton_euler

logger = logging.getLogger("flowmatch_fast")

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "FLOWMATCH_FAST_BACKEND"

# Imported eagerly (each imports its toolchain lazily; triton_euler registers its torch.library
# ops when Triton is installed), so that torch.compile can trace a plain dict lookup.
_MODULES = {"torch": reference, "triton": triton_euler, "cuda": cuda_euler}
# auto's order of preference on a CUDA device: the compiled kernel has the lowest launch cost.
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")
_logged_fallbacks: set = set()


def check_backend_name(name: Optional[str]) -> str:
    """Validate a backend request; ``None`` means the environment variable, else ``"auto"``."""
    source = "backend"
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
        source = ENV_VAR
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or ``None`` when it can."""
    return _MODULES[name].unavailable_reason(torch.device(device))


def trace_time_constant(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (1.1 s) at import.

    That decorator only sets this attribute (torch 2.4 to 2.13); tests/test_compile.py checks that
    it still does, and that ``sample`` traces.
    """
    fn._dynamo_marked_constant = True
    return fn


@trace_time_constant
def _resolve_name(name: str, device_type: str, device_index: int) -> str:
    """The concrete backend for a request on a device; raises when an explicit one can't run.

    A constant for torch.compile (it runs once at trace time), so ``sample`` traces through.
    """
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in _AUTO_ORDER_CUDA:
            reason = unavailable_reason(candidate, device)
            if reason is None:
                return candidate
            if candidate not in _logged_fallbacks:
                _logged_fallbacks.add(candidate)
                logger.info("flowmatch_fast: backend %r skipped by auto: %s", candidate, reason)
        raise AssertionError("unreachable: the torch backend is always available")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"flowmatch_fast backend {name!r} is not available on {device}: {reason}")
    return name


def resolve(name: str, device: torch.device):
    """The backend module to use for ``name`` on ``device``."""
    index = device.index if device.index is not None else -1
    return _MODULES[_resolve_name(name, device.type, index)]


def available_backends(device="cuda") -> dict:
    """``{name: None or reason}`` for each concrete backend on ``device``."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in ("torch", "triton", "cuda")}
