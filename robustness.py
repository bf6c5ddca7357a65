"""Accuracy under stain and acquisition changes (evaluate.py --stain-shift): every perturbation of
stain.PERTURBATIONS at severities 0-5, each deterministic from a seed, and one summary number, the
mean accuracy over perturbations and severities 1-5 (as ImageNet-C averages over corruptions).

    from robustness import stain_shift
    result = stain_shift(model, images_uint8, labels, batch_size=256, device="cpu", amp="off")
    result["summary"], result["accuracy"]["hed"]        # mean; accuracy at levels 0..5
"""
from __future__ import annotations

import numpy as np
import torch

from model import predict
from stain import CENTRE_LEVEL, LEVELS, perturb


def stain_shift(model, images: torch.Tensor, labels: np.ndarray, batch_size: int, device, amp: str = "off",
                seed: int = 0, tta: bool = False) -> dict:
    """Accuracy of a single-label classifier on `images` under each perturbation and level."""
    def accuracy(x):
        return float((predict(model, x, batch_size, device, "multi-class", amp, tta=tta).argmax(1) == labels).mean())

    clean = accuracy(images)
    table = {name: [clean] + [accuracy(perturb(images, name, level, seed)) for level in range(1, 6)]
             for name in LEVELS}
    return {"accuracy": table, "levels": {name: list(v) for name, v in LEVELS.items()}, "clean": clean,
            "summary": float(np.mean([v[1:] for v in table.values()])), "seed": seed, "n": int(len(labels)),
            "centre_level": CENTRE_LEVEL, "hed_at_centre": table["hed"][CENTRE_LEVEL]}


def print_shift(result: dict) -> None:
    """The accuracy table: one row per perturbation, one column per severity."""
    print(f"accuracy under stain and acquisition changes (n={result['n']}, seed {result['seed']}; "
          f"clean {result['clean']:.4f}; HED level {result['centre_level']} = another centre)")
    print(f"{'perturbation':12s} " + " ".join(f"{'level ' + str(k):>8s}" for k in range(6)) + "   levels")
    for name, acc in result["accuracy"].items():
        print(f"{name:12s} " + " ".join(f"{a:8.4f}" for a in acc) + "   " +
              ", ".join(f"{v:g}" for v in result["levels"][name]))
    print(f"summary: mean accuracy over perturbations and levels 1-5 {result['summary']:.4f}; "
          f"HED at another centre {result['hed_at_centre']:.4f}")
