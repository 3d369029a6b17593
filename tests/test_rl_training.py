"""The RL recipes' training side (``flowmatch_fast.alpamayo1_x_rl``): the training data with the
guidance drop mask, the losses, and ``_batched_sde_logprob`` (forward bitwise against the SPEC's
formula, gradients equal to autograd's through it), written from SPEC.md in tests/oracle.py."""

import pytest
import torch

from flowmatch_fast.alpamayo1_x_rl import FlowMatching
from oracle import spec_batched_sde_logprob, spec_training_data


@pytest.mark.parametrize("sampler", ["beta", "uniform"])
@pytest.mark.parametrize("guidance", [False, True])
def test_training_data_draws_as_the_recipes(sampler, guidance, case_rng):
    seed = case_rng.randrange(2**31)
    x = torch.randn(5, 4, 2)
    fm = FlowMatching("euler", sampler, 10, 0.3, 1.0, guidance, x_dims=(4, 2))
    torch.manual_seed(seed)
    data = fm.construct_training_data(x)
    torch.manual_seed(seed)
    t, noise, noisy = spec_training_data(x, sampler)
    drop = torch.rand(5) < 0.3 if guidance else None  # drawn after the noise
    assert data["x"] is x
    for got, want in ((data["timesteps"], t), (data["noise"], noise), (data["noisy_x"], noisy)):
        assert torch.equal(got, want) and got.shape == want.shape
    if guidance:
        assert torch.equal(data["is_drop_guidance"], drop)
    else:
        assert data["is_drop_guidance"] is None


def test_unknown_timestep_sampler_fails_where_the_recipes_fail():
    fm = FlowMatching("euler", "lognormal", x_dims=3)  # constructed, as the recipes do
    with pytest.raises(ValueError, match="Invalid time sampler: lognormal"):
        fm.construct_training_data(torch.zeros(2, 3))


def test_losses():
    fm = FlowMatching(x_dims=(4, 2), use_classifier_free_guidance=True)
    x = torch.randn(3, 4, 2)
    data = fm.construct_training_data(x)
    pred = torch.randn(3, 4, 2, dtype=torch.float64)
    loss = fm.compute_loss_from_pred(data, pred)  # no cast: PyTorch's promotion
    assert loss.dtype == torch.float64
    assert torch.equal(loss, torch.nn.functional.mse_loss(x - data["noise"], pred))
    seen = {}

    def field(*, x, t, guidance=None, is_drop_guidance=None):
        seen.update(guidance=guidance, drop=is_drop_guidance)
        return x * t

    torch.manual_seed(4)
    loss = fm.compute_loss_from_step_fn(x, field, guidance="cond")
    torch.manual_seed(4)
    again = fm.construct_training_data(x)
    drop = torch.rand(3) < fm.train_ignore_guidance_rate  # a second mask, drawn afresh
    assert seen["guidance"] == "cond" and torch.equal(seen["drop"], drop)
    assert torch.equal(loss, torch.nn.functional.mse_loss(x - again["noise"],
                                                          again["noisy_x"] * again["timesteps"]))


@pytest.mark.parametrize("with_ref", [False, True])
def test_batched_sde_logprob_forward_and_gradients(with_ref, case_rng):
    b, steps = case_rng.randint(1, 6), case_rng.randint(1, 8)
    dims = [case_rng.randint(1, 9) for _ in range(case_rng.randint(1, 2))]
    noise_level = case_rng.choice((0.7, 0.4, 1.3))
    gen = torch.Generator().manual_seed(case_rng.randrange(2**31))
    inner = torch.rand(steps - 1, generator=gen).sort().values * 0.98 + 0.01
    timesteps = torch.cat([torch.zeros(1), inner, torch.ones(1)]).repeat(b, 1)
    sample = torch.randn(b, steps + 1, *dims, generator=gen)
    output = torch.randn(b, steps, *dims, generator=gen).to(torch.bfloat16).float()
    ref = torch.randn(b, steps, *dims, generator=gen) if with_ref else None
    fm = FlowMatching(x_dims=dims)
    results = []
    for fn in (fm._batched_sde_logprob, spec_batched_sde_logprob):
        out = output.clone().requires_grad_(True)
        lp, kl = fn(out, timesteps, sample, ref, noise_level)
        loss = lp.sum() if kl is None else lp.sum() + 0.1 * kl.sum()
        (grad,) = torch.autograd.grad(loss, out)
        results.append((lp, kl, grad))
    (lp, kl, grad), (want_lp, want_kl, want_grad) = results
    assert torch.equal(lp, want_lp) and lp.shape == (b,)
    assert (kl is None) == (not with_ref)
    if with_ref:
        assert torch.equal(kl, want_kl) and kl.shape == (b,)
    assert torch.equal(grad, want_grad)


def test_batched_log_prob_scores_a_rollout_like_the_sampler():
    """The training side and the sampler agree on a stored rollout (not bitwise: one takes the
    mean over steps and elements at once, the other per step)."""
    fm = FlowMatching("sde", num_inference_steps=5, x_dims=(6, 2))
    outputs = []

    def field(*, x, t):
        v = torch.tanh(x) - t
        outputs.append(v)
        return v

    torch.manual_seed(2)
    info = fm.sample(3, field, return_info=True, noise_level=0.6)
    timesteps = info["timesteps"].repeat(3, 1)
    lp, _ = fm._batched_sde_logprob(torch.stack(outputs, 1), timesteps, info["all_steps"],
                                    noise_level=0.6)
    torch.testing.assert_close(lp, info["log_prob"], rtol=1e-5, atol=1e-5)
