"""Stain normalisation fitted on a training split (train.py --stain-norm): every image is mapped to
the training images' stain before the model sees it, at training, evaluation and explanation.

    reference = fit("macenko", train.images)       # plain floats: stored in the checkpoint
    images = normalise(images, reference)           # uint8 (N, 3, H, W) -> uint8, batched

Reinhard (Reinhard et al., 2001): each image's L*a*b* mean and standard deviation set to the
reference's (stain.reinhard). Macenko (Macenko et al., ISBI 2009), as torchstain's numpy
normaliser computes it (tested equal to it, image by image): optical density from a light of 240,
pixels with every channel's density above 0.15 count as tissue; the two stain vectors are the 1st
and 99th percentile angles in the plane of the density's two main axes, hematoxylin the one with
more red density; each stain's concentration is scaled so that its 99th percentile matches the
reference's, and the image is rebuilt with the reference's stain vectors. The reference of a
training split is fitted the same way on the pooled pixels of up to 256 of its images (seeded).
An image with fewer than MIN_TISSUE tissue pixels (background, a blank tile) has no stain to
estimate and is left as it is.

Measured on 48 real tissue images (tests/test_stainnorm.py), the mean grey-level difference between
two re-stainings of the same tissue: Reinhard 10.6 -> 2.4 (HED scaling), 12.6 -> 1.9 (HED offsets),
20.1 -> 2.8 (with light changes); Macenko 10.6 -> 6.0, 12.6 -> 13.9 and 20.1 -> 19.0. On 28 px
images its percentiles of a few hundred tissue pixels undo a stain's scaling, not its shift.

model.predict applies it to every image it scores, after any change the stain benchmark makes, so
evaluate.py --stain-shift measures the normalisation too (docs/robustness.md has its CV numbers).
"""
from __future__ import annotations

import torch

from stain import lab_statistics, reinhard

KINDS = ("none", "reinhard", "macenko")
LIGHT, BETA, ALPHA = 240.0, 0.15, 1.0  # torchstain's (and Macenko et al.'s) defaults
MIN_TISSUE = 16
FIT_IMAGES = 256


def fit(kind: str, images: torch.Tensor, seed: int = 0) -> dict:
    """The reference of a training split: {"kind": ..., and its numbers as plain lists}."""
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:FIT_IMAGES]
    pooled = images[pick].permute(1, 0, 2, 3).reshape(1, 3, 1, -1)  # one image of all their pixels
    if kind == "reinhard":
        return {"kind": kind, "lab": lab_statistics(pooled.double() / 255)[0].tolist()}
    if kind == "macenko":
        he, _, max_c, ok = macenko_stains(pooled)
        if not ok[0]:
            raise ValueError("the training images have too little tissue to fit a Macenko reference")
        return {"kind": kind, "stains": he[0].tolist(), "max_concentration": max_c[0].tolist()}
    raise ValueError(f"stain normalisation {kind!r}: one of {', '.join(KINDS)}")


def normalise(images: torch.Tensor, reference: dict | None, batch: int = 1024) -> torch.Tensor:
    """uint8 (N, 3, H, W) images in the reference's stain (unchanged without a reference)."""
    if not reference or reference.get("kind", "none") == "none":
        return images
    return torch.cat([_normalise(images[i:i + batch], reference) for i in range(0, len(images), batch)])


def _normalise(x: torch.Tensor, reference: dict) -> torch.Tensor:
    if reference["kind"] == "reinhard":
        target = torch.tensor(reference["lab"], dtype=torch.float64)
        return (reinhard(x.double() / 255, target) * 255).round().to(torch.uint8)
    _, c, max_c, ok = macenko_stains(x)
    stains, target_max = (torch.tensor(reference[k], dtype=torch.float64, device=x.device)
                          for k in ("stains", "max_concentration"))
    out = LIGHT * torch.exp(-stains @ (c / (max_c / target_max)[:, :, None]))
    out = out.clamp(max=255).floor().to(torch.uint8).view_as(x)  # torchstain truncates to uint8
    return torch.where(ok.view(-1, 1, 1, 1), out, x)


def macenko_stains(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: stain vectors (N, 3, 2), H first; every pixel's concentrations (N, 2, P), least
    squares; the 99th percentile concentration of each stain (N, 2); whether it has enough tissue
    pixels (N,)."""
    od = -torch.log((x.double().flatten(2) + 1) / LIGHT)
    tissue = (od >= BETA).all(1)  # (N, P)
    n = tissue.sum(1)
    ok = n >= MIN_TISSUE
    w = tissue.double()[:, None]
    mean = (od * w).sum(2, keepdim=True) / n.clamp(min=1)[:, None, None]
    centred = (od - mean) * w
    cov = centred @ centred.transpose(1, 2) / (n - 1).clamp(min=1)[:, None, None]
    cov = torch.where(ok[:, None, None], cov, torch.eye(3, dtype=cov.dtype, device=x.device))
    plane = torch.linalg.eigh(cov).eigenvectors[:, :, 1:3]  # the two largest, eigenvalues ascending
    t = plane.transpose(1, 2) @ od
    phi = torch.where(tissue, torch.atan2(t[:, 1], t[:, 0]), torch.nan)
    phi = torch.where(ok[:, None], phi, 0.0)
    ends = [torch.nanquantile(phi, q, dim=1) for q in (ALPHA / 100, 1 - ALPHA / 100)]
    v_min, v_max = ((plane @ torch.stack([a.cos(), a.sin()], 1)[:, :, None])[:, :, 0] for a in ends)
    h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
    he = torch.stack([torch.where(h_first, v_min, v_max), torch.where(h_first, v_max, v_min)], 2)
    he = torch.where(ok[:, None, None], he, torch.eye(3, 2, dtype=he.dtype, device=x.device))
    c = torch.linalg.pinv(he) @ od
    return he, c, torch.quantile(c, 0.99, dim=2), ok
