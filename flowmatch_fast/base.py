"""The two base types of the original API: ``StepFn`` and ``BaseDiffusion``."""

from __future__ import annotations

import abc
from typing import Protocol, Sequence, Union

import torch
from torch import nn


class StepFn(Protocol):
    """A learned vector field: ``v = step_fn(x=x, t=t)``.

    ``x`` is the current state ``[B, *x_dims]`` (contiguous), ``t`` the time, float32 of shape
    ``[B, 1, ..., 1]``; the result must broadcast to ``x``'s shape.
    """

    def __call__(self, *, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def _normalize_x_dims(x_dims: Union[int, Sequence[int]]) -> list:
    if isinstance(x_dims, bool):
        raise TypeError(f"x_dims must be an int or a sequence of ints, got {x_dims!r}")
    if isinstance(x_dims, int):
        dims = [x_dims]
    else:
        try:
            dims = list(x_dims)
        except TypeError:
            raise TypeError(
                f"x_dims must be an int or a sequence of ints, got {type(x_dims).__name__}"
            ) from None
    if not dims:
        raise ValueError("x_dims must name at least one dimension, got an empty sequence")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"x_dims entries must be ints, got {d!r} in {dims}")
        if d < 1:
            raise ValueError(f"x_dims entries must be >= 1, got {d} in {dims}")
    return dims


class BaseDiffusion(abc.ABC, nn.Module):
    """Base class of the samplers: stores ``x_dims`` as a list (``128`` -> ``[128]``)."""

    def __init__(self, x_dims: Union[int, Sequence[int]], *args, **kwargs):
        super().__init__()
        self.x_dims = _normalize_x_dims(x_dims)

    @abc.abstractmethod
    def sample(self, batch_size: int, step_fn: StepFn, *args, **kwargs):
        """Draw ``batch_size`` samples by integrating ``step_fn`` from noise to data."""
