"""Model-parameter randomisation checks: the cascading one of Adebayo et al. (2018) and those of
Hedström et al., "Sanity checks revisited" (2023/2024). Each compares a method's maps of the trained
model with its maps of the same model with parametrised layers re-initialised.

    stages = cascade(model, seed)                       # the randomised layers, drawn once
    out = sanity_check(model, layer, fn, images, targets, original, cfg, device, stages=stages)
    out = smooth_mprt(model, layer, fn, images, targets, cfg, device, seeds, stages)   # lower: better
    out = efficient_mprt(model, layer, fn, images, targets, cfg, device, seeds, stages)  # higher: better

The three share maps: the cascade's last stage is the fully randomised model that sMPRT and eMPRT
use, and its first ("none") the trained model, so `stage_maps` computed once for MPRT gives eMPRT
both of its maps and sMPRT its noise-free ones (trust.py does so; the three functions above compute
everything themselves and are the reference the shared path is tested against).

sMPRT (smooth MPRT) denoises before comparing: each map is the mean of the method's maps of
--smprt-samples copies of the image with Gaussian noise of 0.1 x the image's value range (the last
copy noise-free), as Quantus's SmoothMPRT does; the score is the Spearman correlation of the two
denoised |maps|. Noise-driven maps (gradients of a ReLU network) then no longer look "model-blind"
merely because they are noisy.

eMPRT (efficient MPRT) asks whether randomising the model makes the map more complex: the relative
rise in the discrete entropy of the map's values (a 100-bin histogram, Quantus's default) from the
trained to the randomised model, (H_random - H_trained) / H_trained. A map that reflects what the
model learned should become noisier (> 0) when what it learned is destroyed.

Maps are computed with BatchNorm folded into the convolutions (model.inference_copy of each stage;
a re-initialised BatchNorm folds to the identity): the same function, 10% faster on a CPU.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from attribution import pixel_scores
from data import normalize
from model import inference_copy
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


def cascade(model: torch.nn.Module, seed: int) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The cascading randomisation drawn once: per stage of randomisation_stages (output first), the
    re-initialised state of its layers, drawn in that order from one stream seeded with `seed`. Every
    chunk of images meets the same randomised models, and applying all stages gives `randomised`.

    Which random model is drawn can matter more than which images meet it: for Blur IG x Grad-CAM
    on 64 synthetic images, eMPRT under seeds 0-4 was 0.12, 0.70, 0.55, 1.10 and 0.93, each +-0.24 to
    0.36 over images (docs/trust.md). trust.py therefore draws a cascade per few images."""
    net = copy.deepcopy(model)
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for stage, names in randomisation_stages(net):
            for name in names:
                net.get_submodule(name).reset_parameters()
            out.append((stage, {f"{name}.{key}": v for name in names
                                for key, v in net.get_submodule(name).state_dict().items()}))
    return out


def draw_seed(seed: int, draw: int) -> int:
    """The seed of the cascade of random draw `draw` under --trust-seed `seed`."""
    return int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])


def randomised(model: torch.nn.Module, stages) -> torch.nn.Module:
    """A copy of the model with every stage of a cascade applied: all parametrised layers re-initialised."""
    net = copy.deepcopy(model)
    for _, state in stages:
        net.load_state_dict(state, strict=False)
    return net


def _maps(fn, model, layer_name, x, targets, cfg, seeds) -> torch.Tensor:
    """(N, H, W) pixel scores of a method on normalised images, --batch-size maps per call, BatchNorm
    folded (model.inference_copy); the channel sum of IG-type maps."""
    net = inference_copy(model)
    layer = net.get_submodule(layer_name) if layer_name else None
    seeds = np.asarray(seeds)
    out = [fn(net, layer, x[i:i + cfg.batch_size].contiguous(memory_format=torch.channels_last),
              targets[i:i + cfg.batch_size], cfg, seeds[i:i + cfg.batch_size]).maps.detach().float().cpu()
           for i in range(0, len(x), cfg.batch_size)]
    return pixel_scores(torch.cat(out), "signed")


def stage_maps(model, layer_name, fn, images, targets, cfg, device, seeds, stages) -> list[torch.Tensor]:
    """(N, H, W) pixel scores of the trained model ("none"), then after each stage of the cascade."""
    x, t = normalize(images.to(device)), targets.to(device)
    seeds = np.zeros(len(images), np.int64) if seeds is None else seeds
    net = copy.deepcopy(model)
    out = [_maps(fn, net, layer_name, x, t, cfg, seeds)]
    for _, state in stages:
        net.load_state_dict(state, strict=False)
        out.append(_maps(fn, net, layer_name, x, t, cfg, seeds))
    return out


def mprt_scores(maps: list[torch.Tensor], original: torch.Tensor) -> dict[str, np.ndarray]:
    """Per map and stage (N, stages): Spearman of each stage's map with the original map, on |scores|
    and on signed scores. An image whose original map is constant (an all-zero Grad-CAM) has no
    ranking to keep and is left out (NaN); a recomputed map that became constant counts as 0."""
    out = {}
    for kind in ("abs", "signed"):
        ref = pixel_scores(original, kind).flatten(1).numpy()
        ranked = (ref != ref[:, :1]).any(1)
        rho = [np.nan_to_num(spearman(pixel_scores(m, kind).numpy(), ref), nan=0.0) for m in maps]
        out[kind] = np.where(ranked[:, None], np.stack(rho, 1), np.nan)
    return out


def sanity_check(model, layer_name, fn, images, targets, original, cfg, device, seeds=None, stages=None) -> dict:
    """Cascading model-parameter randomisation (Adebayo et al., 2018).

    Re-initialises the model's blocks one after another from the output towards the input (on a
    copy; `stages` from cascade(model, cfg.trust_seed) unless given), recomputes the maps for the
    same targets (and the same per-map seeds) and compares them with `original` (mprt_scores).
    Stage "none" recomputes the intact model's maps: it should give ~1 and so checks the comparison
    itself. A method that reflects the model decorrelates. Returns the stage names, the mean per
    stage ("abs", "signed") and the per-map values (N, stages) ("per_map_abs", "per_map_signed").
    """
    stages = cascade(model, cfg.trust_seed) if stages is None else stages
    rhos = mprt_scores(stage_maps(model, layer_name, fn, images, targets, cfg, device, seeds, stages), original)
    return {"layers": ["none"] + [s for s, _ in stages], **{kind: nanmean(r, 0).tolist() for kind, r in rhos.items()},
            **{f"per_map_{kind}": r for kind, r in rhos.items()}}


def noisy_copies(x: torch.Tensor, seeds, copies) -> torch.Tensor:
    """(len(copies) * N, C, H, W), copy by copy: copy j of image i is x_i plus Gaussian noise of NOISE
    x its value range, drawn from the map's seed and j, so a map's noise does not depend on its batch."""
    std = NOISE * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    eps = torch.stack([torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s) * 97 + j))
                                    for s in seeds]) for j in copies]).to(x.device, x.dtype)
    return (x[None] + std[None] * eps).flatten(0, 1)


def smprt_scores(model, net, layer_name, fn, images, targets, cfg, device, seeds, trained, random) -> np.ndarray:
    """sMPRT per map from the noise-free maps of the trained model and of its fully randomised copy
    `net` (`trained`, `random`: stage_maps' first and last), adding the --smprt-samples - 1 noisy
    copies of every image in one batched pass per model."""
    x, t = normalize(images.to(device)), targets.to(device)
    copies = cfg.smprt_samples - 1
    noisy, tt, ss = noisy_copies(x, seeds, range(copies)), t.repeat(copies), np.tile(np.asarray(seeds), copies)
    smooth = [(_maps(fn, m, layer_name, noisy, tt, cfg, ss).view(copies, *clean.shape).sum(0) + clean) / cfg.smprt_samples
              for m, clean in ((model, trained), (net, random))]
    return np.nan_to_num(spearman(smooth[0].abs().numpy(), smooth[1].abs().numpy()), nan=0.0)


def smoothed_maps(fn, model, layer_name, images, targets, cfg, device, seeds) -> torch.Tensor:
    """(N, H, W) mean of the maps of --smprt-samples noisy copies of each image, the last noise-free,
    one copy at a time."""
    x, t = normalize(images.to(device)), targets.to(device)
    total = 0
    for j in range(cfg.smprt_samples):
        noisy = noisy_copies(x, seeds, [j]) if j < cfg.smprt_samples - 1 else x
        total = total + _maps(fn, model, layer_name, noisy, t, cfg, seeds)
    return total / cfg.smprt_samples


def smooth_mprt(model, layer_name, fn, images, targets, cfg, device, seeds, stages) -> np.ndarray:
    """Per map: Spearman of the denoised |maps| of the trained and the fully randomised model."""
    net = randomised(model, stages)
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


def emprt_scores(trained: torch.Tensor, random: torch.Tensor) -> dict[str, np.ndarray]:
    """Per map: the relative rise in the entropy of its values from the trained to the randomised
    model (NaN where the trained map is constant: no entropy to rise from), and both entropies."""
    h = [discrete_entropy(m) for m in (trained, random)]
    with np.errstate(invalid="ignore", divide="ignore"):
        rise = np.where(h[0] > 0, (h[1] - h[0]) / h[0], np.nan)
    return {"emprt": rise, "entropy_trained": h[0], "entropy_randomised": h[1]}


def efficient_mprt(model, layer_name, fn, images, targets, cfg, device, seeds, stages) -> dict[str, np.ndarray]:
    """eMPRT per map (emprt_scores) from maps of the trained and the fully randomised model."""
    x, t = normalize(images.to(device)), targets.to(device)
    return emprt_scores(*(_maps(fn, m, layer_name, x, t, cfg, seeds) for m in (model, randomised(model, stages))))
