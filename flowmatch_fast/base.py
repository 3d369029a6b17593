"""The two base types of the original API: ``StepFn`` and ``BaseDiffusion``."""

from __future__ import annotations

import abc
import operator
import warnings
from typing import Protocol, Sequence, Union

import torch
from torch import nn


class StepFn(Protocol):
    """A learned vector field: ``v = step_fn(x=x, t=t)``.

    ``x`` is the current state ``[B, *x_dims]`` (contiguous), ``t`` the time, float32 of shape
    ``[B, 1, ..., 1]``; the result must broadcast to ``x``'s shape.
    """

    def __call__(self, *, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def as_int(name: str, value) -> int:
    """``value`` as a Python int: ints and integer-likes (NumPy, 0-dim integer tensors), not bools."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})") from None


def _normalize_x_dims(x_dims: Union[int, Sequence[int]]) -> list:
    if isinstance(x_dims, bool):
        raise TypeError(f"x_dims must be an int or a sequence of ints, got {x_dims!r}")
    if hasattr(x_dims, "__index__"):
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
    for k, d in enumerate(dims):
        if isinstance(d, bool) or not hasattr(d, "__index__"):
            raise TypeError(f"x_dims entries must be ints, got {d!r} in {dims}")
        d = dims[k] = operator.index(d)
        if d < 1:
            raise ValueError(f"x_dims entries must be >= 1, got {d} in {dims}")
    return dims


_warned_keywords: set = set()


def warn_unknown_keywords(where: str, kwargs: dict) -> None:
    """Keywords the original accepts and ignores: accepted (configs carry extra keys), with one
    warning per name and place, so that a misspelt option is seen."""
    for name in kwargs:
        if (where, name) not in _warned_keywords:
            _warned_keywords.add((where, name))
            warnings.warn(f"{where} ignores the unknown keyword argument {name!r} (accepted, as "
                          "the original does; check its spelling if it is meant as an option)",
                          UserWarning, stacklevel=4)  # the caller of sample / the constructor


class BaseDiffusion(abc.ABC, nn.Module):
    """Base class of the samplers: stores ``x_dims`` as a list (``128`` -> ``[128]``)."""

    def __init__(self, x_dims: Union[int, Sequence[int]], *args, **kwargs):
        super().__init__()
        warn_unknown_keywords(type(self).__name__, kwargs)
        self.x_dims = _normalize_x_dims(x_dims)

    @abc.abstractmethod
    def sample(self, batch_size: int, step_fn: StepFn, *args, **kwargs):
        """Draw ``batch_size`` samples by integrating ``step_fn`` from noise to data."""
