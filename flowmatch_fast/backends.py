"""Backend availability and selection: the one place where ``"auto"`` is decided.

A backend is a module with the steps, ``supports`` and ``unavailable_reason(device) -> str |
None`` of :mod:`flowmatch_fast.kernels.contract`. An explicit request for a backend that cannot run
raises ``RuntimeError`` with the reason and the fix; only ``"auto"`` falls back, and logs once.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from . import ops  # noqa: F401  (registers the torch.library ops before anything traces)
from .kernels import reference
from .kernels.cuda import launch as cuda_launch
from .kernels.triton import launch as triton_launch

logger = logging.getLogger("flowmatch_fast")

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "FLOWMATCH_FAST_BACKEND"

# Imported eagerly (each imports its toolchain lazily), so that torch.compile can trace a plain
# dict lookup.
_MODULES = {"torch": reference, "triton": triton_launch, "cuda": cuda_launch}
# auto's order of preference on a CUDA device: the compiled kernel has the lowest launch cost
# and runs at copy bandwidth (H200, bench/results/2026-11-28-NVIDIA-H200.md: 8.9 us host per
# launch; 40 us for a 50 MB update, 103 % of a same-size copy). Triton's launch costs 34 us of host
# time against 15 us for PyTorch's mul + add, so without the extension an *eager* loop on a small
# state is faster on plain torch (W1, batch 6: 2272 us torch vs 2984 us triton); Triton wins once
# the launches are captured (283 vs 313 us) or the state is large (W2, 50 MB: 1041 vs 1561 us).
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")
AUTO_TRITON_MIN_NUMEL = 1 << 20  # eager auto takes Triton from ~1 M state elements (4 MB) up
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


def grid_reason(name: str, grid_dtype: torch.dtype) -> Optional[str]:
    """Why backend ``name`` cannot read a time grid of ``grid_dtype``, or ``None`` when it can.
    The grid follows the default dtype, as the original's ``linspace`` does
    (:func:`flowmatch_fast.arguments.grid_dtype`)."""
    if grid_dtype in _MODULES[name].GRID_DTYPES:
        return None
    takers = [n for n, mod in _MODULES.items() if grid_dtype in mod.GRID_DTYPES]
    return (f"its kernels read a {_names(_MODULES[name].GRID_DTYPES)} time grid, and under "
            f"torch.set_default_dtype({torch.get_default_dtype()}) the grid is "
            f"{_names([grid_dtype])}, as the original's; use backend="
            f"{' or '.join(map(repr, takers))}, or the float32 default dtype")


def _names(dtypes) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


@trace_time_constant
def _resolve_name(name: str, device_type: str, device_index: int, triton_pays: bool,
                  grid_dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend for a request on a device; raises when an explicit one can't run.

    ``triton_pays``: the loop is captured or the state is large, so Triton's host cost per
    launch does not matter. ``grid_dtype``: the time grid's dtype (:func:`grid_reason`). A
    constant for torch.compile (it runs once at trace time), so ``sample`` traces through.
    """
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in _AUTO_ORDER_CUDA:
            if candidate == "triton" and not triton_pays:
                continue
            reason = unavailable_reason(candidate, device) or grid_reason(candidate, grid_dtype)
            if reason is None:
                return candidate
            if candidate not in _logged_fallbacks:
                _logged_fallbacks.add(candidate)
                logger.info("flowmatch_fast: backend %r skipped by auto: %s", candidate, reason)
        raise AssertionError("unreachable: the torch backend is always available")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"flowmatch_fast backend {name!r} is not available on {device}: {reason}")
    reason = grid_reason(name, grid_dtype)
    if reason is not None:
        raise RuntimeError(f"flowmatch_fast backend {name!r} cannot sample under the default "
                           f"dtype {torch.get_default_dtype()}: {reason}")
    return name


def resolve(name: str, device: torch.device, numel: int = 0, captured: bool = True,
            grid_dtype: torch.dtype = torch.float32):
    """The backend module to use for ``name`` on ``device``, for a state of ``numel`` elements
    sampled eagerly (``captured=False``) or inside a CUDA graph, over a time grid of
    ``grid_dtype``."""
    index = device.index if device.index is not None else -1
    triton_pays = captured or numel >= AUTO_TRITON_MIN_NUMEL
    return _MODULES[_resolve_name(name, device.type, index, triton_pays, grid_dtype)]


def available_backends(device="cuda") -> dict:
    """``{name: None or reason}`` for each concrete backend on ``device``."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in ("torch", "triton", "cuda")}
