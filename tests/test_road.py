"""ROAD (road.py) against an independent implementation, pytorch-grad-cam's (a test-only dependency,
requirements-test.txt), and on controls whose answer is known: a map that is faithful by construction
beats random, its negation loses to it, and tied scores are broken by a seeded random order."""
import numpy as np
import pytest
import torch

import data as D
import road

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam", reason="pip install -r requirements-test.txt")
from pytorch_grad_cam.metrics import road as reference  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # pytorch-grad-cam on numpy 2


@pytest.fixture(scope="module")
def real(shared_data) -> torch.Tensor:
    """16 real PathMNIST test images as model input."""
    x = np.load(shared_data / "pathmnist28_real_test718.npz")["test_images"][:16]
    return D.normalize(torch.from_numpy(x).permute(0, 3, 1, 2)).contiguous()


@pytest.fixture
def noiseless_reference(monkeypatch):
    """pytorch-grad-cam's imputer draws its noise from torch's global generator; without noise the
    two implementations must agree exactly."""
    init = reference.NoisyLinearImputer.__init__
    monkeypatch.setattr(reference.NoisyLinearImputer, "__init__",
                        lambda self, noise=0.0, weighting=reference.neighbors_weights: init(self, 0.0, weighting))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_imputation_equals_pytorch_grad_cams(real, fraction):
    remove = torch.rand(len(real), 28, 28, generator=torch.Generator().manual_seed(int(fraction * 10))) < fraction
    ours = road.impute(real, remove, noise=0.0)
    theirs = torch.stack([reference.NoisyLinearImputer(noise=0.0)(real[i], (~remove[i]).float())
                          for i in range(len(real))])
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)
    assert torch.equal(ours[~remove[:, None].expand_as(ours)], real[~remove[:, None].expand_as(real)])  # kept stay


def test_road_combined_equals_pytorch_grad_cams(real, noiseless_reference, lightcnn_with_fitted_head):
    import model as M
    net = M.inference_copy(lightcnn_with_fitted_head(300, 1e-2, 200))
    with torch.no_grad():
        targets = net(real).argmax(1)
    cams = torch.rand(len(real), 28, 28, generator=torch.Generator().manual_seed(1))  # no ties
    theirs = reference.ROADCombined()(real, cams.numpy(), [ClassifierOutputSoftmaxTarget(int(t)) for t in targets], net)
    ours = road.combined(road.road_curves(net, real, targets, cams, seeds=range(len(real)), noise=0.0))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert np.abs(ours).max() > 1e-3  # the comparison is not between two zeros


def test_removal_counts_and_ties_follow_a_seeded_order():
    flat = torch.zeros(2, 28, 28)  # an all-zero map: every pixel tied
    a, b = road.removal_masks(flat, [1, 1]), road.removal_masks(flat, [1, 2])
    counts = road.removal_counts(784)
    assert counts == [79, 157, 235, 314, 392, 470, 549, 627, 705]  # numpy's percentile, as pytorch-grad-cam
    assert a["morf"].sum((2, 3))[0].tolist() == counts and a["lerf"].sum((2, 3))[0].tolist() == counts
    assert torch.equal(a["morf"][0], a["morf"][1]) and not torch.equal(b["morf"][0], b["morf"][1])
    # A strict ranking is followed exactly: the top pixels go first.
    ramp = torch.arange(784.0).reshape(1, 28, 28)
    m = road.removal_masks(ramp, [0])["morf"][0, 0]
    assert m.flatten().nonzero().flatten().tolist() == list(range(784 - 79, 784))


def test_a_faithful_map_beats_random_and_its_negation_loses():
    """A linear two-class model: the contribution w_i x_i of each pixel is exactly what removing
    it costs (up to the fill), so that map must score far above a random one, and its negation below."""
    torch.manual_seed(0)
    w = torch.randn(2, 3, 12, 12) * 0.5
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 144, 2, bias=False))
    net[1].weight.data = w.reshape(2, -1)
    x = torch.randn(64, 3, 12, 12)
    with torch.no_grad():
        t = net(x).argmax(1)
    faithful = ((w[t] - w[1 - t]) * x).sum(1)  # each pixel's share of the winning margin
    rand = torch.rand(64, 12, 12, generator=torch.Generator().manual_seed(3))
    scores = {name: road.combined(road.road_curves(net, x, t, m, seeds=range(64)))
              for name, m in (("faithful", faithful), ("negated", -faithful), ("random", rand))}
    assert scores["faithful"].mean() > scores["random"].mean() + 0.1
    assert scores["negated"].mean() < scores["random"].mean() - 0.1
    lo, hi = road.bootstrap_interval(scores["faithful"] - scores["random"])
    assert 0 < lo < hi


def test_noise_is_reproducible_from_the_seeds(real):
    remove = torch.rand(len(real), 28, 28, generator=torch.Generator().manual_seed(5)) < 0.5
    a, b = road.impute(real, remove, seeds=range(16)), road.impute(real, remove, seeds=range(16))
    c = road.impute(real, remove, seeds=range(1, 17))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 < float((a - road.impute(real, remove, noise=0.0)).abs().max()) < 0.1  # noise of std 0.01
    with pytest.raises(ValueError, match="every pixel removed"):
        road.impute(real[:1], torch.ones(1, 28, 28, dtype=torch.bool))


def test_the_report_says_per_method_whether_it_beats_random():
    import gallery
    row = lambda method, lo, hi: {"method": method, "name": "road_combined", "value": 0.1, "n": 108, "detail": {
        "random": 0.0, "minus_random": (lo + hi) / 2, "ci": [lo, hi], "edge_minus_random": -0.01}}
    text = gallery.summary_table([row("ig", 0.02, 0.04), row("gradcam", -0.01, 0.03), row("occlusion", -0.05, -0.01)])
    assert "<b>ig</b> beats a random map on ROAD: +0.030 (95% interval +0.020 to +0.040, 108 images)" in text
    assert "<b>gradcam</b> is not distinguishable from a random map" in text
    assert "<b>occlusion</b> is worse than a random map" in text
