import os
import random
import time

import pytest
import torch


def pytest_report_header(config):
    return [
        f"flowmatch_fast tests: torch {torch.__version__}, backend request "
        f"{os.environ.get('FLOWMATCH_FAST_BACKEND', 'auto')!r}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"random base seed {BASE_SEED} (set FLOWMATCH_TEST_SEED to replay)"
    ]


# Fresh random cases each run; the seed is printed in the header and in every failure message.
BASE_SEED = int(os.environ.get("FLOWMATCH_TEST_SEED", int(time.time()) % 100000))


@pytest.fixture
def case_rng(request):
    """A per-test RNG derived from the base seed and the test id (replayable)."""
    return random.Random(f"{BASE_SEED}:{request.node.nodeid}")


def _cuda_available():
    return torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not _cuda_available():
        pytest.skip("needs a CUDA device")
    return torch.device(request.param)
