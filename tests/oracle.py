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


for _cls, _module in ((OriginalR1, "alpamayo_r1.diffusion.flow_matching"),
                      (Original1_5, "alpamayo1_5.diffusion.flow_matching")):
    _cls.__name__ = _cls.__qualname__ = "FlowMatching"
    _cls.__module__ = _module
