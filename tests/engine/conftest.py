import sys
from pathlib import Path

import pytest
import torch

# engine_helpers.py (tiny datasets, trainables and detectors) is shared by these tests and ddp_worker.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads make
    # a 64-px detector step 20-40x slower. Runs after the root conftest's fixture, which allows 2 threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
