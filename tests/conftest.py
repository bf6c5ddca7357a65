"""Shared fixtures. Tests run on CPU with tiny data; the real-data tests skip when the files are absent."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the scripts and shared modules live flat in the repo root
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of small real PathMNIST files (see its README.md)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not present (it sits next to the repo checkout)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): its
    subprocesses run with OMP_NUM_THREADS=1, so in-process runs then do the same arithmetic bit for
    bit, and small tensors run faster without two OpenMP threads waiting on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
