"""``pytest bench/``: every workload, the original loop beside ours on each available backend.

On CPU: W4 (the loop's own overhead), W1, W3 and W5's small expert with the torch backend. On a
GPU: W1-W3 for every backend, eager and captured, and W5's 2B-class expert (eager, per-forward
graphs, captured). ``bench/gpu_bench.py`` is the full GPU measurement (CUDA events,
bandwidth ceilings, torch.compile) that writes ``bench/results/``. The terminal summary prints
each variant's median and its ratio to the original loop.
"""

import pytest
import torch

import compiled_loops as C
import rl_workloads as RL
import workloads as W

variants = pytest.mark.parametrize("variant", W.VARIANTS)


def _run(run_benchmark, group, variant, x_dims, batch, field, device, steps, all_steps=False,
         rounds=30):
    with torch.no_grad():
        fn = W.make_variant(variant, x_dims, batch, field, device, steps, all_steps)
        if not callable(fn):
            pytest.skip(fn)
        run_benchmark(group, variant, fn, device, rounds)


@pytest.mark.parametrize("variant", ["original", "ours-torch"])
def test_w4_cpu_overhead(run_benchmark, variant):
    """The foundation's figure: our per-call time at most half of the original's (see summary)."""
    field = W.StoredField(W.W4_BATCH, W.ALPAMAYO_DIMS, "cpu")
    _run(run_benchmark, "W4-cpu-b6-50steps", variant, W.ALPAMAYO_DIMS, W.W4_BATCH, field, "cpu",
         W.W4_STEPS, rounds=300)


@variants
@pytest.mark.parametrize("batch", W.W1_BATCHES)
def test_w1_launch_bound(run_benchmark, device, batch, variant):
    field = W.TinyExpert().to(device)
    _run(run_benchmark, f"W1-{device.type}-b{batch}", variant, W.ALPAMAYO_DIMS, batch, field,
         device, 10)


@pytest.mark.parametrize("variant", W.W5_VARIANTS)
@pytest.mark.parametrize("batch", W.W5_BATCHES)
def test_w5_transformer_expert(run_benchmark, device, batch, variant):
    """W5: the 2B-class expert over a 2,048-token prompt on a GPU; its small config on CPU."""
    config = "2b" if device.type == "cuda" else "small"
    field = W.w5_expert(config, batch, device)
    _run(run_benchmark, f"W5-{config}-{device.type}-b{batch}", variant, W.ALPAMAYO_DIMS, batch,
         field, device, 10, rounds=10)


def test_w5_ours_is_bitwise_the_original_and_reads_the_prompt_in_place():
    """The small W5 expert on CPU: ours equals the original loop; a new scene's prompt KV, copied
    into the static buffers, changes the result (the field reads them by reference)."""
    field = W.w5_expert("small", 3, "cpu")
    fm = W.FlowMatching(x_dims=W.ALPAMAYO_DIMS)
    torch.manual_seed(7)
    want = W.original_sample(list(W.ALPAMAYO_DIMS), 3, field, "cpu", 10)
    torch.manual_seed(7)
    got = fm.sample(3, field)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    field.set_prefix(*field.random_prefix(seed=99))
    torch.manual_seed(7)
    assert not torch.equal(fm.sample(3, field), want)
    with pytest.raises(ValueError, match=r"keys must be \[layers"):
        field.set_prefix(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))


@variants
def test_w2_bandwidth_bound(run_benchmark, device, variant):
    if device.type != "cuda":
        pytest.skip("the 50 MB bandwidth case is a GPU workload")
    field = W.StoredField(W.W2_BATCH, W.W2_DIMS, device)
    _run(run_benchmark, "W2-cuda-50MB-20steps", variant, W.W2_DIMS, W.W2_BATCH, field, device,
         W.W2_STEPS, rounds=10)


@variants
def test_w3_trajectories(run_benchmark, device, variant):
    field = W.StoredField(48, W.ALPAMAYO_DIMS, device)
    _run(run_benchmark, f"W3-{device.type}-b48-100steps-all", variant, W.ALPAMAYO_DIMS, 48, field,
         device, W.W3_STEPS, all_steps=True, rounds=20)


# -------------------------------------------------- Alpamayo 1.5: guided W1 (two fields, B = 6)
@pytest.mark.parametrize("variant", W.V1_5_VARIANTS)
def test_v1_5_guided_w1(run_benchmark, device, variant):
    """Eager original vs ours eager vs ours captured; ours is bitwise the original first."""
    fn = W.v1_5_variant(variant, device)
    if not callable(fn):
        pytest.skip(fn)
    if variant != "original":
        results = []
        for f in (W.v1_5_variant("original", device), fn):
            torch.manual_seed(0)
            results.append(f())
        assert torch.equal(*results)
    run_benchmark(f"W1-1.5-guided-{device.type}-b{W.V1_5_BATCH}", variant, fn, device)


# -------------------------------------------------- compile=True against its peers (CPU)
@pytest.fixture
def one_thread():
    """Intra-op threads 1 while a test runs: on this 2-core machine, shared, a 2-thread bf16 matmul
    waits for the busier core (W1's p90 reached 700 ms against a 2.5 ms p10); one thread gives
    stable ratios, and conservative ones for the compiled loop (the field's own time is longer,
    the per-step overhead compile removes the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("workload", C.COMPILE_WORKLOADS)
def test_compile_true_beside_its_peers(side_by_side, request, one_thread, workload):
    """Ours eager and ``compile=True`` are bitwise the original loop (checked in every pass);
    with timings on (make bench), every variant is timed interleaved and the summary prints
    the issue's two ratios. The peers' compiles (10-30 s each on CPU) only run then."""
    from flowmatch_fast import compiled

    checks_only = request.config.getoption("benchmark_disable", False)
    fns, compile_s = {}, {}
    for name in C.COMPILE_VARIANTS:
        if name in C.PEERS and checks_only:
            continue
        fns[name], compile_s[name] = C.compile_variant(name, workload)
    outs = {}
    for name, fn in fns.items():
        torch.manual_seed(0)
        outs[name] = fn()
    for name in ("ours-eager", "ours-compile"):
        assert torch.equal(outs[name], outs["original"]), f"{name} is not bitwise the original"
    bitwise = {name: compiled.max_difference(outs[name], outs["original"]) is None
               for name in fns}
    timings = side_by_side(f"compile-{workload}-cpu", fns, "cpu",
                           reps=300 if workload.startswith("cheap") else 150)
    for name, tm in timings.items():
        print(f"{workload} {name}: median {tm.median * 1e6:.1f} us (p10 {tm.p10 * 1e6:.1f}, "
              f"p90 {tm.p90 * 1e6:.1f}), bitwise {bitwise[name]}, first calls {compile_s[name]:.1f} s")


@pytest.mark.parametrize("path", ["region alone", "repeat path", "full path"])
def test_compile_true_overhead_per_call(run_benchmark, monkeypatch, one_thread, path):
    """What a compiled call costs beyond its region, in microseconds: a 1-step call on 8
    numbers through the repeat path (arguments as the last call's: no planning), through the
    full path (planning, cache key and lookup), and its region called directly."""
    from flowmatch_fast import compiled

    fm = C.overhead_sampler()
    if path == "region alone":
        _, refs, inputs = fm._compiled._last
        region = refs[-1]()
        fn = lambda: region.fn((C.trivial_field,), *inputs)  # noqa: E731
    else:
        if path == "full path":
            monkeypatch.setattr(compiled, "call_token", lambda *args: None)
        fn = lambda: fm.sample(2, C.trivial_field)  # noqa: E731
    with torch.no_grad():
        run_benchmark("compile-overhead-cpu", path, fn, "cpu", rounds=2000)


# -------------------------------------------------- W6: an RL rollout (the recipes' SDE sampler)
@pytest.mark.parametrize("variant", RL.W6_VARIANTS)
def test_w6_rl_rollout(run_benchmark, device, variant):
    """The recipes' loop ("original" in the summary) vs ours eager and captured; bitwise first."""
    field = RL.w6_field(device)
    fn = RL.w6_variant(variant, field, device)
    if not callable(fn):
        pytest.skip(fn)
    if variant not in ("recipes", "field-floor"):
        fns = {"recipes": RL.w6_variant("recipes", field, device), variant: fn}
        assert RL.w6_bitwise(fns, device)[variant], f"{variant} is not bitwise the recipes' loop"
    name = "original" if variant == "recipes" else variant
    run_benchmark(f"W6-RL-{device.type}-b{RL.W6_BATCH}", name, fn, device, rounds=20)
