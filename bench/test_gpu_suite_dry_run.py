"""``bash bench/gpu_suite.sh --dry-run`` on CPU: the suite's phases and every gpu_bench section run
with tiny sizes, the results and the suite's table are written, and nothing lands in
bench/results. (The demo and the gpu-marked test phases are left to the CI passes that run them.)
"""

import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_gpu_suite_dry_run_runs_every_bench_section_on_cpu(tmp_path):
    before = sorted(os.listdir(os.path.join(HERE, "results")))
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHON=sys.executable,
               SUITE_SKIP="demo tests parity")
    env.pop("OUT", None)
    env.pop("RESULTS_DIR", None)
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu_suite.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "flowmatch_suite_dry_run" / "results"
    data = json.loads((results / "dry-run-cpu.json").read_text())
    assert data["problems"] == []
    sections = {r["workload"] for r in data["rows"] if r["variant"] == "section wall time"}
    assert {"w1", "w5", "kernel-count", "kernel", "launch", "w2", "w3", "memory",
            "alpamayo1_5"} <= sections
    v1_5 = {r["variant"]: r for r in data["rows"] if r["workload"] == "1.5-guided-W1-b6"}
    for name in ("original", "ours-eager"):  # interleaved timing: a median and its spread
        assert v1_5[name]["bitwise_vs_original"] is True
        assert v1_5[name]["p10_us"] <= v1_5[name]["median_us"] <= v1_5[name]["p90_us"]
    w5 = {r["variant"]: r for r in data["rows"] if r["workload"] == "W5-small-b2"}
    assert w5["ours-torch"]["bitwise_vs_original"] is True and w5["original"]["median_us"] > 0
    reasons = [r["reason"] for r in data["rows"] if r["variant"] == "skipped"]
    assert any("CUDA graph" in r for r in reasons)  # said, not silently dropped
    md = (results / "dry-run-cpu.md").read_text()
    assert "## Suite (bench/gpu_suite.sh)" in md and "all phases ran" in md
    assert "| bench |" in md and "| plot |" in md
    assert (results / "dry-run-cpu-W1-W5.png").exists()
    assert sorted(os.listdir(os.path.join(HERE, "results"))) == before


def test_a_variant_that_is_not_bitwise_makes_the_run_not_count(monkeypatch):
    """gpu_bench records a broken bitwise check as a problem (the script then exits 1)."""
    import torch

    import gpu_bench

    monkeypatch.setattr(gpu_bench, "ROWS", [])
    monkeypatch.setattr(gpu_bench, "PROBLEMS", [])
    calls = [0]

    def drifting_field(*, x, t):  # not deterministic: every call differs
        calls[0] += 1
        return torch.full_like(x, float(calls[0]))

    gpu_bench.bench_workload("drift", (4, 2), 2, drifting_field, 3, 2, gpu_bench.DRY,
                             names=("original", "ours-torch"))
    assert gpu_bench.PROBLEMS == ["drift: ours-torch not bitwise to original"]
    rows = {r["variant"]: r for r in gpu_bench.ROWS if r["workload"] == "drift"}
    assert rows["ours-torch"]["bitwise_vs_original"] is False


def test_the_compile_budget_cuts_each_compile_and_stops_trying_once_spent():
    """gpu_bench --compile-budget: a compile that runs past what is left is cut off there and
    charged; once less than a second is left the next compile is not even started."""
    import time

    import gpu_bench

    budget = gpu_bench.CompileBudget(1.5)
    value, why = budget.run(lambda: "compiled", limit=90)
    assert (value, why) == ("compiled", None) and 1.4 < budget.left <= 1.5

    def slow():
        time.sleep(5)

    t0 = time.perf_counter()
    value, why = budget.run(slow, limit=90)
    assert value is None and why == "compile exceeded 1 s" and time.perf_counter() - t0 < 3
    assert budget.left < 1 and gpu_bench.CompileBudget.out_of_time(why)
    tried = []
    value, why = budget.run(lambda: tried.append(1), limit=90)
    assert value is None and tried == [] and why.startswith("not compiled")


def test_a_compile_that_raises_is_reported_with_its_error_and_not_as_out_of_time():
    import gpu_bench

    def broken():
        raise RuntimeError("inductor says no")

    value, why = gpu_bench.CompileBudget().run(broken, limit=0)
    assert value is None and "inductor says no" in why
    assert not gpu_bench.CompileBudget.out_of_time(why)


def test_the_phase_limits_add_up_to_the_stated_total_and_under_8_minutes():
    """Issue 16: the whole suite under 8 minutes on an H200, the install included. Every time limit
    in gpu_suite.sh is one of its L_* settings (no number written inline), the parallel group has
    one, and the header states their true sum."""
    text = open(os.path.join(HERE, "gpu_suite.sh")).read()
    (table,) = re.findall(r"^(L_INFO=.*)$", text, re.M)
    limits = {k: int(v) for k, v in re.findall(r"(L_\w+)=(\d+)", table)}
    assert set(limits) == {"L_INFO", "L_INSTALL", "L_ENV", "L_BENCH", "L_PYTEST_BENCH",
                           "L_PARALLEL"}
    (stated,) = re.findall(r"= (\d+) s in all", text)
    assert int(stated) == sum(limits.values()) < 8 * 60
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.findall(r"timeout \d|\brun [\w-]+ \d", code)  # every limit from the table
    assert code.count('timeout "$L_PARALLEL"') == 1  # the parallel jobs all start through job()


def test_the_1_5_section_fails_when_a_variant_is_not_bitwise(monkeypatch):
    import pytest
    import torch

    import workloads as W

    calls = [0]

    def variant(name, device):
        if name == "ours-graph":
            return "CUDA graphs need a CUDA device"

        def fn():
            calls[0] += 1
            return torch.full((2,), float(calls[0]) if name == "ours-eager" else 0.0)
        return fn

    monkeypatch.setattr(W, "v1_5_variant", variant)
    rows = []
    with pytest.raises(AssertionError, match="ours-eager not bitwise"):
        W._v1_5_section(lambda *a, **k: rows.append((a, k)), 3, device="cpu")
    by_name = {a[1]: k for a, k in rows}
    assert by_name["ours-eager"]["bitwise_vs_original"] is False
    assert by_name["original"]["bitwise_vs_original"] is True
