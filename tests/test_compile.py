"""``torch.compile(fullgraph=True)`` of a function that calls ``sample`` traces through it.

The fused kernels' launches are ``torch.library.custom_op``s with fakes (flowmatch_fast/ops.py),
and backend resolution is a trace-time constant. On CPU the compiled graph
runs with the ``eager`` compile backend (Inductor cannot call a Triton kernel on CPU tensors); on
a GPU with Inductor itself.
"""

import pytest
import torch

from flowmatch_fast import FlowMatching


def field(*, x, t):
    return (torch.sin(x) * t).to(torch.bfloat16) - 0.5 * x


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles the same code object with new closures: reset, or the recompile limit
    (8) is hit within one worker process."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CASES = [
    dict(),
    dict(return_all_steps=True),
    dict(int_method="rk4"),
    dict(guidance=True, guidance_weight=2.0),
    dict(shift=3.0),  # its grid check runs on the host at trace time
]


@pytest.mark.parametrize("compile_backend", ["eager", "inductor"])
@pytest.mark.parametrize("opts", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "euler")
def test_fullgraph_compile_matches_eager(device, opts, compile_backend):
    if compile_backend == "inductor" and device.type != "cuda":
        pytest.skip("Inductor cannot launch the Triton kernels on CPU tensors")
    fm = FlowMatching(x_dims=(16, 2), num_inference_steps=4)
    noise = torch.randn(3, 16, 2, device=device)

    def run():
        return fm.sample(3, field, device=device, noise=noise, **opts)

    compiled = torch.compile(run, fullgraph=True, backend=compile_backend)
    got, want = compiled(), run()
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if compile_backend == "eager":  # the same ops run: bitwise
            assert torch.equal(g, w)
        else:  # Inductor recompiles the field's own ops (its sin may round differently)
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_trace_time_constant_is_what_torch_marks():
    """Our import-cheap marker must stay what torch.compiler.assume_constant_result does."""
    from flowmatch_fast.backends import trace_time_constant

    def a():
        return 1

    def b():
        return 1

    torch.compiler.assume_constant_result(a)
    trace_time_constant(b)
    assert {k: v for k, v in vars(a).items()} == {k: v for k, v in vars(b).items()} != {}


# ----------------------------------------------------------------------------- compiled fields
class _BF16Field(torch.nn.Module):
    """A small bf16 MLP field (time embedding, SiLU): what users hand to torch.compile."""

    def __init__(self, device, d=2 * 16, hidden=64):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(torch.randn(d + 2, hidden, generator=gen).to(device, torch.bfloat16))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, d, generator=gen).div(8).to(device, torch.bfloat16))

    def forward(self, *, x, t):
        tt = t.reshape(-1, 1).float()
        h = torch.cat([x.flatten(1), tt.sin(), tt.cos()], dim=1).to(torch.bfloat16)
        return (torch.nn.functional.silu(h @ self.w1) @ self.w2).view(x.shape)


def _compiled_field(device):
    return torch.compile(_BF16Field(device), dynamic=False)


def _original(compiled, device, batch=3, seed=11):
    from flowmatch_fast._original import original_sample

    torch.manual_seed(seed)
    return original_sample([16, 2], batch, compiled, device, 4)


def test_sample_with_a_compiled_field_is_bitwise_the_original_loop_with_it(device):
    """``fm.sample(B, torch.compile(field))`` gives bitwise what the original loop gives with the
    same compiled field (Inductor's CPU backend on CPU, its Triton kernels on a GPU)."""
    compiled = _compiled_field(device)
    want = _original(compiled, device)
    torch.manual_seed(11)
    got = FlowMatching(x_dims=(16, 2), num_inference_steps=4).sample(3, compiled, device=device)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.gpu
def test_capture_of_a_compiled_field_compiles_in_warm_up_and_replays_bitwise():
    """``fm.capture(B, torch.compile(field))``: the first compile happens in the warm-up (no graph
    is compiled inside the capture, none after), and a replay equals the original loop with the
    same compiled field."""
    from torch._dynamo.utils import counters

    counters.clear()  # global: count this test's compiles only, not an earlier test's
    compiled = _compiled_field("cuda")
    fm = FlowMatching(x_dims=(16, 2), num_inference_steps=4)
    sampler = fm.capture(3, compiled, device="cuda")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    want = _original(compiled, "cuda")
    torch.manual_seed(11)
    assert torch.equal(sampler(), want)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled since the warm-up


@pytest.mark.gpu
def test_cached_graph_of_a_compiled_field_is_bitwise_the_original_loop_with_it():
    """``sample(..., cuda_graph=True)`` with a compiled field: captured once, replayed, bitwise."""
    compiled = _compiled_field("cuda")
    fm = FlowMatching(x_dims=(16, 2), num_inference_steps=4)
    want = _original(compiled, "cuda")
    for _ in range(2):
        torch.manual_seed(11)
        assert torch.equal(fm.sample(3, compiled, device="cuda", cuda_graph=True), want)
    assert (fm.graph_stats.captures, fm.graph_stats.replays) == (1, 1)
