"""The baseline: Alpamayo-R1's original Euler sampling loop, kept verbatim.

``original_sample`` is the loop of ``alpamayo_r1.diffusion.flow_matching.FlowMatching.sample``
written exactly as the original writes it (per-step ``dt`` and ``t`` views, ``x = x + dt * v``,
a final ``torch.stack`` of the trajectory). It is *not* part of the public API: it exists as the
reference that the demo and the benchmarks time ``FlowMatching.sample`` against, and that the
bitwise checks compare with (``torch.equal`` under the same seed). Do not "improve" it.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch


@torch.no_grad()
def original_sample(
    x_dims: Sequence[int],
    batch_size: int,
    step_fn,
    device: Union[torch.device, str] = torch.device("cpu"),
    inference_step: int = 10,
    return_all_steps: bool = False,
):
    """The original Euler loop (baseline, verbatim): noise at t=0 to data at t=1.

    Returns ``x`` ``[batch_size, *x_dims]``, or with ``return_all_steps=True`` the tuple
    ``(torch.stack(all_steps, dim=1), time_steps)``.
    """
    x_dims = list(x_dims)
    x = torch.randn(batch_size, *x_dims, device=device)
    time_steps = torch.linspace(0.0, 1.0, inference_step + 1, device=device)
    n_dim = len(x_dims)
    if return_all_steps:
        all_steps = [x]
    for i in range(inference_step):
        dt = time_steps[i + 1] - time_steps[i]
        dt = dt.view(1, *[1] * n_dim).expand(batch_size, *[1] * n_dim)
        t_start = time_steps[i].view(1, *[1] * n_dim).expand(batch_size, *[1] * n_dim)
        v = step_fn(x=x, t=t_start)
        x = x + dt * v
        if return_all_steps:
            all_steps.append(x)
    if return_all_steps:
        return torch.stack(all_steps, dim=1), time_steps
    return x
