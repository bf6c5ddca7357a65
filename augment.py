"""Geometric augmentation of a training batch (training.py): the 8 exact flips and transposes,
an optional small rotation, and whole-pixel shifts; label-preserving for tissue, which has no
orientation. Colour, stain and acquisition jitter are stain.py's.

    x = translate(augment(x, generator, max_degrees=0), generator, max_shift=1)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, generator: torch.Generator, max_degrees: float = 10.0) -> torch.Tensor:
    """Label-preserving augmentation of a normalised batch, all tensor ops on x's device.

    Tissue has no orientation, so the 8 flips/90-degree rotations are free; a small random rotation
    (the seed's RandomRotation(10)) adds in-between angles, with reflected borders instead of black
    corners so that no artificial edge appears. Flips and transpose are maps of the sampling grid
    too, so with a rotation the whole transform is one resampling of the batch.
    """
    n = x.shape[0]
    r = torch.rand(n, 4, generator=generator).to(x.device)
    flip_w, flip_h, swap = (r[:, k] < 0.5 for k in range(3))  # with the transpose: all 8
    if max_degrees <= 0:
        x = torch.where(flip_w.view(n, 1, 1, 1), x.flip(-1), x)
        x = torch.where(flip_h.view(n, 1, 1, 1), x.flip(-2), x)
        return torch.where(swap.view(n, 1, 1, 1), x.transpose(-1, -2), x)
    # Output pixel p samples the input at diag(sw, sh) @ T @ R(theta) @ p (grid coordinates x, y).
    theta = (r[:, 3] * 2 - 1) * math.radians(max_degrees)
    cos, sin = theta.cos(), theta.sin()
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    rotation = torch.where(swap.view(n, 1, 1), rotation.flip(1), rotation)  # T swaps the rows
    signs = torch.stack([1 - 2 * flip_w.to(theta.dtype), 1 - 2 * flip_h.to(theta.dtype)], 1)
    affine = torch.cat([signs[:, :, None] * rotation, torch.zeros(n, 2, 1, device=x.device)], 2)
    grid = F.affine_grid(affine.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def translate(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Each image moved by a random whole number of pixels, up to `max_shift` along each axis, its
    borders filled by reflection: every output pixel is a copy of an input pixel, so nothing is
    resampled or blurred (random crops of a reflect-padded image, as CIFAR training pads and crops)."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    if max_shift >= min(h, w):
        raise ValueError(f"a shift of {max_shift} px needs images larger than {h}x{w}")
    offset = (torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)).to(x.device)
    padded = F.pad(x, [max_shift] * 4, mode="reflect")
    rows = offset[:, 0, None] + torch.arange(h, device=x.device)  # (n, h) rows of the padded image
    cols = offset[:, 1, None] + torch.arange(w, device=x.device)
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))
