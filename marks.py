"""Planted marks with known masks: the shortcuts a lab meets (ink dots, pen strokes, a tinted region,
a patch of foreign texture, a blurred region) drawn onto real tissue, so that an explanation can be
scored against ground truth (bench/planted.py).

    from marks import MARKS, plant
    marked, mask = plant(images_uint8, "wide green blob", seeds)   # uint8 (N,3,H,W), bool (N,H,W)

Each mark is drawn at a random place (from its image's seed), whole inside the image, and its mask
holds exactly the pixels the mark may change. Sizes are in pixels at 28 and scale with the side.
`tuned` marks are the ones the explanation defaults are chosen on; the others are kept out of that
choice, to say whether it holds on marks it was not made on.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from attribution import gaussian_blur


@dataclass(frozen=True)
class Mark:
    draw: Callable[[torch.Tensor, torch.Tensor, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]
    what: str           # in words, for tables
    tuned: bool = True  # False: invented after the defaults were chosen (held out)


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")


def _centre(rng: np.random.Generator, h: int, w: int, margin: float) -> tuple[float, float]:
    """A centre (y, x) whose disk of radius `margin` lies inside the image."""
    return rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)


def _disk(radius: float, colour):
    """An opaque ink disk of `radius` px at 28 in an RGB colour in [0, 1]."""
    def draw(x, scale, rng):
        h, w = x.shape[-2:]
        r = radius * scale
        cy, cx = _centre(rng, h, w, r + 1)
        ys, xs = _grid(h, w)
        mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        return torch.where(mask, torch.tensor(colour)[:, None, None], x), mask
    return draw


def _ring(radius: float, width: float, colour):
    """A pen circle drawn round a spot: a ring of `width` px at `radius` px (at 28)."""
    def draw(x, scale, rng):
        h, w = x.shape[-2:]
        r, half = radius * scale, width * scale / 2
        cy, cx = _centre(rng, h, w, r + half + 1)
        ys, xs = _grid(h, w)
        d = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
        mask = (d - r).abs() <= half
        return torch.where(mask, torch.tensor(colour)[:, None, None], x), mask
    return draw


def _stroke(length: float, width: float, colour):
    """A straight pen stroke of `length` x `width` px (at 28) at a random angle."""
    def draw(x, scale, rng):
        h, w = x.shape[-2:]
        half_len, half_w = length * scale / 2, width * scale / 2
        cy, cx = _centre(rng, h, w, half_len + 1)
        a = rng.uniform(0, np.pi)
        ys, xs = _grid(h, w)
        along = (xs - cx) * np.cos(a) + (ys - cy) * np.sin(a)
        across = -(xs - cx) * np.sin(a) + (ys - cy) * np.cos(a)
        mask = (along.abs() <= half_len) & (across.abs() <= half_w)
        return torch.where(mask, torch.tensor(colour)[:, None, None], x), mask
    return draw


def _square(side: float, change: Callable[[torch.Tensor], torch.Tensor]):
    """A square region of `side` px (at 28) whose pixels are replaced by change(image)."""
    def draw(x, scale, rng):
        h, w = x.shape[-2:]
        s = max(1, round(side * scale))
        top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[top:top + s, left:left + s] = True
        return torch.where(mask, change(x), x), mask
    return draw


def _tint(x: torch.Tensor) -> torch.Tensor:
    """A yellow-brown cast, as a patch of tissue under old mounting medium or a stain splash."""
    return x * torch.tensor([1.0, 0.85, 0.45])[:, None, None]


def _stripes(x: torch.Tensor) -> torch.Tensor:
    """Foreign texture: diagonal dark and light stripes, 2 px apart (a printed label, a fibre mesh)."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dark = ((ys + xs) // 2) % 2 == 0
    return torch.where(dark, torch.full_like(x, 0.2), torch.full_like(x, 0.9))


def _defocused(x: torch.Tensor) -> torch.Tensor:
    """A region out of focus (a fold or dust lifting the section): Gaussian blur of sigma 1/14 of the side."""
    return gaussian_blur(x[None], x.shape[-1] / 14)[0]


MARKS = {
    "small blue dot": Mark(_disk(1.5, (0.15, 0.2, 0.6)), "an ink dot, 3 px across, dark blue"),
    "thin black stroke": Mark(_stroke(12, 1.2, (0.1, 0.1, 0.12)), "a pen stroke, 12 x 1 px, black"),
    "wide green blob": Mark(_disk(3.5, (0.2, 0.55, 0.3)), "an ink blob, 7 px across, green"),
    "tinted square": Mark(_square(9, _tint), "a 9 x 9 px region tinted yellow-brown, texture kept"),
    "striped patch": Mark(_square(6, _stripes), "a 6 x 6 px patch of foreign striped texture"),
    "blurred square": Mark(_square(10, _defocused), "a 10 x 10 px region out of focus (blur sigma 2 px)"),
    # kept out of the choice of the defaults: marks it was not made on
    "red ring": Mark(_ring(4, 1.2, (0.75, 0.1, 0.15)), "a red pen circle, 8 px across, 1 px line", tuned=False),
    "wide black stroke": Mark(_stroke(10, 3, (0.1, 0.1, 0.12)), "a marker stroke, 10 x 3 px, black",
                              tuned=False),
}


def plant(images: torch.Tensor, name: str, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, H, W) images with mark `name` drawn on each at a place drawn from its seed, and
    the bool (N, H, W) masks of the pixels the mark covers."""
    if name not in MARKS:
        raise ValueError(f"unknown mark {name!r}; choose one of {sorted(MARKS)}")
    scale = images.shape[-1] / 28
    out, masks = [], []
    for img, seed in zip(images, np.asarray(seeds).tolist()):
        x, m = MARKS[name].draw(img.float() / 255, scale, np.random.default_rng(int(seed)))
        out.append(x)
        masks.append(m)
    marked = (torch.stack(out) * 255).round().clamp(0, 255).to(torch.uint8)
    return marked, torch.stack(masks)
