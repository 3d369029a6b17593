"""Both classes instantiate through ``hydra.utils.instantiate`` from the keys Alpamayo's configs
carry, with ``_target_`` swapped to ours and ``x_dims`` passed at instantiation as the models do
(``FlowMatching(**cfg, x_dims=...)``). hydra-core is a test dependency."""

import warnings

import pytest
import torch

hydra_utils = pytest.importorskip("hydra.utils")
omegaconf = pytest.importorskip("omegaconf")

from flowmatch_fast import alpamayo1_5, alpamayo_r1  # noqa: E402

R1_CFG = {
    "_target_": "flowmatch_fast.alpamayo_r1.FlowMatching",
    "int_method": "euler",
    "train_timestep_sampler": "beta",
    "num_inference_steps": 10,
    "train_ignore_guidance_rate": 0.1,
    "inference_guidance_weight": 1.0,
}
V1_5_CFG = {
    "_target_": "flowmatch_fast.alpamayo1_5.FlowMatching",
    "int_method": "euler",
    "num_inference_steps": 10,
    "inference_guidance_weight": 2.0,
    "use_classifier_free_guidance": True,
}


@pytest.mark.parametrize("cfg, cls", [(R1_CFG, alpamayo_r1.FlowMatching),
                                      (V1_5_CFG, alpamayo1_5.FlowMatching)], ids=["r1", "1.5"])
def test_instantiate_from_the_config_keys(cfg, cls):
    conf = omegaconf.OmegaConf.create(cfg)
    fm = hydra_utils.instantiate(conf, x_dims=(64, 2))
    assert type(fm) is cls
    assert fm.x_dims == [64, 2]  # a plain list, also when hydra hands over a ListConfig
    for key, value in cfg.items():
        if key != "_target_":
            assert getattr(fm, key) == value, key
    assert fm.state_dict() == {}
    torch.manual_seed(0)
    args = (lambda *, x, t: x * t,) * (2 if cls is alpamayo1_5.FlowMatching else 1)
    assert fm.sample(2, *args).shape == (2, 64, 2)


def test_x_dims_from_the_config_as_a_listconfig():
    conf = omegaconf.OmegaConf.create({**V1_5_CFG, "x_dims": [16, 2]})
    fm = hydra_utils.instantiate(conf)
    assert fm.x_dims == [16, 2] and type(fm.x_dims) is list


# The release tooling remaps one variant's targets to another's class: the keys the other
# variant knows are ignored quietly, as the originals ignore them (issue 21).
RL_CFG = {**R1_CFG, "int_method": "euler", "use_classifier_free_guidance": False}


@pytest.mark.parametrize("cfg, target", [
    (R1_CFG, "flowmatch_fast.alpamayo1_5.FlowMatching"),
    (V1_5_CFG, "flowmatch_fast.alpamayo_r1.FlowMatching"),
    (RL_CFG, "flowmatch_fast.alpamayo_r1.FlowMatching"),
    (RL_CFG, "flowmatch_fast.alpamayo1_5.FlowMatching"),
], ids=["r1-as-1.5", "1.5-as-r1", "rl-as-r1", "rl-as-1.5"])
def test_a_config_of_another_variant_instantiates_silently(cfg, target):
    conf = omegaconf.OmegaConf.create({**cfg, "_target_": target})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm = hydra_utils.instantiate(conf, x_dims=(64, 2))
        fm.sample(2, lambda *, x, t: x * t, unguided_step_fn=lambda *, x, t: -x)
    assert type(fm).__module__ == target.rsplit(".", 1)[0].replace("alpamayo_r1", "flow_matching")
