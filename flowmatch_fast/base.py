"""The two base types of the original API: ``StepFn`` and ``BaseDiffusion``."""

from __future__ import annotations

import abc
import contextlib
import contextvars
import difflib
import functools
import inspect
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


# Keywords some Alpamayo sampler takes (R1, 1.5, the RL recipes: constructors, ``sample``, the
# R1 base's ``dtype``): configs and call sites move between the variants (the release tooling
# remaps one's targets to another's class), and each original ignores the others' keys quietly.
ALPAMAYO_KEYWORDS = frozenset({
    "x_dims", "int_method", "num_inference_steps", "inference_guidance_weight",
    "train_timestep_sampler", "train_ignore_guidance_rate", "use_classifier_free_guidance",
    "batch_size", "step_fn", "unguided_step_fn", "device", "dtype", "return_all_steps",
    "inference_step", "temperature", "generator", "timesteps", "noise_level", "samples_list",
    "sde_type", "return_info"})
# difflib's ratio from which an unknown keyword counts as a misspelt option of ours: 0.8 takes a
# slip of one or two letters ('cuda_grpah' 0.90, 'guidence' 0.88, 'use_cuda_graph' 0.83) and
# leaves other names alone ('graph' 0.67, 'guidance_scale' 0.73, 'noise_std' 0.71).
_MISSPELT_RATIO = 0.8
_seen_keywords: set = set()  # (place, name): each is looked at once


@functools.lru_cache(maxsize=None)
def own_options(owner: type) -> tuple:
    """Our options on ``owner``: the keyword-only parameters of its constructor, ``sample`` and
    ``capture`` (read from the signatures, so a new option is covered where it is added)."""
    names = set()
    for method in ("__init__", "sample", "capture"):
        if hasattr(owner, method):
            names.update(p.name for p in inspect.signature(getattr(owner, method)).parameters.values()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)
    return tuple(sorted(names))


def warn_unknown_keywords(where: str, kwargs: dict, owner: type) -> None:
    """Keywords the original accepts and ignores are ignored quietly, as the original does
    (configs carry extra keys); one that looks like a misspelt option of ``owner``'s warns,
    once per name and place."""
    for name in kwargs:
        if name in ALPAMAYO_KEYWORDS or (where, name) in _seen_keywords:
            continue
        _seen_keywords.add((where, name))
        close = difflib.get_close_matches(name, own_options(owner), n=1, cutoff=_MISSPELT_RATIO)
        if close:
            warnings.warn(f"{where} ignores the unknown keyword argument {name!r}, as the original "
                          f"does; did you mean flowmatch_fast's option {close[0]!r}?",
                          UserWarning, stacklevel=4)  # the caller of sample / the constructor


def override_of(module: nn.Module, name: str, own):
    """What replaces our method ``own`` (a function) as ``module.<name>``: an attribute of the
    instance (a wrapper a profiler or a step cache installed) or a subclass's method; ``None``
    when it is ``own`` itself, so that ``sample`` runs its fast path without a detour."""
    found = module.__dict__.get(name)
    if found is None:
        found = getattr(type(module), name)
        return None if found is own else getattr(module, name)
    return None if found is own or getattr(found, "__func__", None) is own else found


def euler_override(module: nn.Module, int_method, own):
    """The ``_euler`` that ``sample`` calls instead of its fast path (as the original always
    calls ``self._euler``): an override of ``own`` when the call's method is Euler (the
    originals' ``int_method or self.int_method``), else ``None``."""
    if (int_method or module.int_method) != "euler":
        return None
    return override_of(module, "_euler", own)


# Our options of one ``sample`` call, while it runs an override of ``_euler`` (which takes the
# original's arguments only): our ``_euler``, when the override calls it, reads them here.
_PASSED_THROUGH = contextvars.ContextVar("flowmatch_fast_passed_through", default=None)


@contextlib.contextmanager
def passing_through(value):
    token = _PASSED_THROUGH.set(value)
    try:
        yield
    finally:
        _PASSED_THROUGH.reset(token)


def passed_through():
    """What the ``sample`` call running now passes through to our ``_euler``, or ``None``."""
    return _PASSED_THROUGH.get()


class BaseDiffusion(abc.ABC, nn.Module):
    """Base class of the samplers: stores ``x_dims`` as a list (``128`` -> ``[128]``)."""

    def __init__(self, x_dims: Union[int, Sequence[int]], *args, **kwargs):
        super().__init__()
        warn_unknown_keywords(type(self).__name__, kwargs, type(self))
        self.x_dims = _normalize_x_dims(x_dims)

    @abc.abstractmethod
    def sample(self, batch_size: int, step_fn: StepFn, *args, **kwargs):
        """Draw ``batch_size`` samples by integrating ``step_fn`` from noise to data."""


def capture_like(sample):
    """Decorates a class's ``capture``: it takes what ``sample`` takes (the same parameters,
    ``device`` defaulting to ``"cuda"``, no ``cuda_graph``) and a keyword-only ``warmup=2``;
    ``inspect.signature`` and ``help`` show that signature. The decorated body receives the
    bound arguments by name (``warmup`` among them), the extra positionals and unknown keywords
    aside (accepted and ignored as ``sample`` does, a misspelt option of ours warned once)."""
    params = [p.replace(default="cuda") if p.name == "device" else p
              for p in inspect.signature(sample).parameters.values() if p.name != "cuda_graph"]
    at = next(k for k, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD)
    params.insert(at, inspect.Parameter("warmup", inspect.Parameter.KEYWORD_ONLY, default=2,
                                        annotation=int))
    signature = inspect.Signature(params)

    def decorate(body):
        @functools.wraps(body)
        def capture(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            named = dict(bound.arguments)
            named.pop("args", None)
            warn_unknown_keywords(f"{type(self).__name__}.capture", named.pop("kwargs", {}),
                                  type(self))
            return body(**named)

        capture.__signature__ = signature.replace(
            return_annotation=inspect.signature(body).return_annotation)
        return capture

    return decorate
