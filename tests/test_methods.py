"""Beyond the original: midpoint / heun / rk4, guidance, time grids, generator= and noise=.

Runs on the backend that ``FLOWMATCH_FAST_BACKEND`` selects; ``test_backend_parity`` compares it
bitwise with the plain-torch backend. In the kernel passes the parity cases also count the
kernels' launches (``fused_launches``): one per stage of every step.
"""

import math

import numpy as np
import pytest
import torch

from flowmatch_fast import FlowMatching, integrators
from fields import make_field
from oracle import spec_sample

METHODS = ("euler", "midpoint", "heun", "rk4")
ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def linear_field(a=-1.3, b=0.8):
    """dx/dt = (a + b t) x, solved exactly by x(1) = x(0) exp(a + b / 2).

    The coefficient is computed in x's dtype (t itself is float32 by contract).
    """
    return lambda *, x, t: (a + b * t.to(x.dtype)) * x


@pytest.mark.parametrize("method", METHODS)
def test_convergence_order(method):
    x0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = x0 * math.exp(-1.3 + 0.8 / 2)
    fm = FlowMatching(x_dims=4, int_method=method)
    counts = [4, 8, 16, 32, 64]  # dyadic: every grid point and stage time exact in float32
    errors = []
    for steps in counts:
        out = fm.sample(3, linear_field(), inference_step=steps, noise=x0)
        assert out.dtype == torch.float64
        errors.append((out - exact).abs().max().item())
    slope = -np.polyfit(np.log(counts), np.log(errors), 1)[0]
    assert abs(slope - ORDERS[method]) < 0.25, f"{method}: order {slope:.2f}, errors {errors}"


def _guided(f_cond, f_uncond):
    def field(*, x, t):
        b = x.shape[0] // 2
        return torch.cat([f_cond(x=x[:b], t=t[:b]), f_uncond(x=x[b:], t=t[b:])])
    return field


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backend_parity(device, method, dtype, case_rng, fused_launches):
    """The selected backend against the plain-torch one, bitwise, with and without guidance."""
    seed = case_rng.randrange(2**31)
    dims = [case_rng.randint(1, 9), case_rng.randint(1, 5)]
    batch = case_rng.randint(1, 20)
    for guidance, weight in ((False, None), (True, 1.0), (True, 2.5)):
        results = []
        for backend in (None, "torch"):
            fm = FlowMatching(x_dims=dims, int_method=method, num_inference_steps=5, backend=backend)
            cond = make_field("contiguous", dtype, dims)
            field = _guided(cond, make_field("permuted", dtype, dims)) if guidance else cond
            torch.manual_seed(seed)
            results.append(fm.sample(batch, field, device=device, return_all_steps=True,
                                     guidance=guidance, guidance_weight=weight))
        msg = f"{method} {dtype} guidance={guidance} w={weight} dims={dims} b={batch} seed={seed}"
        assert torch.equal(results[0][0], results[1][0]), msg
        fused_launches.expect(5 * len(integrators.METHODS[method]), msg)  # the torch run: none


@pytest.mark.parametrize("method", METHODS)
def test_guidance_weight_one_is_plain_sampling(device, method, fused_launches):
    dims = (16, 2)
    cond = make_field("contiguous", torch.bfloat16, dims)
    fm = FlowMatching(x_dims=dims, int_method=method, num_inference_steps=6)
    torch.manual_seed(5)
    plain = fm.sample(4, cond, device=device)
    torch.manual_seed(5)
    guided = fm.sample(4, _guided(cond, lambda *, x, t: -3 * x), device=device, guidance=True)
    assert torch.equal(plain, guided)
    fused_launches.expect(2 * 6 * len(integrators.METHODS[method]), method)


def test_guidance_formula_and_default_weight(device, fused_launches):
    dims = (8, 3)
    fc = lambda *, x, t: torch.sin(x) + t  # noqa: E731
    fu = lambda *, x, t: 0.5 * x  # noqa: E731
    fm = FlowMatching(x_dims=dims, num_inference_steps=4, inference_guidance_weight=3.0)
    torch.manual_seed(9)
    got = fm.sample(5, _guided(fc, fu), device=device, guidance=True)
    torch.manual_seed(9)
    w = 3.0
    x = torch.randn(5, *dims, device=device)
    grid = torch.linspace(0, 1, 5, device=device)
    for i in range(4):
        t = grid[i].view(1, 1, 1).expand(5, 1, 1)
        vc, vu = fc(x=x, t=t), fu(x=x, t=t)
        x = x + (grid[i + 1] - grid[i]).view(1, 1, 1).expand(5, 1, 1) * (vu + w * (vc - vu))
    assert torch.equal(got, x)
    fused_launches.expect(4, "guided euler")
    with pytest.raises(ValueError, match="needs guidance=True"):
        fm.sample(5, fc, guidance_weight=2.0)


def _textbook_rk4(field, x, grid):
    """Classic rk4 over ``grid`` in plain torch, in the dtype of ``x`` and ``grid``: stage j
    evaluates at ``x + c_j dt k_{j-1}``, ``t + c_j dt`` (c = 0, 1/2, 1/2, 1), weights 1, 2, 2, 1."""
    for t, dt in zip(grid[:-1], grid.diff()):
        k = [field(x=x, t=t)]
        for c in (0.5, 0.5, 1.0):
            k.append(field(x=x + c * dt * k[-1], t=t + c * dt))
        x = x + dt / 6 * (k[0] + 2 * k[1] + 2 * k[2] + k[3])
    return x


def test_rk4_error_within_twice_plain_torch_float32(device):
    """Fused rk4 in float32 against float64 truth: at most 2x the error of a naive torch rk4."""
    a, b = -1.3, 0.8
    field = linear_field(a, b)
    x0 = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(device)
    steps = 7
    fm = FlowMatching(x_dims=32, int_method="rk4", num_inference_steps=steps)
    ours = fm.sample(64, field, device=device, noise=x0)
    grid = torch.linspace(0, 1, steps + 1, device=device)
    x = _textbook_rk4(field, x0.clone(), grid)  # plain torch, float32
    truth = _textbook_rk4(field, x0.double(), grid.double())  # the same method in float64
    err_ours = (ours.double() - truth).norm() / truth.norm()
    err_plain = (x.double() - truth).norm() / truth.norm()
    assert err_ours <= 2 * err_plain + 1e-12, (err_ours.item(), err_plain.item())


# ----------------------------------------------------------------------------- time grids
def test_explicit_uniform_grid_is_the_default(device, fused_launches):
    fm = FlowMatching(x_dims=(6, 2), num_inference_steps=8)
    field = make_field("contiguous", torch.float32, [6, 2])
    torch.manual_seed(2)
    a = fm.sample(3, field, device=device, return_all_steps=True)
    torch.manual_seed(2)
    b = fm.sample(3, field, device=device, return_all_steps=True,
                  timesteps=torch.linspace(0, 1, 9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    fused_launches.expect(2 * 8, "default and explicit grid")


def test_nonuniform_grid_matches_the_loop(device, fused_launches):
    ts = [0.0, 0.05, 0.2, 0.5, 0.9, 1.0]
    fm = FlowMatching(x_dims=5)
    field = make_field("strided", torch.bfloat16, [5])
    torch.manual_seed(4)
    states, grid = fm.sample(2, field, device=device, timesteps=ts, return_all_steps=True)
    torch.manual_seed(4)
    x = torch.randn(2, 5, device=device)
    g = torch.tensor(ts, device=device)
    for i in range(5):
        x = x + (g[i + 1] - g[i]).view(1, 1).expand(2, 1) * field(x=x, t=g[i].view(1, 1).expand(2, 1))
    assert torch.equal(states[:, -1], x) and torch.equal(grid, g)
    fused_launches.expect(5, f"grid {ts}")


def test_shift():
    fm = FlowMatching(x_dims=3, num_inference_steps=10)
    field = lambda *, x, t: -x  # noqa: E731
    torch.manual_seed(0)
    plain = fm.sample(2, field, return_all_steps=True)
    torch.manual_seed(0)
    same = fm.sample(2, field, return_all_steps=True, shift=1.0)
    assert torch.equal(plain[0], same[0])
    _, grid = fm.sample(2, field, return_all_steps=True, shift=3.0)
    assert grid[0].item() == 0.0 and grid[-1].item() == 1.0
    assert bool((grid[1:] > grid[:-1]).all())
    s = 1 - torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = 1 - 3 * s / (1 + 2 * s)
    assert torch.allclose(grid.double(), expected, atol=1e-6)
    assert grid[1] < 0.1 / 2, "shift > 1 must spend more steps near the noise end"


def _refused(x_dims, exc, match, **kwargs):
    """``sample(2, field, **kwargs)`` of a sampler of ``x_dims`` raises ``exc`` matching ``match``."""
    with pytest.raises(exc, match=match):
        FlowMatching(x_dims=x_dims).sample(2, lambda *, x, t: x, **kwargs)


@pytest.mark.parametrize("bad, match", [
    ([0.0, 0.5, 0.4, 1.0], "strictly increasing"),
    ([0.1, 0.5, 1.0], "start at 0 and end at 1"),
    ([0.0, 0.5, 0.9], "start at 0 and end at 1"),
    ([0.0], "T \\+ 1 >= 2"),
    (torch.zeros(2, 2), "1-D"),
    (torch.tensor([0, 1]), "floating point"),
    (torch.linspace(0, 1, 3, device="meta"), "expected the sampling device"),
])
def test_bad_timesteps(bad, match):
    _refused(2, ValueError, match, timesteps=bad)


def test_timesteps_and_steps_must_agree():
    _refused(2, ValueError, "must agree", timesteps=[0.0, 0.5, 1.0], inference_step=3)
    _refused(2, ValueError, "not both", timesteps=[0.0, 1.0], shift=2.0)
    for shift in (0, -1.0, float("nan"), float("inf"), True):
        _refused(2, ValueError, "shift", shift=shift)


# ----------------------------------------------------------------------------- noise, generator
def test_generator_and_noise_reproduce(device):
    fm = FlowMatching(x_dims=(4, 2), num_inference_steps=5, int_method="heun")
    field = make_field("contiguous", torch.float32, [4, 2])
    g1 = torch.Generator(device=device).manual_seed(123)
    g2 = torch.Generator(device=device).manual_seed(123)
    a = fm.sample(3, field, device=device, generator=g1)
    b = fm.sample(3, field, device=device, generator=g2)
    assert torch.equal(a, b)
    torch.manual_seed(77)
    seeded = fm.sample(3, field, device=device, return_all_steps=True)
    torch.manual_seed(77)
    noise = torch.randn(3, 4, 2, device=device)
    before = noise.clone()
    given = fm.sample(3, field, device=device, noise=noise, return_all_steps=True)
    assert torch.equal(seeded[0], given[0])
    assert torch.equal(noise, before), "noise handed to us must not be written"


def test_noise_euler_matches_oracle(device, fused_launches):
    fm = FlowMatching(x_dims=(7,), num_inference_steps=9)
    torch.manual_seed(3)
    ref = spec_sample((7,), 4, make_field("mixed", torch.float64, [7]), device=device, steps=9)
    torch.manual_seed(3)
    noise = torch.randn(4, 7, device=device)
    assert torch.equal(fm.sample(4, make_field("mixed", torch.float64, [7]), device=device,
                                 noise=noise), ref)
    fused_launches.expect(9, "noise=, a mixed-dtype field")


@pytest.mark.parametrize("noise, exc, match", [
    (torch.zeros(3, 4), ValueError, r"shape \(2, 4\)"),
    (torch.zeros(2, 4, dtype=torch.float16), ValueError, "float32 or float64"),
    (torch.zeros(2, 4, device="meta"), ValueError, "sampling device"),
    (torch.zeros(4, 2).t(), ValueError, "contiguous"),
    ([[0.0] * 4] * 2, TypeError, "torch.Tensor"),
])
def test_bad_noise(noise, exc, match):
    _refused(4, exc, match, noise=noise)


def test_bad_generator():
    _refused(4, TypeError, "torch.Generator", generator=123)
    _refused(4, ValueError, "not both", generator=torch.Generator(), noise=torch.zeros(2, 4))


@pytest.mark.parametrize("method", METHODS)
def test_all_steps_and_field_inputs_for_methods(device, method):
    seen = []

    def field(*, x, t):
        assert x.is_contiguous() and t.shape == (x.shape[0], 1, 1) and t.dtype == torch.float32
        seen.append((x, x.clone()))
        return torch.cos(x) * t

    fm = FlowMatching(x_dims=(3, 2), num_inference_steps=4, int_method=method)
    torch.manual_seed(0)
    states, grid = fm.sample(5, field, device=device, return_all_steps=True, guidance=True,
                             guidance_weight=1.5)
    torch.manual_seed(0)
    final = fm.sample(5, field, device=device, guidance=True, guidance_weight=1.5)
    assert states.shape == (5, 5, 3, 2) and torch.equal(states[:, -1], final)
    assert len(seen) == 2 * 4 * len(__import__("flowmatch_fast").integrators.METHODS[method])
    assert all(torch.equal(a, b) for a, b in seen), "a state handed to the field was written later"
