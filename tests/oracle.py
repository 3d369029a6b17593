"""The SPEC's algorithm, written plainly and independently of the package: the tests' oracle."""

import math

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



def spec_randn(shape, generator, device, dtype=None):
    """SPEC's noise of the RL recipes (diffusers' ``randn_tensor``): no generator or one, a plain
    ``torch.randn``; a list, one ``torch.randn`` of ``(1, *shape[1:])`` per row, concatenated; a
    CPU generator with a CUDA device draws on the CPU, then moves."""
    device = torch.device(device)
    gens = generator if isinstance(generator, list) else [generator]
    on = "cpu" if gens[0] is not None and gens[0].device.type == "cpu" else device
    if isinstance(generator, list) and len(generator) > 1:
        rows = [torch.randn((1, *shape[1:]), generator=generator[i], device=on, dtype=dtype)
                for i in range(shape[0])]
        return torch.cat(rows).to(device)
    return torch.randn(shape, generator=gens[0], device=on, dtype=dtype).to(device)


@torch.no_grad()
def spec_sample_rl(x_dims, batch_size, step_fn, unguided_step_fn=None, device="cpu", steps=10,
                   method="euler", guidance=False, weight=1.0, temperature=1.0, generator=None,
                   noise_level=0.7, timesteps=None, samples_list=None):
    """SPEC, "The RL recipes' FlowMatching": ``(x, log_prob or None, states [B, T+1, ...],
    grid)``. Euler and midpoint over ``linspace`` views; the SDE over a grid of Python floats,
    in float32, with each step's noise drawn (or, replaying, the stored next sample)."""
    x_dims = [x_dims] if isinstance(x_dims, int) else list(x_dims)
    n = len(x_dims)

    def velocity(x, t):
        if not guidance:
            return step_fn(x=x, t=t)
        vg = step_fn(x=x, t=t)
        vu = unguided_step_fn(x=x, t=t)
        return (1 - weight) * vu + weight * vg

    if samples_list is not None:
        x = samples_list[0]
    else:
        x = spec_randn((batch_size, *x_dims), generator, device) * temperature
    states = [x]
    if method in ("euler", "midpoint"):
        grid = torch.linspace(0.0, 1.0, steps + 1, device=device)
        for i in range(steps):
            t0 = grid[i].view(1, *[1] * n).expand(batch_size, *[1] * n)
            t1 = grid[i + 1].view(1, *[1] * n).expand(batch_size, *[1] * n)
            if method == "euler":
                x = x + (t1 - t0) * velocity(x, t0)
            else:
                x_mid = x + velocity(x, t0) * (t1 - t0) / 2
                x = x + (t1 - t0) * velocity(x_mid, t0 + (t1 - t0) / 2)
            states.append(x)
        return x, None, torch.stack(states, dim=1), grid
    grid = list(timesteps) if timesteps is not None else torch.linspace(0, 1, steps + 1).tolist()
    log_probs = []
    for i in range(steps):
        t = grid[i] * torch.ones(batch_size, *[1] * n, device=device)
        v = velocity(x, t).float()
        dt = grid[i + 1] - grid[i]
        sigma = torch.tensor(1 - grid[i], device=device, dtype=torch.float32)
        std = torch.sqrt(sigma / (1 - sigma.clip(max=1 - grid[1]))) * noise_level
        mean = (x.float() * (1 - std**2 / (2 * sigma) * dt)
                + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt)
        scale = std * math.sqrt(dt)
        if samples_list is None:
            nxt = mean + scale * spec_randn(v.shape, generator, device, torch.float32)
        else:
            nxt = samples_list[i + 1]
        lp = (-((nxt - mean) ** 2) / (2 * scale**2) - torch.log(scale)
              - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
        log_probs.append(lp.mean(dim=tuple(range(1, lp.ndim))))
        x = nxt
        states.append(x)
    return (x, torch.stack(log_probs, dim=1).mean(dim=1), torch.stack(states, dim=1),
            torch.tensor(grid, device=device, dtype=torch.float32))


def spec_batched_sde_logprob(model_output, timesteps, sample, ref_model_output=None,
                             noise_level=0.7):
    """SPEC's ``_batched_sde_logprob``: every step at once, differentiable in ``model_output``."""
    t, t_next = timesteps[:, :-1], timesteps[:, 1:]
    sigma, dt = 1 - t, t_next - t
    shape = [sample.shape[0], -1] + [1] * (sample.dim() - 2)
    std = torch.sqrt(sigma / (1 - sigma.clip(max=1 - timesteps[0, 1].item()))) * noise_level
    mean = (sample[:, :-1] * (1 - std**2 / (2 * sigma) * dt).reshape(shape)
            + model_output * ((1 + std**2 * (1 - sigma) / (2 * sigma)) * dt).reshape(shape))
    scale = std * torch.sqrt(dt)
    lp = (-((sample[:, 1:].detach() - mean) ** 2) / (2 * scale**2).reshape(shape)
          - torch.log(scale).reshape(shape) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    lp = lp.mean(dim=tuple(range(1, lp.ndim)))
    if ref_model_output is None:
        return lp, None
    kl = ((dt / 2 * (std * t / 2 / (1 - t) + 1 / std) ** 2).reshape(shape)
          * (ref_model_output - model_output) ** 2)
    return lp, kl.mean(dim=tuple(range(1, kl.ndim)))
