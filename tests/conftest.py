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


@pytest.fixture(scope="session")
def lightcnn_with_fitted_head():
    """make(n_train, lr, steps): a LightCNN whose frozen random features feed a classifier head
    fitted for a moment on synthetic training images (full training is too slow on CPU for unit
    tests): predictions vary, some right, some wrong. Seeded, so every number is reproducible."""
    import torch.nn.functional as F

    import data
    from model import build_model

    def make(n_train: int, lr: float, steps: int) -> torch.nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = build_model("lightcnn").eval()
            train = data.load_data("synthetic", 28, "data", ("train",), seed=0,
                                   synthetic_sizes=(n_train, 10, 40)).splits["train"]
            with torch.no_grad():
                h = net.classifier[:5](net.features(data.normalize(train.images)))
            head = net.classifier[5]
            opt = torch.optim.Adam(head.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(head(h), train.labels).backward()
                opt.step()
        return net
    return make


@pytest.fixture(scope="session")
def hand_gradcam():
    """compute(net, layer, x, t): Grad-CAM computed by hand from the layer's activations and gradients."""
    import torch.nn.functional as F

    def compute(net, layer, x, t) -> torch.Tensor:
        """Selvaraju et al.: relu(sum_k mean_hw(d y_t / d A_k) A_k), A the layer's output (N, K, h, w).

        The hook sits on the whole block, so A is the tensor the next layer reads: for LightCNN the
        result of the block's in-place ReLU (a copy of the BatchNorm output would keep the negative
        pre-activations, and a hook on the BatchNorm hands over storage the ReLU then overwrites)."""
        acts = []
        handle = layer.register_forward_hook(lambda mod, inp, out: acts.append(out))
        try:
            out = net(x)
        finally:
            handle.remove()
        (a,) = acts
        (grad,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), a)
        weights = grad.mean((2, 3), keepdim=True)
        return F.relu((weights * a).sum(1, keepdim=True)).detach()
    return compute
