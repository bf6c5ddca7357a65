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


# ----------------------------------------------------------------------------- LRP (Zennit)

class TinyNet(torch.nn.Module):
    """conv 3->2 (3x3, no padding) -> ReLU -> flatten -> linear 8 -> ReLU -> linear 3, on 4x4 inputs."""

    def __init__(self, bias: bool):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, bias=bias), torch.nn.ReLU())
        self.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 8, bias=bias), torch.nn.ReLU(),
                                              torch.nn.Linear(8, 3, bias=bias))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.6

    def forward(self, x):
        return self.classifier(self.features(x))


def _lrp_by_hand(net: TinyNet, x: np.ndarray, t: int, eps: float = 1e-6) -> np.ndarray:
    """Montavon et al. (2019), rule by rule in numpy: epsilon on the dense layers (biases absorb
    their share), z-box on the input layer with the input box [-1, 1] (biases cancel out of its
    three terms), ReLUs pass relevance on unchanged."""
    w1, w2, w3 = (m.weight.detach().double().numpy() for m in (net.features[0], net.classifier[1], net.classifier[3]))
    b1, b2, b3 = (np.zeros(len(w)) if m.bias is None else m.bias.detach().double().numpy()
                  for w, m in ((w1, net.features[0]), (w2, net.classifier[1]), (w3, net.classifier[3])))
    # the conv as a matrix over the 48 input pixels: row (k, i, j) holds its receptive field
    conv = np.zeros((2, 2, 2, 3, 4, 4))
    for k in range(2):
        for i in range(2):
            for j in range(2):
                conv[k, i, j, :, i:i + 3, j:j + 3] = w1[k]
    conv = conv.reshape(8, 48)
    a0 = x.reshape(48)
    a1 = np.maximum(conv @ a0 + np.repeat(b1, 4), 0)
    a2 = np.maximum(w2 @ a1 + b2, 0)
    z3 = w3 @ a2 + b3

    def epsilon(a, w, b, r):
        z = w @ a + b
        return a * (w.T @ (r / (z + eps * np.where(z >= 0, 1, -1))))
    r3 = np.zeros(3)
    r3[t] = z3[t]
    r1 = epsilon(a1, w2, b2, epsilon(a2, w3, b3, r3))
    lo, hi = -np.ones(48), np.ones(48)
    wp, wn = np.clip(conv, 0, None), np.clip(conv, None, 0)
    z = conv @ a0 - wp @ lo - wn @ hi
    s = r1 / (z + 1e-6 * np.where(z >= 0, 1, -1))
    return (a0 * (conv.T @ s) - lo * (wp.T @ s) - hi * (wn.T @ s)).reshape(3, 4, 4)


@pytest.mark.parametrize("bias", [False, True])
def test_lrp_equals_the_rules_computed_by_hand(bias):
    net = TinyNet(bias).eval()
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t = torch.tensor([0, 1, 2, 0, 1])
    out = A.METHODS["lrp"].attribute(net, None, x, t, A.AttributionSettings(), None)
    for i in range(len(x)):
        np.testing.assert_allclose(out.maps[i].double().numpy(), _lrp_by_hand(net, x[i].double().numpy(), int(t[i])),
                                   rtol=1e-4, atol=1e-5)
    logits = net(x).gather(1, t[:, None])[:, 0].detach().double()
    np.testing.assert_allclose(out.delta.numpy(), out.maps.flatten(1).double().sum(1).numpy() - logits.numpy(),
                               atol=1e-5)
    if not bias:  # conservation: without biases no relevance is absorbed on the way down
        np.testing.assert_allclose(out.maps.flatten(1).double().sum(1).numpy(), logits.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_plus_flat"])
def test_lrp_conserves_the_logit_through_lightcnn(real, composite):
    """Every layer of LightCNN (conv, BatchNorm merged by Zennit's canonizer, ReLU, max pooling,
    dropout, dense) with its biases and BatchNorm shifts zeroed: no relevance is absorbed, so each
    map sums to its logit, as IG's maps sum to their logit gap."""
    torch.manual_seed(0)
    net = M.build_model("lightcnn").eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.zero_()
        if isinstance(m, torch.nn.Linear):
            m.bias.data.zero_()
    x = real[:8]
    with torch.no_grad():
        t = net(x).argmax(1)  # the predicted class: a positive logit to conserve
    s = A.AttributionSettings(lrp_composite=composite)
    out = A.METHODS["lrp"].attribute(net, net.features[4], x, t, s, None)
    logits = net(x).gather(1, t[:, None])[:, 0].detach().double()
    assert (logits > 0).all()
    np.testing.assert_allclose(out.maps.flatten(1).double().sum(1).numpy(), logits.numpy(), rtol=2e-3)
    assert all(m.inplace for m in net.modules() if isinstance(m, torch.nn.ReLU))  # restored
    # BatchNorm merged by Zennit equals BatchNorm folded by torch (the inference copy)
    folded = A.METHODS["lrp"].attribute(M.inference_copy(net), None, x, t, s, None)
    np.testing.assert_allclose(folded.maps.numpy(), out.maps.numpy(), atol=1e-4 * out.maps.abs().max().item())


def test_lrp_conserves_the_logit_through_resnet50(real):
    """ResNet-50's residual additions (Zennit's ResNet canonizer splits relevance between the two
    branches in proportion to their contributions) conserve too, with biases and shifts zeroed."""
    torch.manual_seed(0)
    net = M.build_model("resnet50", size=28).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data.zero_()
            m.running_mean.zero_()
    net.fc.bias.data.zero_()
    x = real[:2]
    with torch.no_grad():
        t = net(x).argmax(1)
        logits = net(x).gather(1, t[:, None])[:, 0].double()
    for m in (net, M.inference_copy(net)):
        out = A.METHODS["lrp"].attribute(m, None, x, t, A.AttributionSettings(), None)
        np.testing.assert_allclose(out.maps.flatten(1).double().sum(1).numpy(), logits.numpy(), rtol=2e-3)


def test_cam_weighted_maps_are_the_pixel_map_times_the_scaled_gradcam(real, net, hand_gradcam):
    layer = net.get_submodule(M.GRADCAM_LAYERS["lightcnn"])
    with torch.no_grad():
        t = net(real).argmax(1)
    s = A.AttributionSettings(ig_steps=8)
    for name, pixels in (("blur_ig_x_gradcam", "blur_ig"), ("lrp_x_gradcam", "lrp")):
        out = A.METHODS[name].attribute(net, layer, real, t, s, None).maps
        p = A.METHODS[pixels].attribute(net, layer, real, t, s, None).maps.sum(1)
        cam = torch.nn.functional.interpolate(hand_gradcam(net, layer, real.clone().requires_grad_(True), t),
                                              size=28, mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(1)
        assert (peak > 0).float().mean() >= 0.5  # not a product of empty maps
        expect = p * cam / peak.clamp(min=1e-12)[:, None, None]
        assert A.METHODS[name].needs_layer and not A.METHODS[name].cam
        np.testing.assert_allclose(out.numpy(), expect.numpy(), atol=1e-5 * expect.abs().max().item())


def test_the_ensemble_is_the_mean_of_its_members_weighted_maps_each_scaled_to_one(real, net, hand_gradcam):
    """(Blur IG + LRP) x Grad-CAM by hand: Blur IG's and LRP's (epsilon-z+-flat, whatever
    --lrp-composite says) channel sums, each times the hand-made Grad-CAM over its peak, each divided
    by its largest |value|, then averaged; so its largest |value| is at most 1, and neither member
    alone gives it."""
    layer = net.get_submodule(M.GRADCAM_LAYERS["lightcnn"])
    with torch.no_grad():
        t = net(real).argmax(1)
    s = A.AttributionSettings(ig_steps=8)  # lrp_composite: the default epsilon_gamma_box, overridden inside
    out = A.METHODS["blur_ig_lrp_x_gradcam"].attribute(net, layer, real, t, s, None).maps
    cam = torch.nn.functional.interpolate(hand_gradcam(net, layer, real.clone().requires_grad_(True), t),
                                          size=28, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1)
    assert (peak > 0).float().mean() >= 0.5  # not a mean of empty maps
    cam = cam / peak.clamp(min=1e-12)[:, None, None]
    plus_flat = A.AttributionSettings(ig_steps=8, lrp_composite="epsilon_plus_flat")
    members = [A.METHODS["blur_ig"].attribute(net, layer, real, t, s, None).maps.sum(1) * cam,
               A.METHODS["lrp"].attribute(net, layer, real, t, plus_flat, None).maps.sum(1) * cam]
    scaled = [m / m.flatten(1).abs().amax(1).clamp(min=1e-12)[:, None, None] for m in members]  # 0 stays 0
    expect = (scaled[0] + scaled[1]) / 2
    np.testing.assert_allclose(out.numpy(), expect.numpy(), atol=1e-5)
    assert out.abs().amax().item() <= 1 + 1e-6
    for m in scaled:  # both members count: the mean is neither of them
        assert (out - m).abs().amax().item() > 0.05
