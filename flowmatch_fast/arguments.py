"""Checks of one sampling call's arguments, shared by every class: each returns the value as
the sampler uses it or raises an error naming the argument, what was expected and what came.
Also the grids an argument describes (SD3's shift), built the same way on host and device."""

from __future__ import annotations

import functools
import math
import numbers
import struct

import torch

from . import backends
from .base import as_int


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    value = as_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")
    return value


def check_real(name: str, value) -> float:
    """A real number (int, float, NumPy scalar) as a Python float; not a bool, str or tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    return float(value)


def _real_tensor(value) -> bool:
    """A 0-dim tensor that PyTorch multiplies as a real scalar (not bool, not complex)."""
    return (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
            and not value.dtype.is_complex)


def check_scalar(name: str, value) -> float:
    """An option of the originals that multiplies a float tensor (``temperature``, R1's
    ``inference_guidance_weight``): a real number or a 0-dim tensor, as a Python float. Exact:
    the product is rounded in the tensor's dtype (float32 or float64), into which the float
    converts as the 0-dim tensor's own value does. (A CUDA tensor's value is read on the host.)"""
    if _real_tensor(value):
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a 0-dim tensor, got "
                        f"{type(value).__name__} ({value!r})")
    return float(value)


def mix_weight(value):
    """Alpamayo 1.5's guidance weight ``w`` in ``(1 - w) * vu + w * vg``: a Python float where
    the fused kernels can take it (an int or a float: PyTorch holds either as a double scalar),
    else the value itself, a NumPy float32 or a 0-dim tensor, which the mix then gives PyTorch
    as it is: ``1 - w`` is rounded in its own dtype there, as in the original."""
    if isinstance(value, (numbers.Integral, float)) and not isinstance(value, bool):
        return float(value)
    check_scalar("inference_guidance_weight", value)
    return value


def scalar_key(value):
    """A cache key of a value :func:`mix_weight` returns: a float's bits, else its type, dtype
    and device beside its value's bits (the mix rounds in its dtype, on its device)."""
    if isinstance(value, float):
        return struct.pack("<d", value)
    return (type(value).__name__, str(getattr(value, "dtype", "")), str(getattr(value, "device", "")),
            struct.pack("<d", float(value)))


def steps_or_attribute(inference_step, num_inference_steps) -> int:
    """The step count as the originals take it, ``inference_step or num_inference_steps`` (0
    and None mean the attribute), checked where it is used: a count >= 1, an int."""
    if inference_step:
        return check_positive_int("inference_step", inference_step)
    return check_positive_int("num_inference_steps", num_inference_steps)


def euler_steps(inference_step, num_inference_steps, timesteps) -> int:
    """The step count an override of ``_euler`` receives: as the originals pass it,
    ``inference_step or num_inference_steps``, or, with our ``timesteps=`` grid and no
    ``inference_step``, the grid's (checked with the grid when the call is planned)."""
    if not inference_step and timesteps is not None:
        return len(timesteps) - 1
    return inference_step or num_inference_steps


def sampling_device(device) -> torch.device:
    """``device=None`` means PyTorch's default device, as ``torch.randn(..., device=None)``."""
    return torch.get_default_device() if device is None else torch.device(device)


def same_device(actual: torch.device, device: torch.device) -> bool:
    """``actual`` (a tensor's or generator's) is the sampling ``device``; a CUDA device without
    an index is the current one."""
    def index(d):
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index

    return actual.type == device.type and index(actual) == index(device)



def grid_dtype(plain: bool) -> torch.dtype:
    """The time grid's dtype. The plain grid is the original's ``torch.linspace``: the default
    dtype (float64 under ``torch.set_default_dtype(torch.float64)``). A shifted or explicit grid
    (ours) is float32, or float64 under a float64 default, where the original's grid is float64
    too; never a 16-bit grid."""
    default = torch.get_default_dtype()
    if plain or default == torch.float64:
        return default
    return torch.float32


def check_shift(shift, steps: int, dtype: torch.dtype = torch.float32):
    """SD3's ``shift=`` as a float, or ``None`` when absent or 1 (the plain grid); its grid is
    checked in ``dtype``."""
    if shift is None:
        return None
    if (isinstance(shift, bool) or not isinstance(shift, numbers.Real)
            or not math.isfinite(shift) or not shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if shift == 1:
        return None
    check_shifted_grid(steps, float(shift), dtype)
    return float(shift)


def shifted_grid(values: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift on the noise level ``s = 1 - t``: ``s' = shift * s / (1 + (shift - 1) * s)``.

    ``shift > 1`` spends more steps at high noise. Computed on the grid's device in float64 (no
    overflow for any finite shift), rounded to the grid's dtype; the end points are set to
    exactly 0 and 1.
    """
    s = 1.0 - values.double()
    out = (1.0 - (shift * s) / (1.0 + (shift - 1.0) * s)).to(values.dtype)
    out[0] = 0.0
    out[-1] = 1.0
    return out


@backends.trace_time_constant  # run on the host when torch.compile traces sample, not traced
def check_shifted_grid(steps: int, shift: float, dtype: torch.dtype = torch.float32) -> bool:
    """Reject a shift whose grid has zero-length steps in ``dtype``: e.g. 1e-30 puts every point
    at 1, 1e30 every point at 0 (in float32). Checked on the host with the formula the device
    runs on its own ``linspace``."""
    return check_shifted_grid_cached(steps, shift, dtype)


@functools.lru_cache(maxsize=64)
def check_shifted_grid_cached(steps: int, shift: float, dtype: torch.dtype) -> bool:
    grid = shifted_grid(torch.linspace(0.0, 1.0, steps + 1, dtype=dtype), shift)
    if not bool((grid[1:] > grid[:-1]).all()):
        name = str(dtype).removeprefix("torch.")
        raise ValueError(f"shift={shift!r} gives {steps} steps a time grid that is not strictly "
                         f"increasing in {name} ({grid.tolist()[:4]} ...): zero-length steps; "
                         "use a shift closer to 1 or fewer steps")
    return True



def check_timesteps(timesteps, device: torch.device, dtype: torch.dtype = torch.float32):
    """Validate an explicit grid on the host, in ``dtype`` (:func:`grid_dtype`); return it on
    ``device`` and its bits (the cache key's)."""
    if isinstance(timesteps, torch.Tensor):
        if timesteps.device.type != "cpu" and not same_device(timesteps.device, device):
            raise ValueError(f"timesteps is on {timesteps.device}; expected the sampling device "
                             f"{device} or the CPU")
        if not timesteps.is_floating_point():
            raise ValueError(f"timesteps must be floating point, got {timesteps.dtype}")
        # a private contiguous copy (a sync for a CUDA tensor): never the caller's storage
        host = timesteps.detach().to("cpu", dtype).contiguous().clone()
    else:
        try:
            host = torch.tensor(list(timesteps), dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"timesteps must be a 1-D sequence of floats or a tensor ({exc})") from None
    if host.dim() != 1 or host.numel() < 2:
        raise ValueError(f"timesteps must be 1-D with T + 1 >= 2 entries, got shape {tuple(host.shape)}")
    if host[0].item() != 0.0 or host[-1].item() != 1.0:
        raise ValueError(f"timesteps must start at 0 and end at 1 (noise to data), got "
                         f"{host[0].item()} ... {host[-1].item()}")
    steps = host[1:] - host[:-1]
    if not bool((steps > 0).all()):
        bad = int((~(steps > 0)).nonzero()[0])  # NaN compares false: caught here too
        name = str(dtype).removeprefix("torch.")
        raise ValueError(f"timesteps must be strictly increasing (in {name}); entry {bad + 1} "
                         f"({host[bad + 1].item()}) does not exceed entry {bad} ({host[bad].item()})")
    code = "d" if dtype == torch.float64 else "f"
    return host.to(device), struct.pack(f"<{host.numel()}{code}", *host.tolist())


def check_noise(noise, shape, device: torch.device) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)} (batch_size, *x_dims); got "
                         f"{tuple(noise.shape)}")
    if noise.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"noise must be float32 or float64, got {noise.dtype}")
    if not same_device(noise.device, device):
        raise ValueError(f"noise is on {noise.device}; expected the sampling device {device}")
    if not noise.is_contiguous():
        raise ValueError("noise must be contiguous (it is handed to step_fn as the first state)")
