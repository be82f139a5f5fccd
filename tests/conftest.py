import pytest
import torch

# Two cores on the CI machine: keep tests deterministic and avoid oversubscription.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
