"""The SPEC's algorithm, written plainly and independently of the package: the tests' oracle."""

import torch


def _euler(x, steps, velocity, device, return_all_steps):
    """The SPEC's loop from the initial state ``x``: ``x = x + dt * velocity(x, t)``."""
    batch_size, n = x.shape[0], x.dim() - 1
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device)
    states = [x]
    for i in range(steps):
        t = grid[i].view(1, *[1] * n).expand(batch_size, *[1] * n)
        dt = (grid[i + 1] - grid[i]).view(1, *[1] * n).expand(batch_size, *[1] * n)
        x = x + dt * velocity(x, t)
        states.append(x)
    if return_all_steps:
        return torch.stack(states, dim=1), grid
    return x


@torch.no_grad()
def spec_sample(x_dims, batch_size, step_fn, device="cpu", steps=10, return_all_steps=False):
    x_dims = [x_dims] if isinstance(x_dims, int) else list(x_dims)
    x = torch.randn(batch_size, *x_dims, device=device)
    return _euler(x, steps, lambda x, t: step_fn(x=x, t=t), device, return_all_steps)


@torch.no_grad()
def spec_sample_1_5(x_dims, batch_size, step_fn, unguided_step_fn=None, device="cpu", steps=10,
                    return_all_steps=False, guidance=False, weight=1.0, temperature=1.0):
    """SPEC, "Alpamayo 1.5's FlowMatching": noise times temperature; guided field first, then
    the unguided one, v = (1 - w) * vu + w * vg as PyTorch evaluates it; then x + dt * v."""
    x_dims = [x_dims] if isinstance(x_dims, int) else list(x_dims)
    x = torch.randn(batch_size, *x_dims, device=device) * temperature

    def velocity(x, t):
        if not guidance:
            return step_fn(x=x, t=t)
        vg = step_fn(x=x, t=t)
        vu = unguided_step_fn(x=x, t=t)
        return (1 - weight) * vu + weight * vg

    return _euler(x, steps, velocity, device, return_all_steps)


def spec_training_data(x, sampler="beta"):
    b = x.shape[0]
    if sampler == "uniform":
        t = torch.rand((b,), device=x.device)
    else:
        beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
        t = beta.sample((b,)).to(x.device)
        t = 0.999 - t * 0.999
    t = t.view(b, *[1] * (x.dim() - 1))
    noise = torch.randn_like(x)
    return t, noise, t * x + (1 - t) * noise

