"""The attribution methods beyond IG and Grad-CAM, each against an independent computation:
Grad-CAM++, HiResCAM and LayerCAM against pytorch-grad-cam (a test-only dependency), occlusion, Blur IG and
expected gradients against their definitions computed by hand, the Gaussian-blur IG reference
against scipy's filter."""
import numpy as np
import pytest
import torch

import attribution as A
import data as D
import model as M

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # pytorch-grad-cam on numpy 2


@pytest.fixture(scope="module")
def real(shared_data) -> torch.Tensor:
    x = np.load(shared_data / "pathmnist28_real_test718.npz")["test_images"][:12]
    return D.normalize(torch.from_numpy(x).permute(0, 3, 1, 2)).contiguous()


@pytest.fixture(scope="module")
def net(lightcnn_with_fitted_head):
    return M.inference_copy(lightcnn_with_fitted_head(300, 1e-2, 200))


@pytest.mark.parametrize("name, theirs", [("gradcam", "GradCAM"), ("gradcam++", "GradCAMPlusPlus"),
                                          ("hirescam", "HiResCAM"), ("layercam", "LayerCAM")])
def test_cam_methods_equal_pytorch_grad_cams(real, net, name, theirs):
    cams = pytest.importorskip("pytorch_grad_cam", reason="pip install -r requirements-test.txt")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    layer = net.get_submodule(M.GRADCAM_LAYERS["lightcnn"])
    with torch.no_grad():
        t = net(real).argmax(1)
    out = A.METHODS[name].attribute(net, layer, real, t, A.AttributionSettings(), None)
    with getattr(cams, theirs)(model=net, target_layers=[layer]) as cam:
        ref = cam(input_tensor=real.clone().requires_grad_(True), targets=[ClassifierOutputTarget(int(c)) for c in t])
    # pytorch-grad-cam resizes bilinearly (OpenCV) and scales each map to [0, 1]
    maps = out.maps.detach()
    lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    ours = ((maps - lo) / (hi - lo + 1e-7)).numpy()
    assert (out.raw > 0).flatten(1).any(1).float().mean() >= 0.5  # not a comparison of empty maps
    np.testing.assert_allclose(ours, ref, atol=1e-3)  # OpenCV resizes in fixed point


def test_hirescam_and_layercam_differ_from_gradcam(real, net):
    """Grad-CAM averages the gradient over positions; the others must not, or they test nothing."""
    layer = net.get_submodule(M.GRADCAM_LAYERS["lightcnn"])
    t = torch.zeros(len(real), dtype=torch.int64)
    maps = {m: A.METHODS[m].attribute(net, layer, real, t, A.AttributionSettings(), None).maps
            for m in ("gradcam", "hirescam", "layercam")}
    assert (maps["hirescam"] - maps["gradcam"]).abs().max() > 1e-3
    assert (maps["layercam"] - maps["gradcam"]).abs().max() > 1e-3


def test_occlusion_is_the_drop_of_each_pixels_square(real, net):
    """By hand for four pixels of one image: the 2x2 square (1/14 of the side; the squares tile the
    image) that holds the pixel, filled with the Gaussian-blur reference, and the drop of the target
    logit; two pixels of one square get the same value."""
    s = A.AttributionSettings(baseline="gaussian")
    x, t = real[:1], torch.tensor([3])
    got = A.occlusion(net, None, x, t, s, None).maps[0].sum(0)
    fill = A.make_baseline(x, "gaussian")
    with torch.no_grad():
        full = net(x)[0, 3]
        for (i, j) in [(0, 0), (13, 6), (12, 7), (27, 27)]:
            top, left = i // 2 * 2, j // 2 * 2
            y = x.clone()
            y[..., top:top + 2, left:left + 2] = fill[..., top:top + 2, left:left + 2]
            assert got[i, j].item() == pytest.approx(float(full - net(y)[0, 3]), abs=1e-4)
    assert got[13, 6] == got[12, 7] and got.unique().numel() == 14 * 14


def test_expected_gradients_with_one_reference_is_ig_from_it(real, net):
    """With a single reference image, expected gradients is IG from it integrated by Monte Carlo:
    many samples approach Captum's IG, and completeness holds up to the sampling error."""
    from captum.attr import IntegratedGradients
    x, t = real[:4], torch.tensor([0, 1, 2, 3])
    ref = real[4:5]
    s = A.AttributionSettings(eg_samples=2048)
    s.references = ref
    eg = A.expected_gradients(net, None, x, t, s, seeds=[1, 2, 3, 4])
    ig = IntegratedGradients(net).attribute(x, baselines=ref.expand_as(x), target=t, n_steps=64)
    err = (eg.maps - ig).flatten(1).norm(dim=1) / ig.flatten(1).norm(dim=1)
    assert err.max() < 0.1
    with torch.no_grad():
        gap = net(x).gather(1, t[:, None])[:, 0] - net(ref)[0, t]
    assert (eg.delta.abs() / gap.abs()).max() < 0.05


def test_expected_gradients_is_the_same_in_any_batch(real, net):
    s = A.AttributionSettings(eg_samples=8)
    s.references = real[6:]
    t = torch.arange(6) % 9
    together = A.expected_gradients(net, None, real[:6], t, s, seeds=range(6)).maps
    apart = torch.cat([A.expected_gradients(net, None, real[i:i + 1], t[i:i + 1], s, seeds=[i]).maps
                       for i in range(6)])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="reference images"):
        A.expected_gradients(net, None, real[:1], t[:1], A.AttributionSettings(), seeds=[0])


def test_gaussian_reference_equals_scipys_blur(real):
    ndimage = pytest.importorskip("scipy.ndimage")
    ours = A.make_baseline(real, "gaussian")  # sigma = 28 / 7 = 4 px, cut at 3 sigma
    theirs = ndimage.gaussian_filter(real.numpy().astype(np.float64), sigma=(0, 0, 4, 4), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)


def test_blur_ig_sums_to_the_logit_change_from_the_blurred_image_and_differs_from_ig(real, net):
    """Blur IG's map sums to f(x) - f(gaussian reference) computed here, its error shrinking with the
    steps (the path is not the straight line, so only in the limit); its first path point is the
    Gaussian reference IG starts from, yet the maps differ (another path)."""
    with torch.no_grad():
        t = net(real).argmax(1)
        gap = (net(real) - net(A.make_baseline(real, "gaussian"))).gather(1, t[:, None])[:, 0].double()
    errors = []
    for steps in (8, 64):
        out = A.METHODS["blur_ig"].attribute(net, None, real, t, A.AttributionSettings(ig_steps=steps), None)
        total = out.maps.detach().flatten(1).double().sum(1)
        np.testing.assert_allclose(out.delta.numpy(), (total - gap).numpy(), atol=1e-4)
        errors.append((total - gap).abs().max().item())
    assert errors[1] < errors[0] / 4 and errors[1] < 0.02 * gap.abs().max().item()
    ig = A.METHODS["ig"].attribute(net, None, real, t, A.AttributionSettings(baseline="gaussian"), None).maps
    rho = np.corrcoef(ig.flatten().numpy(), out.maps.detach().flatten().numpy())[0, 1]
    assert 0.2 < rho < 0.99
    # A batch of 3 path points per pass gives the maps of one pass per point
    one = A.METHODS["blur_ig"].attribute(net, None, real, t, A.AttributionSettings(ig_steps=64, ig_internal_batch=40), None)
    np.testing.assert_allclose(one.maps.detach().numpy(), out.maps.detach().numpy(), atol=1e-5)
