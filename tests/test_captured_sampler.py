"""The captured sampler across devices and streams: the generators' graph state is made on the
capture's device, and the inputs a graph holds (its time grid) outlive replays in flight on
other streams. On CPU with ``fake_cuda`` (the CUDA calls recorded, in order); on GPUs for real.
"""

import pytest
import torch

from flowmatch_fast import FlowMatching
from flowmatch_fast.graph import CapturedSampler
from capture_fakes import FakeGenerator, FakeStream, HeldTensor, fake_cuda  # noqa: F401  (a fixture)


def test_generators_are_registered_on_the_capture_device(fake_cuda):
    """``capture(..., device="cuda:1", generator=g)`` with cuda:0 current: registering ``g``
    makes the graph's seed and offset on the current device, so it must happen inside the
    device guard, before the warm-up and the capture."""
    g = FakeGenerator("g")
    CapturedSampler(lambda: torch.zeros(1), "cuda:1", generator=g)
    assert fake_cuda.current == 0
    assert fake_cuda.log[0] == ("register", "g", 1), fake_cuda.log
    assert fake_cuda.log[-1] == ("capture", 1, "side")


def test_a_generator_per_row_is_registered_and_restored_each(fake_cuda):
    """A sequence of generators (one per batch row): each registered inside the guard, and each
    set back to its state from before the warm-up for the capture (the first replay draws what
    the next eager call would)."""
    gens = [FakeGenerator(f"g{i}") for i in range(3)]
    for g in gens:
        g.state = 10
    seen = []

    def run():
        seen.append([g.state for g in gens])
        for g in gens:
            g.draw()
        return torch.zeros(1)

    sampler = CapturedSampler(run, "cuda:1", generators=gens)
    assert [e for e in fake_cuda.log if e[0] == "register"] == [("register", f"g{i}", 1)
                                                                 for i in range(3)]
    assert seen == [[10] * 3, [11] * 3, [10] * 3]  # two warm-ups, then the capture
    assert sampler.generators == tuple(gens)


def test_a_replay_for_a_callers_generators_draws_from_their_states_and_advances_them(fake_cuda):
    """The graph cache registers generators of its own (one per distinct generator of the call
    that captured, in the same positions) and replays for each later call's generators: their
    states are copied into its own before the replay, and the advanced states back after, so a
    rollout's fresh generators replay one graph; a generator repeated in a row list (rows drawing
    from it in turn) is one registered generator."""
    mine = [FakeGenerator("p0"), FakeGenerator("p1")]
    sampler = CapturedSampler(lambda: torch.zeros(1), "cuda:0", generators=[mine[0], mine[1], mine[0]])
    theirs = [FakeGenerator("g0"), FakeGenerator("g1")]
    theirs[0].state, theirs[1].state = 40, 70
    del fake_cuda.log[:]
    sampler(generators=[theirs[0], theirs[1], theirs[0]])
    draws = [e for e in fake_cuda.log if e[0] == "draw"]
    assert draws == [("draw", "p0", 40), ("draw", "p1", 70)]  # drew from the caller's states
    assert (theirs[0].state, theirs[1].state) == (41, 71)  # left where an eager call leaves them
    sampler()  # a replay for nobody's generators: its own, as they are
    assert (theirs[0].state, theirs[1].state) == (41, 71)


def test_a_replay_on_another_stream_records_the_held_inputs_on_it(fake_cuda):
    """The held grid is made on the capturing stream; a replay on another stream reads it, so
    the allocator is told (``record_stream``) before that replay: evicting the graph while the
    replay is in flight then cannot hand its memory to other work early. Once per stream."""
    held = HeldTensor(fake_cuda)
    sampler = CapturedSampler(lambda: torch.zeros(1), "cuda:0", static_inputs=(held,))
    other = FakeStream(fake_cuda, "other")
    del fake_cuda.log[:]
    sampler()
    with torch.cuda.stream(other):
        sampler()
        sampler()
    sampler()
    assert fake_cuda.log == [
        ("record_stream", "default"), ("replay", 0, "default"),
        ("wait", "other", "default"), ("record_stream", "other"), ("replay", 0, "other"),
        ("replay", 0, "other"),
        ("wait", "default", "other"), ("replay", 0, "default")]


# ----------------------------------------------------------------------------- GPU
def _field(*, x, t):
    return torch.sin(1.7 * x) - 0.5 * x * t


@pytest.mark.gpu(devices=2)
def test_a_capture_on_the_second_gpu_with_its_generator_replays_its_noise():
    fm = FlowMatching(x_dims=(64, 2))
    g = torch.Generator("cuda:1")
    with torch.cuda.device(0):
        sampler = fm.capture(6, _field, device="cuda:1", generator=g)
        for seed in (3, 4):
            g.manual_seed(seed)
            got = sampler()
            g.manual_seed(seed)
            want = fm.sample(6, _field, device="cuda:1", generator=g)
            assert got.device == torch.device("cuda:1")
            assert torch.equal(got, want), f"seed {seed}"
        # the replay advanced the generator of cuda:1, as an eager call does
        g.manual_seed(5)
        sampler()
        after_replay = g.get_offset() if hasattr(g, "get_offset") else g.get_state()
        g.manual_seed(5)
        fm.sample(6, _field, device="cuda:1", generator=g)
        after_eager = g.get_offset() if hasattr(g, "get_offset") else g.get_state()
        assert torch.equal(torch.as_tensor(after_replay), torch.as_tensor(after_eager))


@pytest.mark.gpu
def test_evicting_a_graph_while_its_replay_is_in_flight_on_another_stream():
    """The replay waits on another stream behind a long kernel; the graph is evicted meanwhile
    and the capturing stream allocates and fills blocks of the held grid's size: the replay must
    still read its grid (the allocator keeps it until the other stream's work is done)."""
    fm = FlowMatching(x_dims=(64, 2), cuda_graph=True)
    for _ in range(2):  # eager, capture
        fm.sample(6, _field, device="cuda")
    torch.manual_seed(11)
    want = fm.sample(6, _field, device="cuda", cuda_graph=False)
    other = torch.cuda.Stream()
    other.wait_stream(torch.cuda.current_stream())
    torch.manual_seed(11)
    with torch.cuda.stream(other):
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time before the replay runs
        got = fm.sample(6, _field, device="cuda")
    fm.clear_cuda_graphs()
    # 4,096 blocks of the grid's size class (512 bytes, 2 MB: a whole small-pool segment) on the
    # capturing stream: a grid freed early is among them, and filled with 7s before it is read
    junk = [torch.full((11,), 7.0, device="cuda") for _ in range(4096)]
    other.synchronize()
    assert fm.graph_stats.replays == 1 and fm.graph_stats.evictions == 1
    assert torch.equal(got, want)
    del junk
