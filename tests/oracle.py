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


def _guided_velocity(step_fn, unguided_step_fn, guidance, weight):
    """SPEC's velocity of Alpamayo 1.5 and the RL recipes: the field, or with guidance the guided
    field first, then the unguided one, ``(1 - w) * vu + w * vg`` as PyTorch evaluates it."""
    def velocity(x, t):
        if not guidance:
            return step_fn(x=x, t=t)
        vg = step_fn(x=x, t=t)
        vu = unguided_step_fn(x=x, t=t)
        return (1 - weight) * vu + weight * vg

    return velocity


@torch.no_grad()
def spec_sample_1_5(x_dims, batch_size, step_fn, unguided_step_fn=None, device="cpu", steps=10,
                    return_all_steps=False, guidance=False, weight=1.0, temperature=1.0):
    """SPEC, "Alpamayo 1.5's FlowMatching": noise times temperature; guided field first, then
    the unguided one, v = (1 - w) * vu + w * vg as PyTorch evaluates it; then x + dt * v."""
    x_dims = [x_dims] if isinstance(x_dims, int) else list(x_dims)
    x = torch.randn(batch_size, *x_dims, device=device) * temperature

    velocity = _guided_velocity(step_fn, unguided_step_fn, guidance, weight)
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

    velocity = _guided_velocity(step_fn, unguided_step_fn, guidance, weight)

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


# ------------------------------------------------------------------------------------------------
# Stand-ins of the original classes, written from the SPEC: the same class name, module, constructor,
# attributes, `sample` (with the originals' `or` fall-backs) and private helpers, over the loops
# above. Tests convert them (flowmatch_fast.convert), wrap their `_euler`, and compare.

class _Original(torch.nn.Module):
    def __init__(self, x_dims, *args, **kwargs):
        super().__init__()
        self.x_dims = [x_dims] if isinstance(x_dims, int) else list(x_dims)


class OriginalR1(_Original):
    """Alpamayo-R1's ``FlowMatching`` (SPEC: "Classes", "sample", "Training helpers")."""

    def __init__(self, int_method="euler", train_timestep_sampler="beta", num_inference_steps=10,
                 train_ignore_guidance_rate=0.1, inference_guidance_weight=1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.int_method = int_method
        self.train_timestep_sampler = train_timestep_sampler
        self.num_inference_steps = num_inference_steps
        self.train_ignore_guidance_rate = train_ignore_guidance_rate
        self.inference_guidance_weight = inference_guidance_weight
        if train_timestep_sampler == "beta":
            self.beta_dist = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
            self.beta_scale_constant = 0.999

    @torch.no_grad()
    def sample(self, batch_size, step_fn, device=torch.device("cpu"), return_all_steps=False,
               inference_step=None, int_method=None, *args, **kwargs):
        int_method = int_method or self.int_method
        inference_step = inference_step or self.num_inference_steps
        if int_method != "euler":
            raise ValueError(int_method)
        return self._euler(batch_size=batch_size, step_fn=step_fn, device=device,
                           return_all_steps=return_all_steps, inference_step=inference_step)

    def _euler(self, batch_size, step_fn, device=torch.device("cpu"), return_all_steps=False,
               inference_step=None):
        return spec_sample(self.x_dims, batch_size, step_fn, device, inference_step,
                           return_all_steps)


class _Original1_5Base(_Original):
    def __init__(self, x_dims, use_classifier_free_guidance=False, *args, **kwargs):
        super().__init__(x_dims)
        self.use_classifier_free_guidance = use_classifier_free_guidance


class Original1_5(_Original1_5Base):
    """Alpamayo 1.5's ``FlowMatching`` (SPEC: "Alpamayo 1.5's FlowMatching")."""

    def __init__(self, int_method="euler", num_inference_steps=10, inference_guidance_weight=1.0,
                 *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.int_method = int_method
        self.num_inference_steps = num_inference_steps
        self.inference_guidance_weight = inference_guidance_weight

    @torch.no_grad()
    def sample(self, batch_size, step_fn, unguided_step_fn=None, device=torch.device("cpu"),
               return_all_steps=False, inference_step=None, int_method=None,
               use_classifier_free_guidance=None, inference_guidance_weight=None, temperature=1.0,
               *args, **kwargs):
        int_method = int_method or self.int_method
        inference_step = inference_step or self.num_inference_steps
        if use_classifier_free_guidance is None:
            use_classifier_free_guidance = self.use_classifier_free_guidance
        if inference_guidance_weight is None:
            inference_guidance_weight = self.inference_guidance_weight
        if use_classifier_free_guidance and unguided_step_fn is None:
            raise ValueError("unguided_step_fn")
        if int_method != "euler":
            raise ValueError(int_method)
        return self._euler(batch_size=batch_size, step_fn=step_fn,
                           unguided_step_fn=unguided_step_fn, device=device,
                           return_all_steps=return_all_steps, inference_step=inference_step,
                           inference_guidance_weight=inference_guidance_weight,
                           use_classifier_free_guidance=use_classifier_free_guidance,
                           temperature=temperature)

    @staticmethod
    def _guided_v(step_fn, x, t, unguided_step_fn, inference_guidance_weight):
        vg = step_fn(x=x, t=t)
        vu = unguided_step_fn(x=x, t=t)
        return (1 - inference_guidance_weight) * vu + inference_guidance_weight * vg

    def _euler(self, batch_size, step_fn, unguided_step_fn=None, device=torch.device("cpu"),
               return_all_steps=False, inference_step=None, inference_guidance_weight=None,
               use_classifier_free_guidance=None, temperature=1.0, generator=None):
        x = torch.randn(batch_size, *self.x_dims, device=device, generator=generator) * temperature

        def velocity(x, t):
            if use_classifier_free_guidance:
                return self._guided_v(step_fn=step_fn, x=x, t=t,
                                      unguided_step_fn=unguided_step_fn,
                                      inference_guidance_weight=inference_guidance_weight)
            return step_fn(x=x, t=t)

        return _euler(x, inference_step, velocity, device, return_all_steps)


def _recipes_integrator(method):
    """The RL recipes' ``_euler`` / ``_midpoint`` (one signature, two methods)."""
    def integrator(self, batch_size, step_fn, unguided_step_fn=None, device=torch.device("cpu"),
                   return_all_steps=False, inference_step=None, inference_guidance_weight=None,
                   use_classifier_free_guidance=None, temperature=1.0, generator=None):
        _, _, states, grid = self._loop(method, batch_size, step_fn, unguided_step_fn, device,
                                        inference_step or self.num_inference_steps,
                                        inference_guidance_weight, use_classifier_free_guidance,
                                        temperature, generator)
        return (states, grid) if return_all_steps else states[:, -1]

    integrator.__name__ = f"_{method}"
    return integrator


class OriginalRL(OriginalR1):
    """The RL recipes' ``FlowMatching`` (SPEC: "The RL recipes' FlowMatching"): R1's constructor
    and ``use_classifier_free_guidance``, the ``or`` fall-backs, ``sample`` dispatching to
    ``_euler`` / ``_midpoint`` / ``_sde`` with the recipes' arguments, ``_guided_v`` making the
    guided velocity. (A subclass of the R1 stand-in for its constructor only.)"""

    def __init__(self, int_method="euler", train_timestep_sampler="beta", num_inference_steps=10,
                 train_ignore_guidance_rate=0.1, inference_guidance_weight=1.0,
                 use_classifier_free_guidance=False, *args, **kwargs):
        super().__init__(int_method, train_timestep_sampler, num_inference_steps,
                         train_ignore_guidance_rate, inference_guidance_weight, *args, **kwargs)
        self.use_classifier_free_guidance = use_classifier_free_guidance

    @torch.no_grad()
    def sample(self, batch_size, step_fn, unguided_step_fn=None, device=torch.device("cpu"),
               return_all_steps=False, inference_step=None, timesteps=None, int_method=None,
               inference_guidance_weight=None, use_classifier_free_guidance=None, temperature=1.0,
               *args, **kwargs):
        int_method = int_method or self.int_method
        weight = inference_guidance_weight or self.inference_guidance_weight
        use = (self.use_classifier_free_guidance if use_classifier_free_guidance is None
               else use_classifier_free_guidance)
        steps = self.num_inference_steps if inference_step is None else inference_step
        common = dict(batch_size=batch_size, step_fn=step_fn, unguided_step_fn=unguided_step_fn,
                      device=device, inference_guidance_weight=weight,
                      use_classifier_free_guidance=use, temperature=temperature,
                      generator=kwargs.get("generator"))
        if int_method in ("euler", "midpoint"):
            return getattr(self, "_" + int_method)(return_all_steps=return_all_steps,
                                                   inference_step=steps, **common)
        x, log_prob, all_steps, grid = self._sde(
            batch_size, step_fn, unguided_step_fn, device, steps, timesteps, weight,
            noise_level=kwargs.get("noise_level", 0.7), samples_list=kwargs.get("samples_list"),
            generator=kwargs.get("generator"), sde_type=kwargs.get("sde_type", "sde"),
            use_classifier_free_guidance=use, temperature=temperature)
        if kwargs.get("return_info", False):
            return dict(x=x, log_prob=log_prob, all_steps=all_steps, timesteps=grid)
        return (all_steps, grid) if return_all_steps else x

    @staticmethod
    def _guided_v(step_fn, x, t, unguided_step_fn, inference_guidance_weight):
        vg = step_fn(x=x, t=t)
        vu = unguided_step_fn(x=x, t=t)
        return (1 - inference_guidance_weight) * vu + inference_guidance_weight * vg

    def _loop(self, method, batch_size, step_fn, unguided_step_fn, device, inference_step,
              inference_guidance_weight, use_classifier_free_guidance, temperature, generator,
              **sde):
        def guided(*, x, t):
            return self._guided_v(step_fn=step_fn, x=x, t=t, unguided_step_fn=unguided_step_fn,
                                  inference_guidance_weight=inference_guidance_weight)

        return spec_sample_rl(self.x_dims, batch_size,
                              guided if use_classifier_free_guidance else step_fn, None, device,
                              inference_step, method, False, 1.0, temperature, generator, **sde)

    _euler = _recipes_integrator("euler")
    _midpoint = _recipes_integrator("midpoint")

    def _sde(self, batch_size, step_fn, unguided_step_fn=None, device=torch.device("cpu"),
             inference_step=None, timesteps=None, inference_guidance_weight=None, noise_level=0.7,
             samples_list=None, generator=None, sde_type="sde", use_classifier_free_guidance=False,
             temperature=1.0):
        return self._loop("sde", batch_size, step_fn, unguided_step_fn, device, inference_step,
                          inference_guidance_weight, use_classifier_free_guidance, temperature,
                          generator, noise_level=noise_level, timesteps=timesteps,
                          samples_list=samples_list)


for _cls, _module in ((OriginalR1, "alpamayo_r1.diffusion.flow_matching"),
                      (Original1_5, "alpamayo1_5.diffusion.flow_matching"),
                      (OriginalRL, "alpamayo1_x_rl.diffusion.flow_matching")):
    _cls.__name__ = _cls.__qualname__ = "FlowMatching"
    _cls.__module__ = _module


class Policy(torch.nn.Module):
    """A model as Alpamayo's are built: an expert, a projection, the sampler from the config."""

    def __init__(self, diffusion):
        super().__init__()
        self.action_out_proj = torch.nn.Linear(4, 2)
        self.diffusion = diffusion
