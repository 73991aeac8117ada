"""Two spawns serve the model suite (each spawned rank pays ~7 s of imports on 2 cores)."""

import pytest

from harness import run_ranks
from models.workers import multi_rank_suite, single_rank_suite


@pytest.fixture(scope="session")
def single():
    return run_ranks(single_rank_suite, 1, timeout=240)[0]


@pytest.fixture(scope="session")
def multi(tmp_path_factory):
    return run_ranks(multi_rank_suite, 4, str(tmp_path_factory.mktemp("ckpt")), timeout=300)
