"""sMPRT and eMPRT (mprt.py): the entropy against scipy's, and on controls whose answer is known:
a map that ignores the model is unchanged by randomisation (sMPRT rho 1, eMPRT 0), a map that is
the model's own output changes."""
import numpy as np
import pytest
import torch

import attribution as A
import data as D
import mprt
import trust

pytestmark = pytest.mark.usefixtures("one_thread")


class Cfg(A.AttributionSettings):
    trust_seed = 0
    smprt_samples = 4


@pytest.fixture(scope="module")
def real(shared_data) -> torch.Tensor:
    return torch.from_numpy(np.load(shared_data / "pathmnist28_real_test718.npz")["test_images"][:8]).permute(0, 3, 1, 2)


def test_discrete_entropy_equals_scipys_of_numpys_histogram():
    stats = pytest.importorskip("scipy.stats")
    values = torch.randn(5, 28, 28, generator=torch.Generator().manual_seed(0)) ** 3
    ours = mprt.discrete_entropy(values)
    theirs = [stats.entropy(np.histogram(v.numpy().ravel(), bins=100)[0]) for v in values]
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    assert mprt.discrete_entropy(torch.ones(1, 4, 4))[0] == 0


def test_a_model_blind_map_fails_both_checks_and_a_model_map_passes(real, lightcnn_with_fitted_head):
    net = lightcnn_with_fitted_head(300, 1e-2, 200).eval()
    t, seeds = torch.zeros(len(real), dtype=torch.int64), np.arange(len(real))
    groups = mprt.randomisation_stages(net)
    blind = mprt.smooth_mprt(net, None, trust.edge_control, real, t, Cfg(), "cpu", seeds, groups)
    np.testing.assert_allclose(blind, 1.0)  # the image's edges: the same map whatever the weights
    e = mprt.efficient_mprt(net, None, trust.edge_control, real, t, Cfg(), "cpu", seeds, groups)
    np.testing.assert_allclose(e["emprt"], 0.0)
    # Grad-CAM of the trained model against that of a re-initialised one: the maps must change
    cam = mprt.smooth_mprt(net, "features.4", A.gradcam, real, t, Cfg(), "cpu", seeds, groups)
    assert cam.mean() < 0.9
    ig = mprt.smooth_mprt(net, None, A.integrated_gradients, real, t, Cfg(ig_steps=8), "cpu", seeds, groups)
    assert np.all(ig < 0.99)


def test_randomised_copy_changes_every_layer_and_leaves_the_model(lightcnn_with_fitted_head):
    net = lightcnn_with_fitted_head(300, 1e-2, 200)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy = mprt.randomised(net, mprt.randomisation_stages(net), seed=0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    changed = [k for k, v in copy.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    weights = [k for k, v in before.items() if k.endswith("weight") and v.ndim > 1]  # conv and linear (BatchNorm resets to 1)
    assert len(weights) == 6
    assert set(weights) <= set(changed)
