"""sMPRT and eMPRT (mprt.py): the entropy against scipy's, and on controls whose answer is known:
a map that ignores the model is unchanged by randomisation (sMPRT rho 1, eMPRT 0), a map that is
the model's own output changes."""
import numpy as np
import pytest
import torch

import attribution as A
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
    groups = mprt.cascade(net, 0)
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
    copy = mprt.randomised(net, mprt.cascade(net, 0))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    changed = [k for k, v in copy.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    weights = [k for k, v in before.items() if k.endswith("weight") and v.ndim > 1]  # conv and linear (BatchNorm resets to 1)
    assert len(weights) == 6
    assert set(weights) <= set(changed)


def test_trusts_shared_randomised_maps_equal_those_computed_separately(real, lightcnn_with_fitted_head, monkeypatch):
    """--trust computes MPRT's cascade once per random draw and takes eMPRT's two maps and sMPRT's
    noise-free maps from it, with sMPRT's noisy copies batched: the same numbers as mprt's three
    checks computed one by one (each drawing its own maps) on each draw's images, from fewer maps."""
    net = lightcnn_with_fitted_head(300, 1e-2, 200).eval()
    cfg = Cfg(ig_steps=8, batch_size=3)  # several batches, and the noisy copies cross batch borders
    fn, layer = A.METHODS["blur_ig_x_gradcam"].attribute, "features.4"
    t, seeds = torch.arange(len(real)) % 9, np.arange(len(real)) * 1000 + 7
    original, _ = A.attribute_batches(fn, net, net.get_submodule(layer), real, t, cfg, "cpu", cfg.batch_size, seeds)
    index = np.arange(len(real)) + 100
    maps = trust.Maps("blur_ig_x_gradcam", np.arange(len(real)), index, t.numpy(), t.numpy(), seeds, original, None, real)
    counted = []
    plain = mprt._maps
    monkeypatch.setattr(mprt, "_maps", lambda fn, model, layer, x, *a: counted.append(len(x)) or plain(fn, model, layer, x, *a))

    ctx = trust.Context(net, layer, cfg, "cpu", [str(c) for c in range(9)])
    ctx.draw_of = {int(i): 5 + k % 2 for k, i in enumerate(index)}  # two random models, images interleaved
    shared = trust.measure_sanity(ctx, maps) | trust.measure_smprt(ctx, maps)
    shared_maps = sum(counted)
    counted.clear()
    for draw in (5, 6):
        rows = np.flatnonzero(shared["_draw"] == draw)
        assert list(rows) == list(range(draw - 5, len(real), 2))
        r, stages = torch.from_numpy(rows), mprt.cascade(net, mprt.draw_seed(cfg.trust_seed, draw))
        args = (net, layer, fn, real[r], t[r])
        alone = mprt.sanity_check(*args, original[r], cfg, "cpu", seeds[rows], stages=stages)
        smprt = mprt.smooth_mprt(*args, cfg, "cpu", seeds[rows], stages)
        emprt = mprt.efficient_mprt(*args, cfg, "cpu", seeds[rows], stages)
        np.testing.assert_allclose(shared["_abs"][rows], alone["per_map_abs"], atol=1e-9)
        np.testing.assert_allclose(shared["_signed"][rows], alone["per_map_signed"], atol=1e-9)
        np.testing.assert_allclose(shared["emprt"][rows], emprt["emprt"], atol=1e-9)
        np.testing.assert_allclose(shared["smprt_spearman"][rows], smprt, atol=1e-4)  # other batches: float rounding
    assert np.nanmin(shared["_abs"][:, 0]) > 0.99 and shared["smprt_spearman"].mean() < 0.9  # the checks still check
    n, k, s = len(real), len(stages) + 1, Cfg.smprt_samples
    assert shared_maps == n * k + 2 * n * (s - 1)  # the cascade, then only the noisy copies
    assert sum(counted) == n * k + 2 * n * s + 2 * n


def test_cascade_is_drawn_once_for_every_chunk(lightcnn_with_fitted_head):
    """The randomised models do not depend on how many images meet them: the cascade's stages are
    the sanity check's models, and applying all of them is sMPRT's and eMPRT's fully randomised one."""
    net = lightcnn_with_fitted_head(300, 1e-2, 200)
    a, b = mprt.cascade(net, 3), mprt.cascade(net, 3)
    assert [s for s, _ in a] == [s for s, _ in mprt.randomisation_stages(net)]
    assert all(torch.equal(a[i][1][k], b[i][1][k]) for i in range(len(a)) for k in a[i][1])
    full = mprt.randomised(net, a).state_dict()
    for stage, state in a:
        assert all(torch.equal(full[k], v) for k, v in state.items())
    assert not torch.equal(mprt.cascade(net, 4)[0][1]["classifier.5.weight"], a[0][1]["classifier.5.weight"])
