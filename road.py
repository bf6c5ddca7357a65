"""ROAD, RemOve And Debias (Rong et al., ICML 2022): does a map rank the pixels the model needs first?

    probs = road_curves(model, x, targets, scores, seeds)   # {"morf": (N, K), "lerf": (N, K)}
    combined = (probs["lerf"] - probs["morf"]).mean(1) / 2   # per map; higher: more faithful

The most relevant pixels by the map (MoRF) or the least relevant (LeRF) are removed at each fraction
of FRACTIONS and filled by *noisy linear imputation*: each removed pixel becomes the weighted mean
of its in-image neighbours (Rong et al.'s weights, 1/6 for edge neighbours and 1/12 for corners;
kept neighbours fixed), plus a little Gaussian noise. Unlike a black or blurred fill, the fill then
carries no information about where the pixels were, so a map that merely outlines structure (an
edge detector) gains nothing. The model's probability of the explained class is recorded after each
removal. A faithful map loses the class quickly under MoRF and keeps it under LeRF.

Everything is batched: the imputation of every image, fraction and order is one linear system per
(image, channel) with the same structure, solved together by conjugate gradients on the model's
device (pytorch-grad-cam solves one sparse system per image on the CPU; tests/test_road.py checks
that the fills and scores equal theirs). Ties in a map (a ReLU'd Grad-CAM has many zeros) are broken
by a fixed random order per map, so tied pixels are not removed all at once.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # of the pixels removed (Rong et al.)
NOISE = 0.01  # std of the noise added to imputed values, in model-input units (pytorch-grad-cam's)
# Rong et al.'s neighbour weights: 1/6 for the four edge neighbours, 1/12 for the four corners.
KERNEL = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)


def removal_counts(n_pixels: int, fractions=FRACTIONS) -> list[int]:
    """Pixels removed at each fraction: those above numpy's linear-interpolation percentile of the
    map (as pytorch-grad-cam thresholds it), i.e. ceil(f * (P - 1)) of P pixels."""
    return [min(n_pixels - 1, math.ceil(f * (n_pixels - 1) - 1e-9)) for f in fractions]


def pixel_order(scores: torch.Tensor, seeds) -> torch.Tensor:
    """(N, H*W) pixel indices from most to least relevant; ties in the order of a random permutation
    seeded per map (`seeds`), so a rerun removes the same pixels."""
    n, p = len(scores), scores[0].numel()
    perm = torch.stack([torch.randperm(p, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    perm = perm.to(scores.device)
    shuffled = scores.reshape(n, p).gather(1, perm)
    ranked = torch.sort(shuffled, dim=1, descending=True, stable=True).indices
    return perm.gather(1, ranked)


def removal_masks(scores: torch.Tensor, seeds, fractions=FRACTIONS) -> dict[str, torch.Tensor]:
    """{"morf", "lerf"}: bool (N, K, H, W), True where a pixel is removed at fraction k."""
    n, (h, w) = len(scores), scores.shape[-2:]
    order = pixel_order(scores, seeds)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))  # 0: most relevant
    counts = torch.tensor(removal_counts(h * w, fractions), device=order.device)
    morf = rank[:, None, :] < counts[None, :, None]
    lerf = rank[:, None, :] >= h * w - counts[None, :, None]
    return {"morf": morf.reshape(n, len(fractions), h, w), "lerf": lerf.reshape(n, len(fractions), h, w)}


def impute(x: torch.Tensor, remove: torch.Tensor, noise: float = NOISE, seeds=None, tol: float = 1e-7,
           max_iter: int | None = None) -> torch.Tensor:
    """Noisy linear imputation of the removed pixels of a batch.

    x: (N, C, H, W) model input; remove: bool (N, H, W); seeds: one per image for the noise (None:
    no noise). Each removed pixel i solves d_i x_i - sum_{removed j} w_ij x_j = sum_{kept j} w_ij x_j,
    d_i the weight of its in-image neighbours: symmetric and positive definite whenever the image
    keeps a pixel, so conjugate gradients (in float64, per image and channel, all at once) converge.
    """
    n, c, h, w = x.shape
    if bool(remove.flatten(1).all(1).any()):
        raise ValueError("impute: an image has every pixel removed; nothing to impute from")
    conv = neighbour_sum
    r_mask = remove[:, None].expand(n, c, h, w).reshape(n * c, 1, h, w).to(torch.float64)
    v = x.detach().to(torch.float64).reshape(n * c, 1, h, w)
    d = conv(torch.ones(1, 1, h, w, dtype=torch.float64, device=x.device))
    apply = lambda z: r_mask * (d * z - conv(z))
    b = r_mask * conv(v * (1 - r_mask))
    z, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), (r * r).sum((1, 2, 3))
    limit = tol * tol * torch.clamp((b * b).sum((1, 2, 3)), min=1e-30)
    for _ in range(max_iter or 8 * (h + w)):
        if bool((rs <= limit).all()):
            break
        ap = apply(p)
        pap = (p * ap).sum((1, 2, 3))
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, 1), 0)[:, None, None, None]
        z, r = z + alpha * p, r - alpha * ap
        rs_new = (r * r).sum((1, 2, 3))
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1), 0)[:, None, None, None]
        p, rs = r + beta * p, rs_new
    filled = v * (1 - r_mask) + z
    if seeds is not None and noise > 0:
        eps = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                           for s in seeds]).to(x.device).reshape(n * c, 1, h, w)
        filled = filled + noise * eps * r_mask
    return filled.reshape(n, c, h, w).to(x.dtype)


def neighbour_sum(z: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij z_j over each pixel's 8 neighbours with KERNEL's weights, (M, 1, H, W); zero padding,
    so out-of-image neighbours weigh nothing. Eight shifted adds: with float64 conv2d on a 2-core CPU,
    ROAD of 108 images took 6.5 s instead of 1.6 s."""
    h, w = z.shape[-2:]
    padded = F.pad(z, (1, 1, 1, 1))
    out = torch.zeros_like(z)
    for dy in range(3):
        for dx in range(3):
            if KERNEL[dy, dx]:
                out += float(KERNEL[dy, dx]) * padded[..., dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def road_curves(model, x: torch.Tensor, targets: torch.Tensor, scores: torch.Tensor, seeds,
                fractions=FRACTIONS, noise: float = NOISE, batch: int = 256) -> dict[str, torch.Tensor]:
    """Probability of each target after MoRF and LeRF removal at every fraction.

    x: (N, C, H, W) model input; scores: (N, H, W) pixel relevance (higher: more relevant); seeds:
    one per map (tie order and imputation noise). Returns {"morf", "lerf"}: (N, K) probabilities."""
    n, k = len(x), len(fractions)
    masks = removal_masks(scores, seeds, fractions)
    out = {}
    for order, m in masks.items():
        flat = m.reshape(n * k, *m.shape[2:])
        xs = x.repeat_interleave(k, 0)
        # One noise seed per (map, fraction, order): distinct draws, reproducible from the map's seed.
        noise_seeds = [int(s) * 2 * k + 2 * j + (order == "lerf") for s in seeds for j in range(k)]
        probs = []
        for start in range(0, n * k, batch):
            filled = impute(xs[start:start + batch], flat[start:start + batch], noise,
                            noise_seeds[start:start + batch])
            logits = model(filled.contiguous(memory_format=torch.channels_last)).float()
            t = targets.repeat_interleave(k)[start:start + batch]
            probs.append(torch.softmax(logits, 1).gather(1, t[:, None])[:, 0])
        out[order] = torch.cat(probs).reshape(n, k)
    return out


def combined(curves: dict[str, torch.Tensor]) -> np.ndarray:
    """ROAD's combined score per map: the mean over fractions of (LeRF - MoRF) / 2."""
    return ((curves["lerf"] - curves["morf"]).mean(1) / 2).cpu().numpy()


def bootstrap_interval(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over images (NaN-free values)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
