"""Synthetic H&E-like data whose class evidence is a local structure at a random place.

    from synthetic import make_synthetic
    arrays = make_synthetic(size=28, seed=0, counts={"train": 100, "val": 20, "test": 20})
    arrays["test_images"].shape, arrays["test_masks"].shape   # (20, 28, 28, 3), (20, 28, 28)

The structure's shape is the class; colour is drawn independently of it, so colour alone predicts
nothing, and `{split}_masks` marks where the evidence is (a ground truth for explanations).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")

SYNTHETIC_CLASSES = ("disk", "ring", "target", "dots", "checker", "plus", "cross", "frame", "grid")
# Real PathMNIST per-class mean colours (measured on ../shared/data/pathmnist28_real_test718.npz):
# each synthetic image takes one at random, independent of its label, so colour alone tells nothing.
_REAL_MEANS = np.array([[.875, .793, .868], [.481, .309, .525], [.736, .407, .778],
                        [.729, .543, .699], [.749, .598, .752], [.763, .472, .651],
                        [.744, .533, .698], [.755, .513, .702], [.691, .457, .642]], np.float32)
_HEMATOXYLIN = np.array([0.36, 0.20, 0.52], np.float32)  # dark purple of stained nuclei


def _pattern(c: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Ink in [0,1] of class c's structure at local coordinates u,v in [-1,1]^2.

    Flips and 90-degree rotations map every pattern onto itself (the checkerboard onto its
    inverse, still a checkerboard), so augmentation keeps the label.
    """
    r = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    if c == 0:
        m = r < 0.55
    elif c == 1:
        m = (r - 0.7).abs() < 0.16
    elif c == 2:
        m = (r < 0.25) | ((r - 0.8) .abs() < 0.13)
    elif c == 3:
        m = (torch.cos(u * 1.5 * math.pi) * torch.cos(v * 1.5 * math.pi)) > 0.55
    elif c == 4:
        m = (torch.sin(u * 1.5 * math.pi + 1e-3) * torch.sin(v * 1.5 * math.pi + 1e-3)) > 0
    elif c == 5:
        m = (au < 0.22) | (av < 0.22)
    elif c == 6:
        m = ((u - v).abs() < 0.3) | ((u + v).abs() < 0.3)
    elif c == 7:
        m = torch.maximum(au, av) > 0.68
    else:
        m = ((au - 0.5).abs() < 0.14) | ((av - 0.5).abs() < 0.14)
    return m.float()


def make_synthetic(size: int = 28, seed: int = 0, counts: dict | None = None,
                   splits: tuple[str, ...] = SPLITS) -> dict[str, np.ndarray]:
    """Synthetic data in MedMNIST's npz layout, plus `{split}_masks` marking the evidence region.

    Background: a pink/purple H&E-like texture (smooth stain variation and nucleus-like dots) whose
    colour is drawn from the real class means independently of the label. Evidence: one of nine
    structures drawn in hematoxylin at a random place covering ~40% of the side. The images of a
    split depend only on (seed, split, size), so changing other splits' counts changes nothing.
    """
    counts = counts or {"train": 10000, "val": 2000, "test": 2000}
    out = {}
    for k, split in enumerate(splits):
        g = torch.Generator().manual_seed(seed * 1000 + SPLITS.index(split) * 7 + size)
        n = counts[split]
        labels = torch.arange(n) % 9
        labels = labels[torch.randperm(n, generator=g)]
        images, masks = _synthesize(labels, size, g)
        out[f"{split}_images"] = images.permute(0, 2, 3, 1).numpy()
        out[f"{split}_labels"] = labels.numpy().astype(np.uint8)[:, None]
        out[f"{split}_masks"] = masks.numpy()
    return out


def _synthesize(labels: torch.Tensor, size: int, g: torch.Generator):
    n, s = len(labels), size
    rand = lambda *shape: torch.rand(*shape, generator=g)
    # Stain colour per image, from a random real class mean (not the image's label) with jitter.
    base = torch.from_numpy(_REAL_MEANS)[torch.randint(0, 9, (n,), generator=g)]
    base = (base + (rand(n, 3) - 0.5) * 0.08).view(n, 3, 1, 1)
    # Smooth stain variation: low-resolution noise upsampled.
    low = F.interpolate(rand(n, 1, 4, 4) - 0.5, size=(s, s), mode="bicubic", align_corners=False)
    img = base * (1 + 0.25 * low)
    # Nucleus-like dots everywhere, independent of the label: they make single dots uninformative.
    dots = (rand(n, 1, s, s) < 0.02).float()
    k = max(1, round(s / 28))
    dots = F.max_pool2d(dots, 2 * k - 1, stride=1, padding=k - 1) if k > 1 else dots
    hema = torch.from_numpy(_HEMATOXYLIN).view(1, 3, 1, 1)
    img = img + dots * 0.6 * (hema - img)
    # The evidence: a structure in a random box of side 38-50% of the image.
    side = (0.38 + 0.12 * rand(n)) * s
    x0 = rand(n) * (s - side)
    y0 = rand(n) * (s - side)
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    u = (coords.view(1, 1, s) - x0.view(n, 1, 1)) / side.view(n, 1, 1) * 2 - 1
    v = (coords.view(1, s, 1) - y0.view(n, 1, 1)) / side.view(n, 1, 1) * 2 - 1
    u, v = u.expand(n, s, s), v.expand(n, s, s)
    inside = (u.abs() <= 1) & (v.abs() <= 1)
    ink = torch.zeros(n, s, s)
    for c in range(9):
        sel = labels == c
        ink[sel] = _pattern(c, u[sel], v[sel])
    ink = ink * inside
    strength = (0.55 + 0.3 * rand(n)).view(n, 1, 1, 1)
    img = img + strength * ink.unsqueeze(1) * (hema - img)
    img = img + 0.03 * torch.randn(n, 3, s, s, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, inside
