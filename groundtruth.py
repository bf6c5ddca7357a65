"""Scores of a map against a ground-truth mask (where the evidence the model used really is): top-K
rank accuracy, relevance mass accuracy (Arras et al., "CLEVR-XAI", Information Fusion 2022) and the
pointing game (Zhang et al., IJCV 2018).

    from groundtruth import localisation_scores
    s = localisation_scores(scores, masks)   # scores (N, H, W) signed pixel relevance, masks bool (N, H, W)
    s["rank"], s["mass"], s["pointing"]      # (N,) each, in [0, 1]

Positive relevance is evidence for the explained class, so each score ranks and sums it:
- rank: of the K most relevant pixels (K = the mask's area), the share inside the mask; a random map
  scores K / (H W) on average;
- mass: the positive relevance inside the mask over all positive relevance (NaN for a map with
  none, as in Quantus);
- pointing: 1 if the most relevant pixel lies inside the mask; where several pixels share the
  maximum, the share of them inside (a random pick among them).
The random baseline of mass and pointing is the mask's share of the image. Ties in the top-K
ranking are broken by pixel position (first in row-major order), as a stable sort does.
"""
from __future__ import annotations

import torch


def rank_accuracy(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) share of each map's top-K pixels (K = the mask's area) that lie in the mask."""
    s, m = scores.flatten(1).double(), masks.flatten(1)
    k = m.sum(1)
    if (k == 0).any():
        raise ValueError("rank accuracy needs a non-empty mask for every map")
    order = torch.sort(-s, dim=1, stable=True).indices
    inside = m.gather(1, order).double()
    top = torch.arange(s.shape[1])[None] < k[:, None]
    return (inside * top).sum(1) / k


def mass_accuracy(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) positive relevance inside the mask over all positive relevance (NaN without any)."""
    pos = scores.flatten(1).double().clamp(min=0)
    total = pos.sum(1)
    inside = (pos * masks.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-300), torch.full_like(total, float("nan")))


def pointing_game(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) the share of the maximal pixels that lie in the mask: 1 or 0 for a single maximum."""
    s = scores.flatten(1).double()
    top = s == s.max(1, keepdim=True).values
    return (top & masks.flatten(1).bool()).sum(1) / top.sum(1).double()


def localisation_scores(scores: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """All three scores of (N, H, W) signed pixel relevance against bool (N, H, W) masks, and the
    mask's share of the image ("area": the random baseline of mass and pointing)."""
    if scores.shape != masks.shape:
        raise ValueError(f"maps {tuple(scores.shape)} and masks {tuple(masks.shape)} differ in shape")
    return {"rank": rank_accuracy(scores, masks), "mass": mass_accuracy(scores, masks),
            "pointing": pointing_game(scores, masks), "area": masks.flatten(1).double().mean(1)}
