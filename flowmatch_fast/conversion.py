"""``flowmatch_fast.convert(model)``: the Alpamayo samplers inside a loaded model replaced by ours,
in place, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` replaces batch norms.

Real models build their sampler from the checkpoint's config inside their constructor
(``self.diffusion = hydra.utils.instantiate(config.diffusion_cfg, x_dims=...)``), where changing
an import does not reach. A sampler is recognised by its class's name and module, so Alpamayo is
never imported; ours is built from its attributes and samples bitwise as it does.
"""

from __future__ import annotations

import importlib
import warnings

from torch import nn

from .base import ALPAMAYO_KEYWORDS, BaseDiffusion

__all__ = ["SAMPLERS", "convert"]

# (the original's class name, a package on its module's dotted path, our class as "module:name",
# imported when such a sampler is found).
SAMPLERS = (
    ("FlowMatching", "alpamayo_r1", "flowmatch_fast.flow_matching:FlowMatching"),
    ("FlowMatching", "alpamayo1_5", "flowmatch_fast.alpamayo1_5:FlowMatching"),
    ("FlowMatching", "alpamayo1_x_rl", "flowmatch_fast.alpamayo1_x_rl:FlowMatching"),
)


def convert(module: nn.Module, *, backend=None, cuda_graph: bool = False, max_graphs: int = 8):
    """Replace every Alpamayo sampler in ``module`` (R1's, 1.5's and the RL recipes'
    ``FlowMatching``) by ours.

    In place: each is swapped in its parent module; returns ``module``, or the new sampler when
    ``module`` is one itself. Ours gets the original's constructor attributes (``x_dims``,
    ``int_method``, ``num_inference_steps``, ...), its other public attributes and its
    train/eval mode, and the options given here (``backend``, ``cuda_graph``, ``max_graphs``,
    as our constructor takes them). A sampler of ours is left as it is, so a second call changes
    nothing. A class of that name and module that holds parameters, buffers or submodules, or no
    ``x_dims``, is not the released one: it is left as it is, with a warning.
    """
    options = {"backend": backend, "cuda_graph": cuda_graph, "max_graphs": max_graphs}
    return _convert(module, options, {})


def _convert(module: nn.Module, options: dict, done: dict) -> nn.Module:
    """``module`` converted; ``done`` maps each module seen to its result (a sampler shared by
    two parents stays shared)."""
    if id(module) in done:
        return done[id(module)]
    ours = _our_class(module)
    result = module if ours is None else _replacement(module, ours, options)
    done[id(module)] = result
    if result is module:
        for name, child in list(module.named_children()):
            new = _convert(child, options, done)
            if new is not child:
                module.add_module(name, new)
    return result


def _our_class(module: nn.Module):
    """Our class for an original sampler (by :data:`SAMPLERS`), else ``None``."""
    cls = type(module)
    if isinstance(module, BaseDiffusion):  # ours (e.g. flowmatch_fast.alpamayo1_5's)
        return None
    packages = cls.__module__.split(".")
    for name, package, ours in SAMPLERS:
        if cls.__name__ == name and package in packages:
            path, _, attr = ours.partition(":")
            return getattr(importlib.import_module(path), attr)
    return None


def _replacement(original: nn.Module, ours: type, options: dict) -> nn.Module:
    """Ours, built from ``original``'s attributes; ``original`` itself where it is not a
    released sampler."""
    what = f"{type(original).__module__}.{type(original).__name__}"
    state = {k: v for k, v in vars(original).items() if not k.startswith("_") and k != "training"}
    if original._parameters or original._buffers or original._modules or "x_dims" not in state:
        warnings.warn(f"flowmatch_fast.convert: {what} holds parameters, buffers or submodules, "
                      "or has no x_dims, unlike the released samplers; left as it is", UserWarning)
        return original
    # Every key any variant's constructor knows goes to ours (the others' it ignores quietly).
    new = ours(**{k: v for k, v in state.items() if k in ALPAMAYO_KEYWORDS}, **options)
    for k, v in state.items():  # the rest (e.g. attributes a user set) as they are
        if k not in vars(new):
            setattr(new, k, v)
    return new.train(original.training)
