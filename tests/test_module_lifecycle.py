"""What training and serving code does to a module holding a FlowMatching: deep copies (EMA),
pickling (spawn-based data loaders), whole-model checkpoints."""

import copy
import io
import pickle

import pytest
import torch

from flowmatch_fast import FlowMatching
from flowmatch_fast.alpamayo1_5 import FlowMatching as FlowMatching1_5
from oracle import spec_sample, spec_sample_1_5

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device")


class Policy(torch.nn.Module):
    """A model that holds the sampler next to its expert, as Alpamayo's does."""

    def __init__(self, **fm_options):
        super().__init__()
        self.expert = torch.nn.Linear(2, 2)
        self.diffusion = FlowMatching(x_dims=(5, 2), num_inference_steps=4, **fm_options)

    def field(self, *, x, t):
        return self.expert(x) * t


def _samples(model, seed=3, device="cpu"):
    torch.manual_seed(seed)
    return model.diffusion.sample(3, model.field, device=device)


def _check_copy(original, copied):
    assert copied.diffusion is not original.diffusion
    assert copied.diffusion.graph_cache is not original.diffusion.graph_cache
    assert len(copied.diffusion.graph_cache) == 0
    assert copied.diffusion.graph_stats == type(copied.diffusion.graph_stats)()
    assert copied.diffusion.graph_cache.max_graphs == original.diffusion.graph_cache.max_graphs
    torch.manual_seed(3)
    want = spec_sample((5, 2), 3, original.field, steps=4)
    assert torch.equal(_samples(copied), want) and torch.equal(_samples(original), want)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save", "AveragedModel"])
def test_copies_sample_bitwise_and_start_with_an_empty_cache(how):
    model = Policy(max_graphs=5, cuda_graph=False)
    model.diffusion.graph_stats.first_calls = 7  # as if it had served calls
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    else:
        copied = torch.optim.swa_utils.AveragedModel(model).module
    _check_copy(model, copied)
    assert model.diffusion.graph_stats.first_calls == 7  # the original's cache is untouched


@gpu
@needs_cuda
def test_deepcopy_of_a_sampler_with_cached_graphs():
    model = Policy(cuda_graph=True).cuda()
    for _ in range(3):
        _samples(model, device="cuda")
    assert len(model.diffusion.graph_cache) == 1
    copied = copy.deepcopy(model)
    assert len(copied.diffusion.graph_cache) == 0 and copied.diffusion.graph_stats.captures == 0
    for _ in range(3):
        assert torch.equal(_samples(copied, device="cuda"), _samples(model, device="cuda"))
    assert copied.diffusion.graph_stats.captures == 1


class GuidedPolicy(torch.nn.Module):
    """Alpamayo 1.5's layout: the sampler next to a guided and an unguided expert."""

    def __init__(self, **fm_options):
        super().__init__()
        self.expert = torch.nn.Linear(2, 2)
        self.diffusion = FlowMatching1_5("euler", 4, 2.5, (5, 2), True, **fm_options)

    def guided(self, *, x, t):
        return self.expert(x) * t

    def unguided(self, *, x, t):
        return self.expert(-x) * t


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_the_1_5_sampler_sample_bitwise_and_start_with_an_empty_cache(how):
    model = GuidedPolicy(max_graphs=5)
    model.diffusion.graph_stats.first_calls = 7
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    fm = copied.diffusion
    assert type(fm) is FlowMatching1_5 and fm is not model.diffusion
    assert fm.graph_cache is not model.diffusion.graph_cache and len(fm.graph_cache) == 0
    assert fm.graph_stats == type(fm.graph_stats)() and fm.graph_cache.max_graphs == 5
    assert (fm.use_classifier_free_guidance, fm.inference_guidance_weight) == (True, 2.5)
    torch.manual_seed(3)
    want = spec_sample_1_5((5, 2), 3, model.guided, model.unguided, steps=4, guidance=True,
                           weight=2.5, temperature=0.5)
    for m in (copied, model):
        torch.manual_seed(3)
        assert torch.equal(m.diffusion.sample(3, m.guided, m.unguided, temperature=0.5), want)
    assert model.diffusion.graph_stats.first_calls == 7
