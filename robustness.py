"""Accuracy under stain and acquisition changes (evaluate.py --stain-shift): every perturbation of
stain.PERTURBATIONS at severities 0-5, each deterministic from a seed; two summary numbers: the
mean accuracy over perturbations and severities 1-5 (as ImageNet-C averages over corruptions) and
the worst family, the perturbation whose mean over severities 1-5 is lowest (each direction of a
change is its own family, so darker images are not averaged with brighter ones).

    from robustness import stain_shift
    result = stain_shift(model, images_uint8, labels, batch_size=256, device="cpu", amp="off")
    result["summary"], result["worst"], result["accuracy"]["darker"]    # accuracy at levels 0..5
"""
from __future__ import annotations

import numpy as np
import torch

from model import predict
from stain import CENTRE_LEVEL, LAB_LEVEL, LEVELS, perturb


def shift_table(accuracy, images: torch.Tensor, seed: int = 0) -> dict:
    """{perturbation: [accuracy at levels 0..5]} for a function accuracy(uint8 images) -> float."""
    clean = accuracy(images)
    return {name: [clean] + [accuracy(perturb(images, name, level, seed)) for level in range(1, 6)] for name in LEVELS}


def summarise(table: dict) -> dict:
    """The mean over every perturbation and level 1-5, each family's mean, and the worst family."""
    families = {name: float(np.mean(acc[1:])) for name, acc in table.items()}
    worst = min(families, key=families.get)
    return {"summary": float(np.mean([acc[1:] for acc in table.values()])), "families": families,
            "worst": worst, "worst_mean": families[worst]}


def stain_shift(model, images: torch.Tensor, labels: np.ndarray, batch_size: int, device, amp: str = "off",
                seed: int = 0, tta: bool = False, stain: dict | None = None) -> dict:
    """Accuracy of a single-label classifier on `images` under each perturbation and level; a
    model trained with --stain-norm normalises the changed images (`stain`), as it would a scan."""
    def accuracy(x):
        return float((predict(model, x, batch_size, device, "multi-class", amp, tta=tta, stain=stain).argmax(1)
                      == labels).mean())

    table = shift_table(accuracy, images, seed)
    clean = next(iter(table.values()))[0]
    return {"accuracy": table, "levels": {name: list(v) for name, v in LEVELS.items()}, "clean": clean,
            **summarise(table), "seed": seed, "n": int(len(labels)),
            "centre_level": CENTRE_LEVEL, "hed_at_centre": table["hed"][CENTRE_LEVEL],
            "lab_level": LAB_LEVEL, "hed_uniform_at_lab": table["hed_uniform"][LAB_LEVEL]}


def print_shift(result: dict) -> None:
    """The accuracy table: one row per perturbation, one column per severity, and its mean."""
    print(f"accuracy under stain and acquisition changes (n={result['n']}, seed {result['seed']}; "
          f"clean {result['clean']:.4f}; hed level {result['centre_level']} = another centre; hed_offset and "
          f"hed_uniform level {result['lab_level']} = between laboratories, natural-log OD)")
    print(f"{'perturbation':16s} " + " ".join(f"{'level ' + str(k):>8s}" for k in range(6)) + "  mean 1-5   levels")
    for name, acc in result["accuracy"].items():
        print(f"{name:16s} " + " ".join(f"{a:8.4f}" for a in acc) + f"  {result['families'][name]:8.4f}   " +
              ", ".join(f"{v:g}" for v in result["levels"][name]))
    print(f"summary: mean accuracy over perturbations and levels 1-5 {result['summary']:.4f}; worst family "
          f"{result['worst']} {result['worst_mean']:.4f}; HED at another centre {result['hed_at_centre']:.4f}; "
          f"uniform HED at the inter-laboratory level {result['hed_uniform_at_lab']:.4f}")
