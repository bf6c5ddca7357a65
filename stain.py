"""Stain and acquisition changes of H&E images on whole batches, deterministic from a generator.
The benchmark (PERTURBATIONS, 16 families at severities 1-5; evaluate.py --stain-shift): HED stain
concentrations (Ruifrok & Johnston, 2001), with relative or additive shifts, the latter at the full
level or drawn uniformly up to it; darker and brighter, less and more contrast and saturation,
hue; defocus and motion blur, pixelation, JPEG; ink marks and air bubbles. The training jitter
(training.Recipe): HED scales and offsets (or RandStainNA), brightness, contrast and saturation,
blur and sharpening, random erasing. And Reinhard's colour transfer in CIE L*a*b*, the stain
normalisation pathology toolkits ship (measured, not a default).

    from stain import PERTURBATIONS, perturb
    shifted = perturb(images_uint8, "darker", level=3, seed=0)  # uint8 (N, C, H, W), level 0: identity
    normalised = reinhard(images_float, lab_statistics(reference).mean(0))

    python staincal.py ../shared/data   # how far apart the two centres' stains are (the calibration)

Images here are float (N, 3, H, W) in [0, 1] unless a function says uint8.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as scikit-image's rgb_from_hed.
RGB_FROM_HED = F.normalize(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]), dim=1)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
OD_FLOOR = 1 / 255  # the darkest representable intensity: keeps -log finite

# Severity levels 1-5 of each perturbation (level 0 is the identity); each is its own family in
# evaluate.py --stain-shift, so a direction that breaks a model is not averaged away by the other.
# "hed": each image's H and E concentrations scaled by 1 +- level, and shifted by +- level/3 times
# the image's mean concentration, in a random direction; level 4 (0.3) is the median difference
# measured between the two centres' tiles (python staincal.py ../shared/data: a factor of 1.42 in H and
# 1.34 in E; docs/real-tissue.md "Calibration"). The others are set so that level 1 is barely
# visible and level 5 is a gross fault of a scan (docs/robustness.md shows every level).
LEVELS = {
    "hed": (0.05, 0.1, 0.2, 0.3, 0.4),
    "hed_offset": (0.03, 0.06, 0.09, 0.11, 0.22),     # H and E scaled by 1 +- level and shifted by +- level (natural-log OD; Tellez et al. 2019)
    "darker": (0.05, 0.1, 0.15, 0.2, 0.3),            # intensity x (1 - level)
    "brighter": (0.05, 0.1, 0.15, 0.2, 0.3),          # intensity x (1 + level)
    "less_contrast": (0.1, 0.2, 0.3, 0.4, 0.5),       # deviation from the mean grey x (1 - level)
    "more_contrast": (0.1, 0.2, 0.3, 0.4, 0.5),       # deviation from the mean grey x (1 + level)
    "less_saturation": (0.1, 0.2, 0.3, 0.4, 0.5),     # deviation from the grey image x (1 - level)
    "more_saturation": (0.1, 0.2, 0.3, 0.4, 0.5),     # deviation from the grey image x (1 + level)
    "hue": (0.01, 0.02, 0.04, 0.06, 0.08),            # rotation in YIQ by +- level of a full turn
    "defocus": (0.5, 0.75, 1.0, 1.25, 1.5),           # disk (out-of-focus) kernel of radius 2 x level pixels at 28 px
    "motion": (1.0, 1.5, 2.0, 2.5, 3.0),              # a line kernel of length 2 x level pixels at 28 px, at a random angle
    "pixelate": (0.9, 0.75, 0.6, 0.45, 0.3),          # averaged down to level x the side, then enlarged back in blocks
    "jpeg": (90, 75, 60, 45, 30),                     # JPEG quality
    "ink": (0.04, 0.08, 0.12, 0.16, 0.2),             # a marker stroke (blue, green or black) covering this share of the image
    "bubble": (0.15, 0.2, 0.25, 0.3, 0.35),           # an air bubble of this radius (share of the side): bright inside, dark rim
    # Last: each family's draws are seeded by its place here, so a family added later leaves the
    # others' draws, and every number measured before it, as they were.
    "hed_uniform": (0.03, 0.06, 0.09, 0.11, 0.22),    # hed_offset drawn uniformly, U(-level, level), as augmentation libraries draw it
}
CENTRE_LEVEL = 4  # the "hed" level calibrated as another centre
# hed_offset and hed_uniform: level 4 is the inter-laboratory level (python staincal.py ../shared/data:
# it takes a typical image's H and E as far as 90% of the between-centre changes measured, and
# either way as far as six laboratories differ in the literature); level 5 reaches the centres'
# change in both directions. In scikit-image's rgb2hed units divide the levels by 13.8.
LAB_LEVEL = 4


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


def hed_jitter(x: torch.Tensor, strength: float, g: torch.Generator, exact: bool = False,
               offset: float = 0.0) -> torch.Tensor:
    """Each image's H and E concentrations scaled by 1 + s*u and shifted by s/3*v times the image's
    mean concentration, u and v from _draw, plus `offset` * w in absolute concentration (Tellez et
    al., 2019: a shift that does not depend on how much stain the image has)."""
    if strength <= 0 and offset <= 0:
        return x
    c = to_hed(x)
    n = len(x)
    scale = 1 + strength * _draw(n, 2, g, x.device, exact)
    shift = strength / 3 * _draw(n, 2, g, x.device, exact) * c[:, :2].mean((2, 3))
    if offset > 0:
        shift = shift + offset * _draw(n, 2, g, x.device, exact)
    return _restain(c, scale, shift)


def hed_offset(x, level, g, exact=True):
    """Tellez et al.'s HED augmentation as a test: H and E scaled by 1 +- level, shifted by +- level
    (exact), or by factors drawn from U(-level, level) (exact=False). No stain goes below zero:
    where the shift would remove more than a pixel has, the pixel is left without it."""
    c = to_hed(x)
    scale = 1 + level * _draw(len(x), 2, g, x.device, exact)
    shift = level * _draw(len(x), 2, g, x.device, exact)
    he = c[:, :2] * scale[:, :, None, None] + shift[:, :, None, None]
    he = torch.maximum(he, c[:, :2].clamp(max=0))  # a pixel's stain stays >= 0 (or where unmixing put it)
    return from_hed(torch.cat([he, c[:, 2:]], 1))


def hed_uniform(x, level, g, exact=True):
    """hed_offset with every factor drawn from U(-level, level), as augmentation libraries draw
    Tellez et al.'s jitter, whatever `exact` says (the benchmark asks every family for exact)."""
    return hed_offset(x, level, g, exact=False)


def _restain(c: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB of stain concentrations c with H and E scaled and shifted per image ((N, 2) each)."""
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


def sharpness_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Each image moved toward its Gaussian blur (sigma 1.5 pixels at 28 px) by a ~ U(-s, s):
    a > 0 blurs (a = 1: the full blur), a < 0 sharpens by unsharp masking (training jitter)."""
    if strength <= 0:
        return x
    a = (strength * _draw(len(x), 1, g, x.device, exact=False))[:, :, None, None]
    return (x + a * (blur(x, _pixels(x, 1.5), g) - x)).clamp(0, 1)


def random_erase(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020) as training jitter: with probability p per image, one
    rectangle of 2-20% of the image (aspect ratio 0.3-3.3) painted in one random colour."""
    if p <= 0:
        return x
    n, _, h, w = x.shape
    u = torch.rand(n, 7, generator=g)
    area = (0.02 + 0.18 * u[:, 0]) * h * w
    ratio = torch.exp(np.log(0.3) + (np.log(3.3) - np.log(0.3)) * u[:, 1])
    eh, ew = (area * ratio).sqrt().clamp(1, h), (area / ratio).sqrt().clamp(1, w)
    top, left = u[:, 2] * (h - eh), u[:, 3] * (w - ew)
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = ((ys >= top.view(n, 1, 1)) & (ys < (top + eh).view(n, 1, 1)) & (xs >= left.view(n, 1, 1))
              & (xs < (left + ew).view(n, 1, 1)) & (torch.rand(n, generator=g) < p).view(n, 1, 1))
    colour = u[:, 4:7].view(n, 3, 1, 1).to(x)
    return torch.where(inside[:, None].to(x.device), colour, x)


def _about(x: torch.Tensor, centre: torch.Tensor, factor: float) -> torch.Tensor:
    return ((x - centre) * factor + centre).clamp(0, 1)


# The directed acquisition changes: every image by exactly the level, in the named direction.
def darker(x, level, g, exact=True):
    return (x * (1 - level)).clamp(0, 1)


def brighter(x, level, g, exact=True):
    return (x * (1 + level)).clamp(0, 1)


def less_contrast(x, level, g, exact=True):
    return _about(x, _grey(x).mean((2, 3), keepdim=True), 1 - level)


def more_contrast(x, level, g, exact=True):
    return _about(x, _grey(x).mean((2, 3), keepdim=True), 1 + level)


def less_saturation(x, level, g, exact=True):
    return _about(x, _grey(x), 1 - level)


def more_saturation(x, level, g, exact=True):
    return _about(x, _grey(x), 1 + level)


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


def _per_image_filter(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each image with its own (K, K) kernel (odd K), borders reflected: (N, K, K) kernels."""
    n, c, h, w = x.shape
    r = kernels.shape[-1] // 2
    padded = F.pad(x.reshape(1, n * c, h, w), [r, r, r, r], mode="reflect")
    weight = kernels.to(x).repeat_interleave(c, 0)[:, None]  # (N*C, 1, K, K)
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w).clamp(0, 1)


def _supersampled(inside, radius: int, n: int = 8) -> torch.Tensor:
    """(..., 2r+1, 2r+1) kernels: the share of each pixel's n x n subsamples for which inside(u, v)
    holds (pixel coordinates from the centre; inside may broadcast to leading dimensions, one kernel
    each), normalised to sum 1."""
    t = (torch.arange(n) + 0.5) / n - 0.5
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    v = (grid[:, None] + t[None, :]).reshape(-1)
    k = inside(v[None, :], v[:, None]).float()  # (..., K*n, K*n): rows y, columns x
    side = 2 * radius + 1
    k = k.reshape(*k.shape[:-2], side, n, side, n).mean((-3, -1))
    return k / k.sum((-2, -1), keepdim=True)


def _pixels(x: torch.Tensor, level_at_28: float) -> float:
    """A length given in pixels at 28 px, at this image's size (the same share of the tile)."""
    return level_at_28 * x.shape[-1] / 28


def defocus(x, level, g, exact=True):
    """Out of focus: a disk (pillbox) kernel of radius 2 x level pixels at 28 px."""
    radius = _pixels(x, 2 * level)
    k = _supersampled(lambda u, v: u ** 2 + v ** 2 <= radius ** 2, int(np.ceil(radius)))
    return _per_image_filter(x, k.expand(len(x), -1, -1))


def motion(x, level, g, exact=True):
    """Motion blur: a line kernel of length 2 x level pixels at 28 px, at a random angle per image."""
    length = _pixels(x, 2 * level)
    radius = int(np.ceil(length / 2))
    a = (torch.rand(len(x), generator=g) * np.pi).view(-1, 1, 1)
    cos, sin = a.cos(), a.sin()
    kernels = _supersampled(lambda u, v: ((u * cos + v * sin).abs() <= length / 2) & ((v * cos - u * sin).abs() <= 0.5),
                            radius)
    return _per_image_filter(x, kernels)


def pixelate(x, level, g, exact=True):
    """Averaged down to `level` x the side, then enlarged back with nearest neighbours."""
    side = max(1, round(x.shape[-1] * level))
    return F.interpolate(F.adaptive_avg_pool2d(x, side), size=x.shape[-2:], mode="nearest")


def blur(x, sigma, g, exact=True):
    """Gaussian blur of standard deviation sigma pixels (what sharpness_jitter blends toward)."""
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


_INKS = torch.tensor([[0.15, 0.25, 0.65], [0.15, 0.5, 0.3], [0.12, 0.12, 0.15]])  # blue, green, black marker


def ink(x, level, g, exact=True):
    """A marker stroke across each image: a straight band at a random angle and position, as wide
    as covers `level` of the image, in a marker colour laid over the tissue (75% opaque)."""
    n, _, h, w = x.shape
    angle = torch.rand(n, generator=g) * np.pi
    offset = (torch.rand(n, generator=g) - 0.5) * 0.5 * min(h, w)
    colour = _INKS[torch.randint(len(_INKS), (n,), generator=g)]
    ys, xs = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    dist = (xs[None] * angle.cos()[:, None, None] + ys[None] * angle.sin()[:, None, None] - offset[:, None, None]).abs()
    width = torch.quantile(dist.flatten(1), level, dim=1)  # the band holding `level` of the pixels
    mask = (dist <= width[:, None, None]).float()[:, None].to(x)
    return x * (1 - 0.75 * mask) + 0.75 * mask * colour[:, :, None, None].to(x)


def bubble(x, level, g, exact=True):
    """An air bubble under the cover slip: a disk of radius `level` x the side at a random place,
    brighter and paler inside (x 0.5 + 0.5), with a dark rim an eighth of the radius wide."""
    n, _, h, w = x.shape
    r = level * min(h, w)
    cy = torch.rand(n, generator=g) * h
    cx = torch.rand(n, generator=g) * w
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    d = ((ys[None] - cy[:, None, None]) ** 2 + (xs[None] - cx[:, None, None]) ** 2).sqrt()[:, None].to(x)
    inside = (d <= r).float()
    rim = ((d > r) & (d <= r * 1.125 + 0.5)).float()
    out = torch.where(inside > 0, x * 0.5 + 0.5, x)
    return torch.where(rim > 0, out * 0.4, out)


PERTURBATIONS = {"hed": hed_jitter, "hed_offset": hed_offset, "darker": darker, "brighter": brighter,
                 "less_contrast": less_contrast, "more_contrast": more_contrast, "less_saturation": less_saturation,
                 "more_saturation": more_saturation, "hue": hue, "defocus": defocus, "motion": motion,
                 "pixelate": pixelate, "jpeg": jpeg, "ink": ink, "bubble": bubble, "hed_uniform": hed_uniform}
assert list(PERTURBATIONS) == list(LEVELS)


def perturb(images: torch.Tensor, name: str, level: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, H, W) images under perturbation `name` at severity `level` (0: unchanged),
    drawn from a generator seeded by (seed, perturbation, level): the same images every run."""
    if level == 0:
        return images
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, list(LEVELS).index(name), level])
                                          .generate_state(1)[0]))
    x = PERTURBATIONS[name](images.float() / 255, LEVELS[name][level - 1], g, exact=True)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


# CIE L*a*b* (D65) from sRGB, for Reinhard's colour transfer.
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])


def to_lab(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [0, 1] -> CIE L*a*b* (L in [0, 100])."""
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = torch.einsum("nchw,kc->nkhw", linear, _XYZ_FROM_RGB.to(x)) / _WHITE.to(x).view(1, 3, 1, 1)
    f = torch.where(xyz > (6 / 29) ** 3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def from_lab(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* -> sRGB in [0, 1] (clipped)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE.to(lab).view(1, 3, 1, 1)
    linear = torch.einsum("nkhw,ck->nchw", xyz, torch.linalg.inv(_XYZ_FROM_RGB).to(lab)).clamp(0, 1)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=1e-12) ** (1 / 2.4) - 0.055, 12.92 * linear).clamp(0, 1)


def lab_statistics(x: torch.Tensor) -> torch.Tensor:
    """Per image, the mean and standard deviation of L*, a* and b*: (N, 2, 3)."""
    lab = to_lab(x).flatten(2)
    return torch.stack([lab.mean(2), lab.std(2, correction=0)], 1)


def reinhard(x: torch.Tensor, target: torch.Tensor, min_std: float = 1.0) -> torch.Tensor:
    """Reinhard et al.'s (2001) colour transfer in CIE L*a*b*, as pathology toolkits normalise
    stain: each image's L*, a*, b* shifted and scaled to the target's mean and standard deviation
    (target: (2, 3), lab_statistics of a reference, or (N, 2, 3), one per image). A channel that
    barely varies in an image (std < min_std, e.g. empty background) is only shifted, never
    stretched into noise."""
    lab = to_lab(x)
    mean, std = lab.mean((2, 3), keepdim=True), lab.std((2, 3), correction=0, keepdim=True)
    target = target.to(x).reshape(-1, 2, 3)
    t_mean, t_std = target[:, 0].reshape(-1, 3, 1, 1), target[:, 1].reshape(-1, 3, 1, 1)
    scale = torch.where(std < min_std, torch.ones_like(std), t_std / std.clamp(min=1e-6))
    return from_lab((lab - mean) * scale + t_mean)


def lab_style(images: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """RandStainNA's stain-style distribution of uint8 (N, 3, H, W) images: over the images, the
    mean (row 0) and standard deviation (row 1) of each image's L*a*b* mean and standard deviation
    (lab_statistics): (2, 2, 3)."""
    stats = torch.cat([lab_statistics(images[i:i + batch].double() / 255) for i in range(0, len(images), batch)])
    return torch.stack([stats.mean(0), stats.std(0)]).float()


def randstainna(x: torch.Tensor, style: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """RandStainNA (Shen et al., MICCAI 2022), in L*a*b*: each image, with probability p, is
    Reinhard-transferred to a virtual template drawn for it from its training split's stain-style
    distribution (lab_style: every statistic from a normal with the split's mean and standard
    deviation, the authors' default), so that the stains the model sees vary as much as the split's
    own, not more. x: (N, 3, H, W) in [0, 1]."""
    draw = style[0] + style[1] * torch.randn((len(x), 2, 3), generator=g)
    draw[:, 1] = draw[:, 1].clamp(min=0.1)  # a standard deviation
    chosen = (torch.rand(len(x), generator=g) < p).to(x.device)
    return torch.where(chosen.view(-1, 1, 1, 1), reinhard(x, draw.to(x.device)), x)
