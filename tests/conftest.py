import os

import pytest
import torch

# Two cores on the CI machine: `scripts/test` runs two pytest-xdist workers of one thread each (the tiny
# test models do not gain from more threads); a plain `pytest` run uses both cores in one process.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
