"""Attribution methods: Integrated Gradients, SmoothGrad and Grad-CAM, behind one registry.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

from data import normalize


@dataclass
class AttributionSettings:
    """The knobs of the methods (explain.py's config extends this class, so each is a flag)."""
    ig_steps: int = field(default=50, metadata={"min": 1, "help": "IG integration steps (Captum's default); fewer leave a larger completeness error: see --trust"})
    ig_method: str = field(default="gausslegendre", metadata={"help": "IG quadrature", "choices": ("gausslegendre", "riemann_trapezoid", "riemann_middle")})
    baseline: str = field(default="black", metadata={"help": "IG reference image", "choices": ("black", "blur", "mean")})
    ig_internal_batch: int = field(default=128, metadata={"min": 1, "help": "images x steps per IG forward/backward: bounds memory; 128 is fastest on CPU, GPUs like more"})
    nt_samples: int = field(default=10, metadata={"min": 1, "help": "SmoothGrad: noisy copies per image"})
    nt_stdev: float = field(default=0.15, metadata={"min": 0.0, "help": "SmoothGrad: noise std in input units (inputs span [-1, 1])"})
    batch_size: int = field(default=256, metadata={"min": 1, "help": "images per attribution batch and per database transaction"})
    store_dtype: str = field(default="float16", metadata={"help": "blob precision", "choices": ("float16", "float32")})


@dataclass
class Attribution:
    """What a method returns for a batch of N images."""
    maps: torch.Tensor                  # (N, C, H, W) signed, or (N, H, W) at input resolution
    raw: torch.Tensor | None = None     # a map before upsampling (Grad-CAM's layer resolution)
    delta: torch.Tensor | None = None   # (N,) IG's completeness error: sum(map) - (f(x) - f(baseline))


def make_baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    """IG reference in the model's input space: black pixels, a heavy blur, or the mean colour."""
    if kind == "black":
        return torch.full_like(x, normalize(torch.zeros(1, dtype=torch.uint8)).item())
    if kind == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).contiguous()
    k = x.shape[-1] // 4 * 2 + 1  # a box blur over about half the image removes all structure
    return F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="reflect"), k, stride=1)


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


def _ig_params(s: AttributionSettings, layer: str) -> dict:
    return {"steps": s.ig_steps, "quadrature": s.ig_method, "baseline": s.baseline, "output": "logit"}


@dataclass(frozen=True)
class Method:
    attribute: Callable[..., Attribution]
    params: Callable[[AttributionSettings, str], dict]  # (settings, Grad-CAM layer name) -> database key
    complete: bool = False  # its maps sum to f(x) - f(baseline) up to the delta (IG's completeness)


METHODS = {
    "ig": Method(integrated_gradients, _ig_params, complete=True),
    "smoothgrad": Method(smoothgrad, lambda s, layer: {**_ig_params(s, layer), "nt_samples": s.nt_samples,
                                                       "stdev": s.nt_stdev, "noise": "per-map seed"}),
    "gradcam": Method(gradcam, lambda s, layer: {"layer": layer, "relu": True, "upsample": "bilinear"}),
}


def as_stored(maps: torch.Tensor, dtype: str) -> np.ndarray:
    """Maps in the database's dtype, cast where they were computed: half the bytes to copy for
    float16, and faster than numpy's cast. (A map beyond float16's range becomes inf, which the
    database refuses, naming --store-dtype float32.)"""
    return maps.detach().to(getattr(torch, dtype)).contiguous().cpu().numpy()


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
