"""RL rollouts split across ranks, the way users scale them: ``torchrun`` with 2 processes on
gloo (CPU). With one generator per row, row ``i`` depends on its generator alone, so the ranks'
rows, gathered, equal the whole batch sampled in one process (tests/distributed/rollout_ranks.py
checks it on rank 0)."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "rollout_ranks.py")


def test_torchrun_two_ranks_give_the_rows_of_one_process():
    pytest.importorskip("torch.distributed.run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
         "--nproc_per_node=2", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ranks=2 rows=12 bitwise-equal" in res.stdout, res.stdout[-3000:]
