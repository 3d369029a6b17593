"""``python -m flowmatch_fast``: ``--version`` and the ``info`` report for bug reports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import flowmatch_fast
from flowmatch_fast import info
from flowmatch_fast.__main__ import main


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"flowmatch_fast {flowmatch_fast.__version__}"


def test_info_reports_versions_the_extension_backends_and_environment(monkeypatch, capsys):
    monkeypatch.setenv("FLOWMATCH_FAST_BACKEND", "triton")
    monkeypatch.delenv("FLOWMATCH_FAST_CUDA_ARCHS", raising=False)
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"flowmatch_fast : {flowmatch_fast.__version__}" in text
    assert f"torch          : {torch.__version__}" in text
    for label in ("Python", "Triton", "NVIDIA driver", "extension"):
        assert f"\n{label:<15}: " in text, label
    for device in ("cpu", "cuda"):
        section = text.split(f"backends ({device}) :\n")[1].split("\n")[:3]
        assert [line.split(":")[0].strip() for line in section] == ["torch", "triton", "cuda"]
        for line, (name, reason) in zip(section, flowmatch_fast.available_backends(device).items()):
            assert line.endswith("available" if reason is None else reason), line
    assert "  FLOWMATCH_FAST_BACKEND='triton'" in text
    assert "  FLOWMATCH_FAST_CUDA_ARCHS (unset)" in text
    for var in info.ENV_VARS:
        assert f"  {var}" in text


def test_info_runs_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "flowmatch_fast", "info"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("flowmatch_fast : ")


def test_no_command_prints_the_help_and_fails(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "demo" in out and "info" in out and "--version" in out


def test_help_of_flowmatching_names_the_required_x_dims():
    import pydoc

    from flowmatch_fast import FlowMatching

    doc = FlowMatching.__doc__
    assert "x_dims" in doc and "Required" in doc
    assert "x_dims" in pydoc.render_doc(FlowMatching, renderer=pydoc.plaintext).split("Method")[0]
