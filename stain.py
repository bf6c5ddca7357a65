"""Stain and acquisition changes of H&E images on whole batches, deterministic from a generator:
HED stain concentrations (Ruifrok & Johnston, 2001), brightness, contrast, saturation, hue, blur
and JPEG. Training jitters with them (training.Recipe); evaluate.py --stain-shift measures
accuracy under each at graded severities.

    from stain import PERTURBATIONS, perturb
    shifted = perturb(images_uint8, "hed", level=3, seed=0)     # uint8 (N, C, H, W), level 0: identity

    python stain.py ../shared/data      # how far apart the two centres' stains are (the calibration)

Images here are float (N, 3, H, W) in [0, 1] unless a function says uint8.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as scikit-image's rgb_from_hed.
RGB_FROM_HED = F.normalize(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]), dim=1)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
OD_FLOOR = 1 / 255  # the darkest representable intensity: keeps -log finite

# Severity levels 1-5 of each perturbation (level 0 is the identity); at each level every image
# changes by the full amount, in a random direction. "hed": each image's H and E concentrations
# scaled by 1 +- level, and shifted by +- level/3 times the image's mean concentration; level 4 (0.3)
# is the median difference measured between the two centres' tiles (python stain.py ../shared/data:
# a factor of 1.42 in H and 1.34 in E; README "Robustness").
LEVELS = {
    "hed": (0.05, 0.1, 0.2, 0.3, 0.4),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),   # intensity scaled by 1 +- level
    "contrast": (0.1, 0.2, 0.3, 0.4, 0.5),       # deviation from the mean grey scaled by 1 +- level
    "saturation": (0.1, 0.2, 0.3, 0.4, 0.5),     # deviation from the grey image scaled by 1 +- level
    "hue": (0.01, 0.02, 0.04, 0.06, 0.08),       # rotation in YIQ by +- level of a full turn
    "blur": (0.5, 0.75, 1.0, 1.25, 1.5),         # Gaussian sigma in pixels
    "jpeg": (90, 75, 60, 45, 30),                # JPEG quality
}
CENTRE_LEVEL = 4  # the "hed" level calibrated as another centre


def to_hed(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> stain concentrations (N, 3, H, W): optical density unmixed."""
    od = -x.clamp(min=OD_FLOOR).log()
    return torch.einsum("nchw,cs->nshw", od, HED_FROM_RGB.to(x))


def from_hed(c: torch.Tensor) -> torch.Tensor:
    """Stain concentrations -> RGB in [0, 1]."""
    return torch.exp(-torch.einsum("nshw,sc->nchw", c, RGB_FROM_HED.to(c))).clamp(0, 1)


def _draw(n: int, k: int, g: torch.Generator, device, exact: bool) -> torch.Tensor:
    """(n, k) factors in [-1, 1]: uniform for training jitter, or exactly -1 or +1 (exact=True, a
    change of the full strength in a random direction, as evaluation severities are)."""
    u = torch.rand(n, k, generator=g) * 2 - 1
    return (u.sign() if exact else u).to(device)


def hed_jitter(x: torch.Tensor, strength: float, g: torch.Generator, exact: bool = False) -> torch.Tensor:
    """Each image's H and E concentrations scaled by 1 + s*u and shifted by s/3*v times the image's
    mean concentration, u and v from _draw (Tellez et al., 2019, with a shift relative to the stain's
    amount)."""
    if strength <= 0:
        return x
    c = to_hed(x)
    n = len(x)
    scale = 1 + strength * _draw(n, 2, g, x.device, exact)
    shift = strength / 3 * _draw(n, 2, g, x.device, exact) * c[:, :2].mean((2, 3))
    he = c[:, :2] * scale[:, :, None, None] + shift[:, :, None, None]
    return from_hed(torch.cat([he, c[:, 2:]], 1))


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _factor(x, strength, g, exact):
    return (1 + strength * _draw(len(x), 1, g, x.device, exact))[:, :, None, None]


def brightness(x, strength, g, exact=False):
    return (x * _factor(x, strength, g, exact)).clamp(0, 1)


def contrast(x, strength, g, exact=False):
    mean = _grey(x).mean((2, 3), keepdim=True)
    return ((x - mean) * _factor(x, strength, g, exact) + mean).clamp(0, 1)


def saturation(x, strength, g, exact=False):
    grey = _grey(x)
    return ((x - grey) * _factor(x, strength, g, exact) + grey).clamp(0, 1)


def colour_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation, each by 1 + U(-s, s) per image (training jitter)."""
    if strength <= 0:
        return x
    return saturation(contrast(brightness(x, strength, g), strength, g), strength, g)


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def hue(x, strength, g, exact=False):
    """Rotate the chroma plane of YIQ by s*u turns per image."""
    theta = 2 * np.pi * strength * _draw(len(x), 1, g, x.device, exact)[:, 0]
    cos, sin = theta.cos(), theta.sin()
    rot = torch.zeros(len(x), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    yiq = _YIQ.to(x)
    m = torch.linalg.inv(yiq) @ rot @ yiq  # (N, 3, 3), RGB -> RGB
    return torch.einsum("nij,njhw->nihw", m, x).clamp(0, 1)


def blur(x, sigma, g, exact=True):
    radius = max(1, int(np.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, [radius, radius, 0, 0], mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, [0, 0, radius, radius], mode="reflect"), k.transpose(2, 3), groups=3)


def jpeg(x, quality, g, exact=True):
    """Encode and decode at this quality with Pillow's libjpeg (4:2:0 chroma, as cameras and slide
    scanners write), one image at a time: evaluation only, and 28 px images take microseconds."""
    import io

    from PIL import Image
    out = []
    for img in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        out.append(np.array(Image.open(buf).convert("RGB")))
    return (torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255).to(x.device)


PERTURBATIONS = {"hed": hed_jitter, "brightness": brightness, "contrast": contrast, "saturation": saturation,
                 "hue": hue, "blur": blur, "jpeg": jpeg}


def perturb(images: torch.Tensor, name: str, level: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, H, W) images under perturbation `name` at severity `level` (0: unchanged),
    drawn from a generator seeded by (seed, perturbation, level): the same images every run."""
    if level == 0:
        return images
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, list(LEVELS).index(name), level])
                                          .generate_state(1)[0]))
    x = PERTURBATIONS[name](images.float() / 255, LEVELS[name][level - 1], g, exact=True)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def tissue_concentrations(x: torch.Tensor, min_od: float = 0.3) -> torch.Tensor:
    """Mean H and E concentration of each image's tissue pixels (optical density summed over RGB
    above min_od; the whole image where there is too little tissue): (N, 2)."""
    c = to_hed(x)[:, :2]
    tissue = (-x.clamp(min=OD_FLOOR).log()).sum(1, keepdim=True) > min_od
    tissue = torch.where(tissue.flatten(1).sum(1).view(-1, 1, 1, 1) < 100, torch.ones_like(tissue), tissue)
    return (c * tissue).sum((2, 3)) / tissue.sum((2, 3))


def calibrate(folder: Path) -> dict:
    """Per class, the ratio of the CRC-VAL-HE-7K tiles' mean H and E concentrations to the
    NCT-CRC-HE-100K tile's, for the classes with tissue that both centres' tiles in `folder` have."""
    from PIL import Image
    names = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    nct = np.load(folder / "nct_crc_he_224_real_9.npz")
    ref = tissue_concentrations(torch.from_numpy(nct["images"]).permute(0, 3, 1, 2).float() / 255)
    ref = {names[y]: r for y, r in zip(nct["labels"][:, 0], ref)}
    tiles = {}  # one entry per tile: the .tif original where both a .tif and a .jpg exist
    for path in sorted((folder / "crc_val_he_7k_tiles").iterdir(), key=lambda p: p.suffix != ".tif"):
        tiles.setdefault(path.stem.removeprefix("CRC-VAL-HE-7K-"), path)
    ratios = []
    for stem, path in tiles.items():
        cls = stem.split("-")[0]
        if cls == "BACK":  # no tissue to compare
            continue
        x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        ratios.append((cls, *(tissue_concentrations(x)[0] / ref[cls]).tolist()))
    change = np.abs(np.log([r[1:] for r in ratios]))
    return {"tiles": ratios, "median_abs_log_ratio": {"H": float(np.median(change[:, 0])),
                                                      "E": float(np.median(change[:, 1]))}}


if __name__ == "__main__":
    out = calibrate(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
    for cls, h, e in out["tiles"]:
        print(f"{cls:5s} H x{h:.2f}  E x{e:.2f}  (CRC-VAL-HE-7K tile / NCT-CRC-HE-100K tile of the class)")
    m = out["median_abs_log_ratio"]
    print(f"median |log ratio|: H {m['H']:.2f}, E {m['E']:.2f} (a factor of {np.exp(m['H']):.2f} and {np.exp(m['E']):.2f})")
