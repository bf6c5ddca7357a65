"""Model-parameter randomisation checks: the cascading one of Adebayo et al. (2018) and those of
Hedström et al., "Sanity checks revisited" (2023/2024). Each compares a method's maps of the trained
model with its maps of the same model with parametrised layers re-initialised.

    out = sanity_check(model, layer, fn, images, targets, original, cfg, device)  # per stage, cascading
    out = smooth_mprt(model, layer, fn, images, targets, cfg, device, seeds)   # per map, lower: better
    out = efficient_mprt(model, layer, fn, images, targets, cfg, device, seeds)  # per map, higher: better

sMPRT (smooth MPRT) denoises before comparing: each map is the mean of the method's maps of
--smprt-samples copies of the image with Gaussian noise of 0.1 x the image's value range (the last
copy noise-free), as Quantus's SmoothMPRT does; the score is the Spearman correlation of the two
denoised |maps|. Noise-driven maps (gradients of a ReLU network) then no longer look "model-blind"
merely because they are noisy.

eMPRT (efficient MPRT) asks whether randomising the model makes the map more complex: the relative
rise in the discrete entropy of the map's values (a 100-bin histogram, Quantus's default) from the
trained to the randomised model, (H_random - H_trained) / H_trained. A map that reflects what the
model learned should become noisier (> 0) when what it learned is destroyed.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from attribution import attribute_batches, pixel_scores
from data import normalize
from stats import nanmean, spearman

NOISE = 0.1      # sMPRT's noise, in units of each image's value range (Quantus's default)
ENTROPY_BINS = 100


def randomisation_stages(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """Parametrised layers (Conv2d, Linear, BatchNorm) grouped by block, output first:
    LightCNN's classifier.5, classifier.2, features.4, ...; ResNet-50's fc, layer4.2, ..., conv1."""
    groups = {}
    for name, module in model.named_modules():  # registration order is forward order here
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)):
            groups.setdefault(".".join(name.split(".")[:2]), []).append(name)
    return list(groups.items())[::-1]


def sanity_check(model, layer_name, fn, images, targets, original, cfg, device, seeds=None) -> dict:
    """Cascading model-parameter randomisation (Adebayo et al., 2018).

    Re-initialises the model's blocks one after another from the output towards the input (on a
    copy), recomputes the maps for the same targets (and the same per-map seeds) and compares them
    with `original` by Spearman rank correlation per image, on |scores| and on signed scores. Stage
    "none" recomputes the intact model's maps: it should give ~1 and so checks the comparison
    itself. An image whose original map is constant (an all-zero Grad-CAM) has no ranking to keep
    and is left out (NaN); a recomputed map that became constant counts as 0. A method that reflects
    the model decorrelates. Returns the stage names, the mean per stage ("abs", "signed") and the
    per-map values (N, stages) ("per_map_abs", "per_map_signed").
    """
    net = copy.deepcopy(model)
    layer = net.get_submodule(layer_name) if layer_name else None
    ref = {kind: pixel_scores(original, kind).flatten(1).numpy() for kind in ("abs", "signed")}
    ranked = {kind: (r != r[:, :1]).any(1) for kind, r in ref.items()}
    stages = [("none", [])] + randomisation_stages(net)
    rhos = {kind: np.full((len(images), len(stages)), np.nan) for kind in ref}
    for k, (stage, names) in enumerate(stages):
        with torch.random.fork_rng():
            torch.manual_seed(cfg.trust_seed + 1 + k)
            for name in names:
                net.get_submodule(name).reset_parameters()
        maps, _ = attribute_batches(fn, net, layer, images, targets, cfg, device, cfg.batch_size, seeds)
        for kind in ref:
            rho = np.nan_to_num(spearman(pixel_scores(maps, kind).numpy(), ref[kind]), nan=0.0)
            rhos[kind][:, k] = np.where(ranked[kind], rho, np.nan)
    return {"layers": [s for s, _ in stages], **{kind: nanmean(r, 0).tolist() for kind, r in rhos.items()},
            **{f"per_map_{kind}": r for kind, r in rhos.items()}}


def randomised(model: torch.nn.Module, groups, seed: int) -> torch.nn.Module:
    """A copy of the model with every parametrised layer in `groups` re-initialised (seeded)."""
    net = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _, names in groups:
            for name in names:
                net.get_submodule(name).reset_parameters()
    return net


def _maps(fn, model, layer_name, x, targets, cfg, seeds) -> torch.Tensor:
    layer = model.get_submodule(layer_name) if layer_name else None
    out = [fn(model, layer, x[i:i + cfg.batch_size].contiguous(memory_format=torch.channels_last),
              targets[i:i + cfg.batch_size], cfg, seeds[i:i + cfg.batch_size]).maps.detach().float().cpu()
           for i in range(0, len(x), cfg.batch_size)]
    maps = torch.cat(out)
    return maps.sum(1) if maps.ndim == 4 else maps  # pixel scores: the channel sum of IG-type maps


def smoothed_maps(fn, model, layer_name, images, targets, cfg, device, seeds) -> torch.Tensor:
    """(N, H, W) mean of the maps of --smprt-samples noisy copies of each image, the last noise-free;
    the noise of copy j of a map is drawn from the map's seed and j."""
    x = normalize(images.to(device))
    std = NOISE * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    t = targets.to(device)
    total = 0
    for j in range(cfg.smprt_samples):
        noisy = x
        if j < cfg.smprt_samples - 1:
            eps = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s) * 97 + j))
                               for s in seeds]).to(device, x.dtype)
            noisy = x + std * eps
        total = total + _maps(fn, model, layer_name, noisy, t, cfg, seeds)
    return total / cfg.smprt_samples


def smooth_mprt(model, layer_name, fn, images, targets, cfg, device, seeds, groups) -> np.ndarray:
    """Per map: Spearman of the denoised |maps| of the trained and the fully randomised model."""
    net = randomised(model, groups, cfg.trust_seed)
    a, b = (smoothed_maps(fn, m, layer_name, images, targets, cfg, device, seeds) for m in (model, net))
    return np.nan_to_num(spearman(a.abs().numpy(), b.abs().numpy()), nan=0.0)


def discrete_entropy(values: torch.Tensor, bins: int = ENTROPY_BINS) -> np.ndarray:
    """Shannon entropy (nats) of the histogram of each row's values over `bins` equal bins spanning
    the row's range (numpy's histogram); 0 for a constant row."""
    out = []
    for row in values.flatten(1).double().numpy():
        counts, _ = np.histogram(row, bins=bins)
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return np.array(out)


def efficient_mprt(model, layer_name, fn, images, targets, cfg, device, seeds, groups) -> dict[str, np.ndarray]:
    """Per map: the relative rise in the entropy of its values from the trained to the randomised
    model (NaN where the trained map is constant: no entropy to rise from), and both entropies."""
    net = randomised(model, groups, cfg.trust_seed)
    x, t = normalize(images.to(device)), targets.to(device)
    h = [discrete_entropy(_maps(fn, m, layer_name, x, t, cfg, seeds)) for m in (model, net)]
    with np.errstate(invalid="ignore", divide="ignore"):
        rise = np.where(h[0] > 0, (h[1] - h[0]) / h[0], np.nan)
    return {"emprt": rise, "entropy_trained": h[0], "entropy_randomised": h[1]}
