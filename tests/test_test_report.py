"""The test run's own output under ``-q`` (what ``make test`` shows): the seed is always printed,
the GPU-only skips are one line, other skips one line per reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SAMPLE_TESTS = '''
import pytest

def test_runs():
    pass

@pytest.mark.gpu
@pytest.mark.parametrize("i", range(5))
def test_marked_gpu(i):
    pytest.skip("needs a CUDA device")

@pytest.mark.parametrize("i", range(3))
def test_needs_cuda(i, device):
    pass

def test_other_reason():
    pytest.skip("no cuobjdump")
'''


def test_quiet_run_prints_the_seed_and_one_line_for_gpu_only_skips(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    (tmp_path / "test_skipped_module.py").write_text(
        'import pytest\npytest.importorskip("no_such_module_here")\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, FLOWMATCH_TEST_SEED="4321", PYTEST_ADDOPTS=""),
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "random base seed 4321 (replay: FLOWMATCH_TEST_SEED=4321)" in out
    # 5 marked gpu + the 3 cuda params of the device fixture, unless this machine has a GPU.
    import torch

    gpu_only = 5 + (0 if torch.cuda.is_available() else 3)
    assert out.count("GPU-only tests skipped") == 1
    assert f"{gpu_only} GPU-only tests skipped" in out
    assert "1 skipped: no cuobjdump" in out
    assert "1 skipped: could not import 'no_such_module_here'" in out
    assert "SKIPPED" not in out  # no per-test skip lines
