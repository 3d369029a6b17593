"""The RL recipes' class with the graph cache, captures and the compiled mode, on CPU with the
stand-ins of tests/capture_fakes.py: what a cached graph may hold (never the caller's stored
samples), the SDE's per-step scalars keyed by the device's index and each grid entry's bits,
and a clear error inside the caller's own capture. (Real captures: tests/test_alpamayo1_x_rl.py,
on a GPU.)"""

import pytest
import torch

from flowmatch_fast import sde
from flowmatch_fast.alpamayo1_x_rl import FlowMatching
from capture_fakes import captures_on_cpu  # noqa: F401  (a fixture)
from fields import make_field


def test_stored_rollouts_are_never_replayed_from_a_cached_graph(captures_on_cpu):
    """cuda_graph=True with samples_list: each call scores its own stored rollout (a cached
    graph would read the samples of the call that captured it)."""
    field = make_field("contiguous", torch.bfloat16, [8, 2], 1)
    fm = FlowMatching("sde", num_inference_steps=3, x_dims=(8, 2), cuda_graph=True)
    eager = FlowMatching("sde", num_inference_steps=3, x_dims=(8, 2))
    for seed in range(4):
        torch.manual_seed(seed)
        stored = list(eager.sample(5, field, return_info=True)["all_steps"].unbind(1))
        got = fm.sample(5, field, device="cuda:0", samples_list=stored, return_info=True)
        want = eager.sample(5, field, samples_list=stored, return_info=True)
        assert all(torch.equal(got[k], want[k]) for k in want), seed
    assert captures_on_cpu == [] and fm.graph_stats.captures == 0


def test_a_capture_compiles_no_rollout_drawing_from_generators(captures_on_cpu, monkeypatch):
    fm = FlowMatching("sde", num_inference_steps=2, x_dims=(8, 2))

    def refuse(*args, **kwargs):
        raise AssertionError("a rollout drawing from generators was compiled")

    monkeypatch.setattr(fm._compiled, "captured", refuse)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    fm.capture(3, lambda *, x, t: -x, device="cuda:0", compile=True, generator=gens)
    assert len(captures_on_cpu) == 1


def test_the_sde_table_is_keyed_by_the_devices_index_and_each_entrys_bits(monkeypatch):
    built = []

    class Recording:
        def __init__(self, values, noise_level, device):
            built.append((list(values), device))

    monkeypatch.setattr(sde, "SdeGrid", Recording)
    monkeypatch.setattr(sde, "capturing", lambda device: False)
    monkeypatch.setattr(sde, "_grids", type(sde._grids)())
    current = [1]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    grid = [0.0, 0.5, 1.0]
    sde.sde_grid(grid, 0.7, torch.device("cuda"))
    sde.sde_grid(grid, 0.7, torch.device("cuda", 1))  # the same table
    current[0] = 0
    sde.sde_grid(grid, 0.7, torch.device("cuda"))  # another device current: another table
    sde.sde_grid([-0.0, 0.5, 1.0], 0.7, torch.device("cuda", 0))  # -0.0 is not 0.0
    assert [d for _, d in built] == [torch.device("cuda", 1), torch.device("cuda", 0),
                                     torch.device("cuda", 0)]
    assert str(built[-1][0][0]) == "-0.0"


def test_a_negative_zero_grid_point_reaches_the_field_as_the_recipes_hand_it():
    seen = []

    def field(*, x, t):
        seen.append(torch.signbit(t).all().item())
        return -x

    fm = FlowMatching("sde", num_inference_steps=2, x_dims=(4, 2))
    fm.sample(2, field, timesteps=[0.0, 0.5, 1.0])
    fm.sample(2, field, timesteps=[-0.0, 0.5, 1.0])
    assert seen == [False, False, True, False]


def test_inside_the_callers_own_capture_an_unbuilt_grid_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sde, "capturing", lambda device: True)
    monkeypatch.setattr(sde, "_grids", type(sde._grids)())
    with pytest.raises(RuntimeError, match="call sample once with this grid"):
        sde.sde_grid([0.0, 0.25, 1.0], 0.7, torch.device("cuda", 0))
