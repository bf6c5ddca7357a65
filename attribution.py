"""Attribution methods behind one registry: Integrated Gradients (black, blurred or mean-colour
reference), Blur IG, SmoothGrad, expected gradients, occlusion, LRP (Zennit), the CAM family (Grad-CAM,
Grad-CAM++, HiResCAM, LayerCAM) and pixel maps weighted by Grad-CAM (alone or as a mean of two).

    from attribution import METHODS, AttributionSettings
    method = METHODS["ig"]
    out = method.attribute(model, layer, x, target, AttributionSettings(), seeds)  # an Attribution
    out.maps, out.raw, out.delta          # (N, C, H, W) map; raw low-resolution map; IG delta
    method.params(settings, layer_name)   # what identifies the map in the database

Every method has one signature: the model (an inference copy), its Grad-CAM layer, a normalised
batch x (N, C, H, W), target classes (N,), the settings and one seed per map. Adding a method is
one function of that signature plus one line in METHODS; the tests parametrised over METHODS then
cover it (shape, storage round trip, resume).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

from data import normalize


@dataclass
class AttributionSettings:
    """The knobs of the methods (explain.py's config extends this class, so each is a flag)."""
    ig_steps: int = field(default=50, metadata={"min": 1, "help": "IG integration steps (Captum's default); fewer leave a larger completeness error: see --trust"})
    ig_method: str = field(default="gausslegendre", metadata={"help": "IG quadrature", "choices": ("gausslegendre", "riemann_trapezoid", "riemann_middle")})
    baseline: str = field(default="gaussian", metadata={"help": "IG reference image (and occlusion's fill): a Gaussian blur (sigma = 1/7 of the side, Sturmfels et al. 2020; the default, chosen by bench/bench.py xai), black pixels, a box blur over half the image, or the mean colour", "choices": ("gaussian", "black", "blur", "mean")})
    eg_samples: int = field(default=32, metadata={"min": 1, "help": "expected gradients: (reference, point on the path) draws per map"})
    eg_references: int = field(default=256, metadata={"min": 1, "help": "expected gradients: reference images, a seeded draw from the explained split (its images only, not labels)"})
    ig_internal_batch: int = field(default=128, metadata={"min": 1, "help": "images x steps per IG forward/backward: bounds memory; 128 is fastest on CPU, GPUs like more"})
    nt_samples: int = field(default=10, metadata={"min": 1, "help": "SmoothGrad: noisy copies per image"})
    nt_stdev: float = field(default=0.15, metadata={"min": 0.0, "help": "SmoothGrad: noise std in input units (inputs span [-1, 1])"})
    lrp_composite: str = field(default="epsilon_gamma_box", metadata={"help": "LRP (lrp, lrp_x_gradcam): Zennit's rule composite (BatchNorm merged into its convolution): z-box on the input layer, gamma = 0.25 on convolutions, epsilon on dense layers; or z+ on convolutions and the flat rule on the input layer (blur_ig_lrp_x_gradcam always uses this one)", "choices": ("epsilon_gamma_box", "epsilon_plus_flat")})
    batch_size: int = field(default=256, metadata={"min": 1, "help": "images per attribution batch and per database transaction"})
    store_dtype: str = field(default="float16", metadata={"help": "blob precision", "choices": ("float16", "float32")})


@dataclass
class Attribution:
    """What a method returns for a batch of N images."""
    maps: torch.Tensor                  # (N, C, H, W) signed, or (N, H, W) at input resolution
    raw: torch.Tensor | None = None     # a map before upsampling (Grad-CAM's layer resolution)
    delta: torch.Tensor | None = None   # (N,) IG's completeness error: sum(map) - (f(x) - f(baseline))


def make_baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    """IG reference in the model's input space: black pixels, a Gaussian or a box blur, or the mean colour."""
    if kind == "black":
        return torch.full_like(x, normalize(torch.zeros(1, dtype=torch.uint8)).item())
    if kind == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).contiguous()
    if kind == "gaussian":
        return gaussian_blur(x, x.shape[-1] / 7)
    k = x.shape[-1] // 4 * 2 + 1  # a box blur over about half the image removes all structure
    return F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="reflect"), k, stride=1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders, the kernel cut at 3 sigma (and inside the image);
    sigma 0 is the image itself."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, [radius] * 4, mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _ig(model, x, baseline, target, s: AttributionSettings) -> tuple[torch.Tensor, torch.Tensor]:
    # Captum runs at least one whole batch of images per pass and warns, per call, when the
    # internal batch is smaller; asking for that batch directly is the same work without the warning.
    return IntegratedGradients(model).attribute(
        x, baselines=baseline, target=target, n_steps=s.ig_steps, method=s.ig_method,
        internal_batch_size=max(s.ig_internal_batch, len(x)), return_convergence_delta=True)


def integrated_gradients(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
    """Integrated Gradients of the target logit (Sundararajan et al., 2017)."""
    attr, delta = _ig(model, x, make_baseline(x, s.baseline), target, s)
    return Attribution(attr, delta=delta)


def _input_gradients(model, points: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The gradient of each point's target logit with respect to that point, one forward/backward."""
    p = points.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(model(p).float().gather(1, targets[:, None]).sum(), p)[0]


def blur_ig(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
    """Blur IG (Xu et al., CVPR 2020): IG along the scale-space path from the image blurred with a
    Gaussian of sigma = 1/7 of the side (the --baseline gaussian image) to the image itself, instead of
    the straight line between them. The path is cut at --ig-steps equally spaced sigmas; each segment
    contributes its exact change (x_k+1 - x_k) times the gradient at its midpoint sigma, so the map
    sums to f(x) - f(blurred x) up to the delta, which shrinks with more steps."""
    n, k = len(x), s.ig_steps
    sigmas = [x.shape[-1] / 7 * (1 - i / k) for i in range(k + 1)]  # from the blurred end to x
    start = prev = make_baseline(x, "gaussian")  # the path's first point: the blur of sigma side/7
    per_pass = max(1, s.ig_internal_batch // n)  # path points per forward/backward: n images each
    attr = torch.zeros_like(x)
    for first in range(0, k, per_pass):
        steps = range(first, min(k, first + per_pass))
        mids = torch.cat([gaussian_blur(x, (sigmas[i] + sigmas[i + 1]) / 2) for i in steps])
        grads = _input_gradients(model, mids, target.repeat(len(steps))).view(len(steps), n, *x.shape[1:])
        for j, i in enumerate(steps):
            end = gaussian_blur(x, sigmas[i + 1])
            attr += (end - prev) * grads[j]
            prev = end
    with torch.no_grad():
        gap = (model(x).float() - model(start).float()).gather(1, target[:, None])[:, 0]
    return Attribution(attr, delta=attr.flatten(1).double().sum(1) - gap.double())


def smoothgrad(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
    """SmoothGrad over IG: the average IG map of noisy copies (Smilkov et al., 2017).

    Each map's noise is drawn from its own seed, so a map is the same whichever batch, shard or
    rerun computes it. The delta kept is the largest in magnitude over the copies."""
    n, k = len(x), s.nt_samples
    noise = torch.stack([torch.randn(k, *x.shape[1:], generator=torch.Generator().manual_seed(int(seed)))
                         for seed in seeds]).to(x.device, x.dtype)
    noisy = (x[:, None] + s.nt_stdev * noise).flatten(0, 1).contiguous(memory_format=torch.channels_last)
    baseline = make_baseline(x, s.baseline).repeat_interleave(k, 0)  # the clean image's, as Captum's NoiseTunnel
    attr, delta = _ig(model, noisy, baseline, target.repeat_interleave(k), s)
    delta = delta.view(n, k)
    return Attribution(attr.view(n, k, *x.shape[1:]).mean(1),
                       delta=delta.gather(1, delta.abs().argmax(1, keepdim=True))[:, 0])


def gradcam(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
    """Grad-CAM (Selvaraju et al., 2017): ReLU of the gradient-weighted sum of the layer's channels,
    upsampled bilinearly to the input."""
    raw = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    up = LayerAttribution.interpolate(raw, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return Attribution(up[:, 0], raw=raw[:, 0])


def expected_gradients(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
    """Expected gradients (Erion et al., 2021; Captum's GradientShap without input noise): the mean of
    (x - r) * grad f(r + a (x - r)) over references r drawn from the data and a ~ U(0, 1).

    The references are `s.references` (normalised images; explain.py draws --eg-references of them,
    seeded, from the split it explains). Each map draws its --eg-samples (reference, a) pairs from its own seed, so a map
    is the same whichever batch computes it. The delta is sum(map) - (f(x) - mean f(r)) over the
    drawn references: completeness holds in expectation only, so it shrinks with more samples."""
    refs = getattr(s, "references", None)
    if refs is None:
        raise ValueError("expected gradients needs reference images: set settings.references")
    n, k = len(x), s.eg_samples
    draws = [np.random.default_rng(int(seed)) for seed in seeds]
    pick = torch.from_numpy(np.stack([g.integers(0, len(refs), k) for g in draws])).to(refs.device)
    alpha = torch.from_numpy(np.stack([g.random(k) for g in draws])).to(x.device, x.dtype)
    r = refs[pick.flatten()].to(x.dtype).view(n, k, *x.shape[1:])
    diff = x[:, None] - r
    points = (r + alpha[:, :, None, None, None] * diff).flatten(0, 1)
    t = target.repeat_interleave(k)
    b = s.ig_internal_batch
    grads = [_input_gradients(model, points[i:i + b], t[i:i + b]) for i in range(0, n * k, b)]
    with torch.no_grad():
        r_flat = r.flatten(0, 1)
        ref_logits = torch.cat([model(r_flat[i:i + b].contiguous(memory_format=torch.channels_last)).float()
                                .gather(1, t[i:i + b, None])[:, 0] for i in range(0, n * k, b)])
        gap = model(x).float().gather(1, target[:, None])[:, 0] - ref_logits.view(n, k).mean(1)
    attr = (diff * torch.cat(grads).view(n, k, *x.shape[1:])).mean(1)
    return Attribution(attr, delta=attr.flatten(1).double().sum(1) - gap.double())


def occlusion(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
    """Occlusion (Zeiler and Fergus, 2014; Captum's): the drop in the target logit when a square of
    1/14 of the side (2 px at 28, 16 at 224) is replaced by the reference image (--baseline), the
    squares tiling the image; each pixel gets its square's drop, split evenly over the channels so
    that the channel sum is that drop. (Squares of 1/7 sliding by half gave a coarser map that ranked
    worse by ROAD on the real folds: bench/bench.py xai, docs/trust.md.)"""
    c, h = x.shape[1], x.shape[-1]
    side = max(1, h // 14)
    with torch.no_grad():
        attr = Occlusion(model).attribute(x, sliding_window_shapes=(c, side, side), strides=(c, side, side),
                                          baselines=make_baseline(x, s.baseline), target=target,
                                          perturbations_per_eval=max(1, s.ig_internal_batch // len(x)))
    return Attribution(attr / c)


def lrp(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
    """Layer-wise relevance propagation (Bach et al., 2015) by Zennit's composites (Anders et al., 2021),
    each BatchNorm merged into the convolution before it (Zennit's canonizer; a no-op for an
    inference copy, whose BatchNorm is already folded). Relevance starts as the target logit and is
    conserved layer by layer except what the biases and the epsilon absorb: the delta is
    sum(map) - logit. Zennit over Captum's LRP: Captum has no z-box rule for the input layer and
    no canonizer (it gives BatchNorm a rule of its own instead of merging it)."""
    import torchvision  # here, as in model.py: it adds seconds to a script's start-up
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer
    canonizer = ResNetCanonizer() if isinstance(model, torchvision.models.ResNet) else SequentialMergeBatchNorm()
    low, high = normalize(torch.tensor([0, 255], dtype=torch.uint8)).tolist()
    composite = (EpsilonGammaBox(low=low, high=high, canonizers=[canonizer]) if s.lrp_composite == "epsilon_gamma_box"
                 else EpsilonPlusFlat(canonizers=[canonizer]))
    with torch.enable_grad(), _no_inplace(model), Gradient(model=model, composite=composite) as attributor:
        out, relevance = attributor(x.detach().clone().requires_grad_(True),
                                    lambda y: F.one_hot(target, y.shape[1]).to(y) * y)
    logit = out.detach().float().gather(1, target[:, None])[:, 0]
    relevance = relevance.detach().float()
    return Attribution(relevance, delta=relevance.flatten(1).double().sum(1) - logit.double())


class _no_inplace:
    """ReLU(inplace=False) for the duration: Zennit's hooks must see each layer's own output."""

    def __init__(self, model):
        self.relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU) and m.inplace]

    def __enter__(self):
        for m in self.relus:
            m.inplace = False

    def __exit__(self, *exc):
        for m in self.relus:
            m.inplace = True


def cam_weighted(*pixel_methods: Callable[..., Attribution]):
    """A pixel map weighted by Grad-CAM: each pixel's relevance (channel sum) times the upsampled
    Grad-CAM map scaled to a maximum of 1. Grad-CAM says which region holds the class evidence at
    its layer's coarse grid, the pixel map where inside it (Selvaraju et al.'s Guided Grad-CAM, with
    a faithful pixel map in place of guided backpropagation). Given several pixel methods, the mean
    of their weighted maps, each first scaled to a largest |value| of 1 so that each counts alike
    whatever its units (an ensemble whose members fail in different places: bench/bench.py planted)."""
    def method(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
        cam = _peak_scaled(gradcam(model, layer, x, target, s, seeds).maps.detach().float())
        weighted = [pm(model, layer, x, target, s, seeds).maps.detach().float().sum(1) * cam for pm in pixel_methods]
        return Attribution(weighted[0] if len(weighted) == 1 else torch.stack([_peak_scaled(w) for w in weighted]).mean(0))
    method.__doc__ = cam_weighted.__doc__
    return method


def _peak_scaled(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps divided by their largest |value| (an all-zero map stays zero)."""
    return maps / maps.flatten(1).abs().amax(1).clamp(min=1e-12)[:, None, None]


def lrp_plus_flat(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
    """LRP with the epsilon-z+-flat composite, whatever --lrp-composite says (the ensemble's member:
    it found the wide marks best of the LRP rules, bench/bench.py planted)."""
    return lrp(model, layer, x, target, replace(s, lrp_composite="epsilon_plus_flat"), seeds)


def _activations_and_gradients(model, layer, x, target) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output A and the gradient of the target logit with respect to it, (N, K, h, w) each."""
    seen = {}
    hook = layer.register_forward_hook(lambda module, args, out: seen.__setitem__("a", out))
    try:
        with torch.enable_grad():
            out = model(x.detach().requires_grad_(True)).float().gather(1, target[:, None]).sum()
            grad = torch.autograd.grad(out, seen["a"])[0]
    finally:
        hook.remove()
    return seen["a"].detach().float(), grad.detach().float()


def _cam(cam_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """A CAM method from its rule (A, dY/dA) -> (N, h, w) map: ReLU, then bilinear upsampling to the input."""
    def method(model, layer, x, target, s: AttributionSettings, seeds) -> Attribution:
        raw = F.relu(cam_of(*_activations_and_gradients(model, layer, x, target)))[:, None]
        up = F.interpolate(raw, tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return Attribution(up[:, 0], raw=raw[:, 0])
    method.__doc__ = cam_of.__doc__
    return method


def _gradcampp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al., 2018): channel weights sum(alpha * ReLU(g)) with the closed-form
    alpha = g^2 / (2 g^2 + sum(A) g^3) of an exponential output (0 where g = 0)."""
    g2, g3 = g * g, g * g * g
    denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(g != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    return ((alpha * F.relu(g)).sum((2, 3), keepdim=True) * a).sum(1)


def _hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos and Carin, 2020): the element-wise product of gradient and activation, summed
    over channels; unlike Grad-CAM's averaged gradients it provably reflects the layer's evidence."""
    return (g * a).sum(1)


def _layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al., 2021): activations weighted by their positive gradient, per position."""
    return (F.relu(g) * a).sum(1)


def _ig_params(s: AttributionSettings, layer: str) -> dict:
    return {"steps": s.ig_steps, "quadrature": s.ig_method, "baseline": s.baseline, "output": "logit"}


def _cam_params(s: AttributionSettings, layer: str) -> dict:
    return {"layer": layer, "relu": True, "upsample": "bilinear"}


@dataclass(frozen=True)
class Method:
    attribute: Callable[..., Attribution]
    params: Callable[[AttributionSettings, str], dict]  # (settings, Grad-CAM layer name) -> database key
    reference: Callable[[torch.Tensor, AttributionSettings], torch.Tensor] | None = None  # for completeness:
    # the maps sum to f(x) - f(reference(x)) up to the stored delta, which fewer steps make larger
    cam: bool = False       # a map of the model's Grad-CAM layer (non-negative, N x H x W), else of the input
    title: str = ""         # its name in figures
    uses_layer: bool = False  # an input-space map that also needs the Grad-CAM layer
    conserves_logit: bool = False  # the maps sum to the target logit itself up to the delta (LRP)

    @property
    def needs_layer(self) -> bool:
        return self.cam or self.uses_layer


METHODS = {
    "ig": Method(integrated_gradients, _ig_params, reference=lambda x, s: make_baseline(x, s.baseline), title="IG"),
    "blur_ig": Method(blur_ig, lambda s, layer: {"steps": s.ig_steps, "path": "gaussian scale space",
                                                 "sigma": "side/7", "rule": "midpoint", "output": "logit"},
                      reference=lambda x, s: make_baseline(x, "gaussian"), title="Blur IG"),
    "smoothgrad": Method(smoothgrad, lambda s, layer: {**_ig_params(s, layer), "nt_samples": s.nt_samples,
                                                       "stdev": s.nt_stdev, "noise": "per-map seed"}, title="SmoothGrad"),
    "expected_gradients": Method(expected_gradients, lambda s, layer: {
        "samples": s.eg_samples, "references": s.eg_references, "drawn": "seed 0 from the split", "output": "logit"}, title="expected gradients"),
    "occlusion": Method(occlusion, lambda s, layer: {"window": "side/14", "stride": "window", "fill": s.baseline,
                                                     "output": "logit"}, title="occlusion"),
    "lrp": Method(lrp, lambda s, layer: {"composite": s.lrp_composite, "canonizer": "merge batchnorm",
                                         "library": "zennit", "output": "logit"}, conserves_logit=True, title="LRP"),
    "gradcam": Method(gradcam, _cam_params, cam=True, title="Grad-CAM"),
    "gradcam++": Method(_cam(_gradcampp), _cam_params, cam=True, title="Grad-CAM++"),
    "hirescam": Method(_cam(_hirescam), _cam_params, cam=True, title="HiResCAM"),
    "layercam": Method(_cam(_layercam), _cam_params, cam=True, title="LayerCAM"),
    # signed (N, H, W) pixel maps that need the Grad-CAM layer for their weights
    "blur_ig_x_gradcam": Method(cam_weighted(blur_ig), lambda s, layer: {
        "pixels": "blur_ig", "steps": s.ig_steps, **_cam_params(s, layer), "weight": "gradcam / max"},
        uses_layer=True, title="Blur IG × Grad-CAM"),
    "lrp_x_gradcam": Method(cam_weighted(lrp), lambda s, layer: {
        "pixels": "lrp", "composite": s.lrp_composite, **_cam_params(s, layer), "weight": "gradcam / max"},
        uses_layer=True, title="LRP × Grad-CAM"),
    "blur_ig_lrp_x_gradcam": Method(cam_weighted(blur_ig, lrp_plus_flat), lambda s, layer: {
        "pixels": "blur_ig + lrp", "steps": s.ig_steps, "composite": "epsilon_plus_flat", **_cam_params(s, layer),
        "weight": "gradcam / max", "combine": "mean of the weighted maps, each / max |map|"},
        uses_layer=True, title="(Blur IG + LRP) × Grad-CAM"),
}


def draw_references(images_uint8: torch.Tensor, n: int, device) -> torch.Tensor:
    """Expected gradients' reference images: n (at most all) drawn without replacement, seed 0, normalised."""
    pick = np.sort(np.random.default_rng(0).permutation(len(images_uint8))[:n])
    return normalize(images_uint8[torch.from_numpy(pick)].to(device)).contiguous(memory_format=torch.channels_last)


def as_stored(maps: torch.Tensor, dtype: str) -> np.ndarray:
    """Maps in the database's dtype, cast where they were computed: half the bytes to copy for
    float16, and faster than numpy's cast. (A map beyond float16's range becomes inf, which the
    database refuses, naming --store-dtype float32.)"""
    return maps.detach().to(getattr(torch, dtype)).contiguous().cpu().numpy()


def pixel_scores(maps: torch.Tensor, kind: str = "positive") -> torch.Tensor:
    """(N,H,W) scores from (N,C,H,W) or (N,H,W) maps: channel sum, then 'positive', 'abs' or 'signed'."""
    s = maps.sum(1) if maps.ndim == 4 else maps
    return s.clamp(min=0) if kind == "positive" else s.abs() if kind == "abs" else s


def map_seeds(dataset: str, split: str, indices, targets) -> np.ndarray:
    """One seed per map from what identifies it (data key, split, image index, target class)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{dataset}/{split}/{i}/{t}".encode(), digest_size=7).digest(),
                                    "little") for i, t in zip(np.asarray(indices).tolist(),
                                                              np.asarray(targets).tolist())], dtype=np.int64)


def attribute_batches(fn, model, layer, images, targets, settings, device, batch_size: int,
                      seeds=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fn (a method's or a control's attribute) over uint8 images and int64 targets in batches:
    (maps, deltas or None) as float32 / float64 on the CPU."""
    seeds = np.zeros(len(images), np.int64) if seeds is None else np.asarray(seeds)
    maps, deltas = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
        out = fn(model, layer, x, targets[start:start + batch_size].to(device), settings,
                 seeds[start:start + batch_size])
        maps.append(out.maps.detach().float().cpu())
        deltas.append(None if out.delta is None else out.delta.detach().double().cpu())
    return torch.cat(maps), (None if deltas[0] is None else torch.cat(deltas))
