"""Deletion and insertion curves (Petsiuk et al., RISE, BMVC 2018): the class probability while
the pixels a map ranks first are switched, one fraction at a time, from the image to black
(deletion) or from the image's blur back to the image (insertion); and the area under a curve.

    curves = deletion_insertion(model, images, targets, scores, cfg, device)   # (N, K+1) each
    auc = curve_auc(curves["deletion"])

On 28 px tissue scattered black pixels confound them (a random order scores as low as any map):
trust.py reports them labelled so, and ROAD (road.py) is the measure to read.
"""
from __future__ import annotations

import torch

from attribution import make_baseline
from data import normalize


@torch.no_grad()
def perturbation_curve(model, start, end, targets, scores, cfg) -> torch.Tensor:
    """Softmax probability of the target while pixels switch from `start` to `end` in decreasing
    order of `scores` (ties in a fixed random order), at fractions 0, 1/K, ..., 1: (N, K+1).

    The K+1 images of each of the N are built as one tensor and run in --ig-internal-batch chunks."""
    n, _, h, w = start.shape
    k, p = cfg.curve_steps, h * w
    tiebreak = torch.randperm(p, generator=torch.Generator().manual_seed(cfg.trust_seed)).to(start.device)
    order = tiebreak[torch.sort(scores.reshape(n, p)[:, tiebreak], dim=1, descending=True, stable=True).indices]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=start.device).expand(n, p))
    count = torch.round(torch.arange(k + 1, device=start.device) * p / k)
    switched = (rank[:, None, :] < count[None, :, None]).view(n, k + 1, 1, h, w)
    xs = torch.where(switched, end[:, None], start[:, None]).flatten(0, 1)
    t = targets.repeat_interleave(k + 1)[:, None]
    b = cfg.ig_internal_batch
    probs = [torch.softmax(model(xs[i:i + b]).float(), 1).gather(1, t[i:i + b]) for i in range(0, len(xs), b)]
    return torch.cat(probs).view(n, k + 1).cpu()


def deletion_insertion(model, images, targets, scores, cfg, device) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves (Petsiuk et al., 2018) in the order of `scores` and in a random
    order: deletion switches pixels to black, insertion starts from the box-blurred image and
    switches pixels back to the original. (N, K+1) each. On 28 px tissue the scattered black pixels
    confound it (a random order scores as low as any map): ROAD (road.py) is the measure to read."""
    g = torch.Generator().manual_seed(cfg.trust_seed)
    curves = {key: [] for key in ("deletion", "insertion", "deletion_random", "insertion_random")}
    for start in range(0, len(images), cfg.batch_size):
        x = normalize(images[start:start + cfg.batch_size].to(device))
        t = targets[start:start + cfg.batch_size].to(device)
        own = scores[start:start + cfg.batch_size].to(device)
        rand = torch.rand(own.shape, generator=g).to(device)  # the same orders for every method
        for suffix, order in (("", own), ("_random", rand)):
            deleted, blurred = make_baseline(x, "black"), make_baseline(x, "blur")
            curves["deletion" + suffix].append(perturbation_curve(model, x, deleted, t, order, cfg))
            curves["insertion" + suffix].append(perturbation_curve(model, blurred, x, t, order, cfg))
    return {key: torch.cat(c) for key, c in curves.items()}


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under (N, K+1) curves over the fraction axis [0, 1], trapezoidal rule."""
    return (curves[:, 1:] + curves[:, :-1]).sum(1).double() / (2 * (curves.shape[1] - 1))
