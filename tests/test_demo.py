"""``python -m flowmatch_fast demo``: it learns, it is bitwise-faithful, it writes a sane figure,
and it turns bad settings (--out, --device, --train-steps 0, unknown options) into clear messages.

Runs the demo in ``--fast`` mode twice (once in-process, once as the real command line), and the
edge cases on tiny settings; about 30 s in all on a 2-core CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmatch_fast import FlowMatching
from flowmatch_fast._original import original_sample
from flowmatch_fast.demo import mmd_rbf, run_demo, sliced_wasserstein

REPO_ROOT = Path(__file__).resolve().parents[1]
MIN_RATIO = 3.0  # the bar: samples at least 3x closer to the data than the noise is


def _check_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image as mpimg

    assert path.is_file(), f"no figure at {path}"
    img = mpimg.imread(str(path))
    h, w = img.shape[:2]
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert 300 <= h <= 3000 and 800 <= w <= 5000, (h, w)
    assert w > h  # three panels side by side
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def fast_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.png"
    lines = []
    result = run_demo(fast=True, out=str(out), progress=False, log=lines.append)
    result["_log"] = "\n".join(lines)
    result["_out"] = out
    return result


def test_demo_learns(fast_result):
    r = fast_result
    assert r["noise_metric"] > 0 and r["sample_metric"] > 0
    assert r["ratio"] == pytest.approx(r["noise_metric"] / r["sample_metric"])
    assert r["ratio"] >= MIN_RATIO, (
        f"samples only {r['ratio']:.2f}x closer to the data than the noise "
        f"(MMD noise {r['noise_metric']:.4f}, samples {r['sample_metric']:.4f})"
    )
    assert r["sw_ratio"] >= MIN_RATIO  # the secondary metric agrees
    # the samples get near the finite-sample floor (two draws of the data itself)
    assert r["sample_metric"] < 3 * r["data_floor_metric"]


def test_demo_bitwise_and_timing(fast_result):
    r = fast_result
    assert r["bitwise_equal"] is True
    for key in ("time_original_s", "time_ours_s", "time_original_small_s", "time_ours_small_s"):
        assert r[key] > 0, key
    assert r["time_captured_s"] is None  # CPU: the captured sampler is CUDA only


def test_demo_png_and_summary(fast_result):
    r = fast_result
    assert r["png"] == os.path.abspath(r["_out"])
    _check_png(Path(r["png"]))
    log = r["_log"]
    for text in ("summary", "MMD", "original loop", "ours (sample)", str(r["png"]), "wall time"):
        assert text in log, text


def test_cli_demo_fast(tmp_path):
    out = tmp_path / "cli.png"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-m", "flowmatch_fast", "demo", "--fast", "--no-progress",
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FlowMatching.sample == original loop (torch.equal): True" in proc.stdout
    assert str(out) in proc.stdout
    _check_png(out)


def test_cli_help_lists_subcommands():
    from flowmatch_fast.__main__ import SUBCOMMANDS, build_parser

    text = build_parser().format_help()
    assert "demo" in SUBCOMMANDS
    for name in SUBCOMMANDS:
        assert name in text


def test_original_matches_sample_bitwise():
    """The baseline and FlowMatching.sample agree bitwise on a deterministic nonlinear field."""
    w = torch.tensor([[0.3, -1.2], [0.7, 0.1]])

    def step_fn(*, x, t):
        return torch.tanh(x @ w) * (1.0 + t) - 0.5 * x

    fm = FlowMatching(x_dims=[2], num_inference_steps=7)
    for all_steps in (False, True):
        torch.manual_seed(3)
        ref = original_sample([2], 33, step_fn, "cpu", 7, return_all_steps=all_steps)
        torch.manual_seed(3)
        ours = fm.sample(33, step_fn, return_all_steps=all_steps)
        if all_steps:
            assert ref[0].shape == ours[0].shape == (33, 8, 2)
            assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])
        else:
            assert torch.equal(ref, ours)


def test_metrics_sanity():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g)
    b = torch.randn(500, 2, generator=g)
    far = b + 3.0
    assert mmd_rbf(a, a) == pytest.approx(0.0, abs=1e-6)
    assert sliced_wasserstein(a, a) == 0.0
    assert mmd_rbf(a, b) < mmd_rbf(a, far)
    assert sliced_wasserstein(a, b) < sliced_wasserstein(a, far)
    # SW1 of a pure shift by s along a direction averages |s . u| over unit directions u:
    # 3 * sqrt(2) * E|cos| = 3 * sqrt(2) * 2 / pi in 2-D.
    shift = sliced_wasserstein(a, a + 3.0, num_projections=4096)
    assert shift == pytest.approx(3.0 * 2**0.5 * 2 / torch.pi, rel=0.03)


# ------------------------------------------------------------------ command-line edge cases
TINY = ["--train-steps", "20", "--samples", "64", "--no-progress"]


def _demo_cli(capsys, *argv):
    from flowmatch_fast.__main__ import main

    code = main(["demo", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_out_naming_an_existing_directory_writes_the_default_file_there(tmp_path, capsys):
    code, out, err = _demo_cli(capsys, *TINY, "--out", str(tmp_path))
    assert code == 0, out + err
    png = tmp_path / "flowmatch_demo.png"
    _check_png(png)
    assert str(png) in out


def test_out_in_a_missing_directory_is_refused_before_training_and_creates_nothing(tmp_path, capsys):
    target = tmp_path / "not" / "there" / "demo.png"
    code, out, err = _demo_cli(capsys, *TINY, "--out", str(target))
    assert code == 2
    assert str(tmp_path / "not" / "there") in err and "does not exist" in err
    assert "training" not in out  # refused up front
    assert list(tmp_path.iterdir()) == []


def test_zero_training_steps_says_the_field_is_untrained(tmp_path, capsys):
    code, out, err = _demo_cli(capsys, "--train-steps", "0", "--samples", "64", "--no-progress",
                               "--out", str(tmp_path / "d.png"))
    assert code == 0, out + err
    assert "untrained" in out
    assert "nan" not in out.lower()


@pytest.mark.parametrize("device", ["meta", "bogus"])
def test_devices_the_demo_cannot_use_get_a_clear_error(device, capsys):
    code, out, err = _demo_cli(capsys, "--device", device)
    assert code == 2
    assert f"--device {device!r}" in err and "'cpu' or 'cuda'" in err
    assert "Traceback" not in err


def test_unknown_demo_option_shows_the_demo_usage(capsys):
    from flowmatch_fast.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m flowmatch_fast demo" in err and "--bogus" in err


def test_samples_help_states_its_default_once():
    import argparse

    from flowmatch_fast import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    (action,) = [a for a in parser._actions if a.dest == "samples"]
    assert action.help.count(str(demo.DEFAULTS["num_samples"])) == 1, action.help


def test_train_field_with_zero_steps_leaves_the_initial_weights():
    from flowmatch_fast import demo

    fm = FlowMatching(x_dims=[2], num_inference_steps=3)
    torch.manual_seed(5)
    model, final_loss, _ = demo.train_field(fm, dict(demo.FAST, train_steps=0), "ring", seed=5,
                                            device=torch.device("cpu"), progress=False)
    torch.manual_seed(5)
    fresh = demo.VelocityMLP()
    assert final_loss is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  fresh.state_dict().values()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_on_cuda_times_the_captured_sampler(tmp_path):
    r = run_demo(device="cuda", train_steps=50, num_samples=256, repeats=2, progress=False,
                 out=None, log=lambda _: None)
    assert r["bitwise_equal"] is True
    assert r["time_captured_s"] > 0 and r["time_captured_small_s"] > 0
    assert r["capture_note"] == "captured sampler bitwise equal to the original: True"
