import pytest
import torch

# The test models are tiny: a second thread gains nothing, and where the CI machine's 2 cores are shared
# (`scripts/test` runs two pytest-xdist workers), two OpenMP threads per process wait on each other
# (measured: 5.3 s instead of 0.4 s per image).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
