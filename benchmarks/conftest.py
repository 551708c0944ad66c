import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _two_threads():
    torch.set_num_threads(int(os.environ.get("DNOPS_BENCH_THREADS", "2")))
