"""``generator=`` in every class: one generator, or a list with one per row (diffusers'
``randn_tensor`` rules, SPEC.md "The RL recipes' FlowMatching"): the initial noise of the R1 and
Alpamayo 1.5 classes drawn row by row, eager and (on a GPU) captured; the errors."""

import pytest
import torch

from flowmatch_fast import FlowMatching, alpamayo1_5, alpamayo1_x_rl
from bitwise import assert_bitwise
from fields import make_field
from oracle import _euler, spec_randn
from capture_fakes import captures_on_cpu  # noqa: F401  (a fixture)

CLASSES = [pytest.param(FlowMatching, id="r1"), pytest.param(alpamayo1_5.FlowMatching, id="1.5"),
           pytest.param(alpamayo1_x_rl.FlowMatching, id="rl")]


def _rows(seeds, device="cpu"):
    return [torch.Generator(device).manual_seed(s) for s in seeds]


@pytest.mark.parametrize("cls", CLASSES)
def test_per_row_generators_draw_one_randn_per_row(cls, device, case_rng, fused_launches):
    batch, steps = case_rng.randint(2, 9), case_rng.randint(1, 6)
    x_dims = [case_rng.randint(1, 9) for _ in range(case_rng.randint(1, 3))]
    seeds = [case_rng.randrange(2**31) for _ in range(batch)]
    field = make_field("contiguous", torch.bfloat16, x_dims, seeds[0])
    fm = cls(x_dims=x_dims, num_inference_steps=steps)
    state = torch.random.get_rng_state()
    ours = fm.sample(batch, field, device=device, return_all_steps=True, generator=_rows(seeds, device))
    assert torch.equal(torch.random.get_rng_state(), state), "the global generator is untouched"
    x0 = spec_randn((batch, *x_dims), _rows(seeds, device), device)
    want = _euler(x0, steps, lambda x, t: field(x=x, t=t), device, True)
    assert_bitwise(ours, want, f"x_dims={x_dims} batch={batch} seeds={seeds}")
    fused_launches.expect(steps, f"seeds={seeds}")


@pytest.mark.parametrize("cls", CLASSES)
def test_a_row_depends_on_its_generator_alone(cls, device):
    field = make_field("contiguous", torch.float32, [8, 2], 1)
    fm = cls(x_dims=(8, 2), num_inference_steps=3)
    full = fm.sample(5, field, device=device, generator=_rows(range(10, 15), device))
    part = fm.sample(2, field, device=device, generator=_rows([13, 11], device))
    assert torch.equal(part, full[[3, 1]])


@pytest.mark.parametrize("cls", CLASSES)
def test_one_generator_in_a_list_of_one_is_one_generator(cls):
    field = make_field("contiguous", torch.float32, [4], 1)
    fm = cls(x_dims=4, num_inference_steps=2)
    a = fm.sample(1, field, generator=_rows([3]))
    b = fm.sample(1, field, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES)
def test_generator_errors(cls):
    fm = cls(x_dims=4)
    field = make_field("contiguous", torch.float32, [4], 1)
    with pytest.raises(ValueError, match="list of 1 generators; expected one per row of the batch, 3"):
        fm.sample(3, field, generator=_rows([1]))
    with pytest.raises(TypeError, match="a list holding int"):
        fm.sample(2, field, generator=[torch.Generator(), 5])
    with pytest.raises(TypeError, match="generator must be a torch.Generator or a list"):
        fm.sample(2, field, generator=7)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", CLASSES)
def test_cpu_generators_with_a_cuda_device_draw_on_the_cpu_and_cannot_be_captured(cls):
    field = make_field("contiguous", torch.bfloat16, [8, 2], 2)
    fm = cls(x_dims=(8, 2), num_inference_steps=3)
    ours = fm.sample(4, field, device="cuda", generator=_rows(range(4)))
    x0 = spec_randn((4, 8, 2), _rows(range(4)), "cuda")
    assert torch.equal(ours, _euler(x0, 3, lambda x, t: field(x=x, t=t), "cuda", False))
    with pytest.raises(ValueError, match="mixed devices"):
        fm.sample(2, field, device="cuda", generator=[torch.Generator(), torch.Generator("cuda")])
    with pytest.raises(RuntimeError, match="CPU generator draws on the host"):
        fm.capture(4, field, device="cuda", generator=_rows(range(4)))


@pytest.mark.gpu
@pytest.mark.parametrize("cls", CLASSES)
def test_captured_per_row_generators_replay_like_eager_calls(cls):
    """capture(generator=[...]): each generator registered with the graph; after the same
    seeds a replay equals an eager call, and the generators advance as an eager call's do."""
    field = make_field("contiguous", torch.bfloat16, [16, 2], 4)
    fm = cls(x_dims=(16, 2), num_inference_steps=4)
    gens = _rows(range(20, 26), "cuda")
    sampler = fm.capture(6, field, device="cuda", generator=gens)
    for seeds in (range(20, 26), range(40, 46)):
        for g, s in zip(gens, seeds):
            g.manual_seed(s)
        got = sampler()
        after = [g.get_state() for g in gens]
        want = fm.sample(6, field, device="cuda", generator=_rows(seeds, "cuda"))
        assert torch.equal(got, want)
        eager = _rows(seeds, "cuda")
        fm.sample(6, field, device="cuda", generator=eager)
        assert all(torch.equal(a, e.get_state()) for a, e in zip(after, eager))


class _Replaying:
    """Stands in for a captured sampler on CPU: each call copies the caller's generators' states
    into the ones the sampler was built with, reruns the sampling call (as a replay reruns its
    kernels, drawing from its registered generators) and copies the states back out."""

    made = []

    def __init__(self, run, device, generators=(), **kw):
        self.run, self.generators = run, tuple(generators)
        _Replaying.made.append(self)

    def __call__(self, static_output=False, generators=None):
        for mine, theirs in zip(self.generators, generators or ()):
            mine.set_state(theirs.get_state())
        out = self.run()
        for mine, theirs in zip(self.generators, generators or ()):
            theirs.set_state(mine.get_state())
        return out


@pytest.mark.parametrize("cls", CLASSES)
def test_the_graph_cache_replays_one_graph_for_fresh_generators_per_call(cls, monkeypatch,
                                                                      captures_on_cpu):
    """cuda_graph=True with a list of fresh generators per call (a rollout's seeds): one graph,
    captured on the signature's second call, drawing from generators of its own into which each
    call's are copied; every call equals the eager one and leaves its generators as it would."""
    from flowmatch_fast import noise, sampling

    _Replaying.made = []
    monkeypatch.setattr(sampling, "CapturedSampler", _Replaying)
    monkeypatch.setattr(noise, "graph_safe", lambda generator: True)  # CPU ones stand in
    field = make_field("contiguous", torch.bfloat16, [8, 2], 3)
    kw = dict(return_info=True) if cls is alpamayo1_x_rl.FlowMatching else {}
    args = ("sde",) if cls is alpamayo1_x_rl.FlowMatching else ()
    fm = cls(*args, x_dims=(8, 2), num_inference_steps=3, cuda_graph=True)
    eager = cls(*args, x_dims=(8, 2), num_inference_steps=3)
    seeds = [[s, s + 1, s, s + 2] for s in (10, 20, 30, 40)]  # a repeated generator too
    for rows in seeds:
        gens, eager_gens = _rows(rows), _rows(rows)
        gens[2] = gens[0]
        eager_gens[2] = eager_gens[0]
        got = fm.sample(4, field, device="cuda:0", generator=gens, **kw)
        want = eager.sample(4, field, generator=eager_gens, **kw)
        for k in (want if isinstance(want, dict) else {None: want}):
            g, w = (got[k], want[k]) if k is not None else (got, want)
            assert torch.equal(g, w), (rows, k)
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, eager_gens))
    stats = fm.graph_stats
    assert len(_Replaying.made) == 1 and (stats.first_calls, stats.captures, stats.replays) == (1, 1, 2)
    assert len({id(g) for g in _Replaying.made[0].generators}) == 3  # the repeated one is one
