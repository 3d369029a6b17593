"""Where the noise comes from: ``generator=`` checked once, and the draw itself.

A generator is ``None`` (PyTorch's default generator of the device), one ``torch.Generator``, or
a list with one generator per batch row: the rules of diffusers' ``randn_tensor``, which the RL
recipes draw with and which Alpamayo's pipelines follow. Row ``i`` of a per-row draw is
``torch.randn((1, *dims), generator=generators[i])``, so it depends on that generator alone: a
batch split across processes gives the same rows as one process. A CPU generator with a CUDA
device draws on the CPU, then moves the result (the same numbers as on a CPU-only machine).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .arguments import same_device


def check_generators(generator, batch_size: int, device: torch.device,
                     name: str = "generator") -> Optional[tuple]:
    """``generator=`` as ``None`` or a tuple of generators: one (it draws the whole batch) or one
    per row. Raises for what ``randn_tensor`` would misuse: a list of another length (diffusers
    would silently use its first ``batch_size`` entries), generators on mixed devices, a
    generator on another device than the sampling one (a CPU generator is fine anywhere)."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        gens = (generator,)
    elif isinstance(generator, (list, tuple)):
        gens = tuple(generator)
        bad = [type(g).__name__ for g in gens if not isinstance(g, torch.Generator)]
        if bad or not gens:
            raise TypeError(f"{name} must be a torch.Generator or a list of them (one per row); "
                            f"got a list holding {bad[0] if bad else 'nothing'}")
        if len(gens) != batch_size and not (len(gens) == 1 and batch_size == 1):
            raise ValueError(f"{name} is a list of {len(gens)} generators; expected one per "
                             f"row of the batch, {batch_size}")
        devices = {str(g.device) for g in gens}
        if len(devices) > 1:
            raise ValueError(f"{name} holds generators on mixed devices ({sorted(devices)}); "
                             "give them all on one device")
    else:
        raise TypeError(f"{name} must be a torch.Generator or a list of them (one per row), got "
                        f"{type(generator).__name__}")
    gen_device = gens[0].device
    if gen_device.type != "cpu" and not same_device(gen_device, device):
        raise ValueError(f"{name} is on {gen_device}; expected generators on the sampling "
                         f"device {device} or on the CPU")
    return gens


def per_row(generators: Optional[Sequence[torch.Generator]]) -> bool:
    """Whether ``generators`` draws one row each (a list of one is a single generator)."""
    return generators is not None and len(generators) > 1


def randn(shape, generators: Optional[Sequence[torch.Generator]], device: torch.device,
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``randn_tensor(shape, generator, device, dtype)``: standard normal noise of ``shape``.

    ``generators`` as :func:`check_generators` returns it. Without one (or with one on the
    device) this is exactly ``torch.randn(shape, generator=..., device=device, dtype=dtype)``.
    Per-row generators draw ``shape[0]`` rows from the first ``shape[0]`` of them (a field of
    batch 1 gives noise of batch 1, as the recipes draw it).
    """
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    moved = on_host(generators, device)
    draw_on = torch.device("cpu") if moved else device
    if not per_row(generators):
        out = torch.randn(shape, generator=generators[0], device=draw_on, dtype=dtype)
    else:
        row = (1, *shape[1:])
        out = torch.cat([torch.randn(row, generator=generators[i], device=draw_on, dtype=dtype)
                         for i in range(shape[0])])
    return out.to(device) if moved else out


def on_host(generators: Optional[Sequence[torch.Generator]], device: torch.device) -> bool:
    """Whether the draw happens on the CPU for a CUDA ``device`` (then it cannot be captured)."""
    return generators is not None and device.type != "cpu" and generators[0].device.type == "cpu"


def graph_safe(generator) -> bool:
    """Whether a call's ``generator=`` (as given) can be replayed by a cached CUDA graph: none,
    or CUDA generators only (a CPU generator draws on the host)."""
    if generator is None:
        return True
    gens = generator if isinstance(generator, (list, tuple)) else (generator,)
    return all(isinstance(g, torch.Generator) and g.device.type == "cuda" for g in gens)


def pattern(generators: Optional[Sequence[torch.Generator]]):
    """What a cached graph of a call bakes in of its generators: how many, and which positions
    share one (a row list may repeat a generator: those rows draw from it in turn)."""
    if generators is None:
        return None
    first: dict = {}
    return tuple(first.setdefault(id(g), k) for k, g in enumerate(generators))


def private_twins(generators: Sequence[torch.Generator]) -> tuple:
    """Generators of the graph cache's own, one per distinct generator of ``generators`` and in
    the same positions: a cached graph registers these, and each call copies its own
    generators' states in and out (``CapturedSampler.__call__``), so that a rollout's fresh
    generators replay the same graph."""
    twins: dict = {}
    return tuple(twins.setdefault(id(g), torch.Generator(g.device)) for g in generators)
