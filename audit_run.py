"""explain.py --audit: the shortcut audit (audit.py) of a selection's stored maps, stored next to them
and printed in words.

    found = run_audit(store, model, layer, images, indices, settings, class_names, features, dataset, split)
    print_audit(found, class_names)

Only maps of the class the model predicted are audited (--targets true or both store others too).
Nothing is recomputed: the maps are read from the database; the model runs forward only (its
features, and the causal test's filled images).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from attribution import map_seeds
from audit import ALARM, MIN_ALARM, Audit, alarmed, audit_maps, evidence


def as_rows(found: Audit, attribution_ids: np.ndarray) -> tuple[list[dict], dict[str, np.ndarray]]:
    """An Audit as the database stores it (ExplanationDB.add_audit): strategies with their rank in
    their class and exemplars as attribution ids, and one row per audited map."""
    strategies = []  # in Audit.flat()'s order, which member_of indexes
    for c in sorted(found.strategies):
        for rank, s in enumerate(found.strategies[c], 1):
            strategies.append({"class": c, "rank": rank, "n": s.n, "suspicion": s.suspicion, "flip": s.flip,
                               "control_flip": s.control_flip, "atypical": s.atypical, "area": s.area,
                               "concentration": s.concentration, "prob_drop": s.prob_drop,
                               "exemplars": attribution_ids[s.exemplars]})
    pm = found.per_map
    return strategies, {"attribution_id": attribution_ids, "strategy": found.member_of, "flip": pm["flip"],
                        "control_flip": pm["control_flip"], "atypical": pm["atypical"], "area": pm["area"],
                        "concentration": pm["concentration"], "x": pm["x"], "y": pm["y"]}


def run_audit(store, model, layer, images: torch.Tensor, indices, settings: dict[str, int], features: str,
              dataset: str, split: str) -> dict[str, dict]:
    """Audit each setting's stored maps of `indices` (their predicted class) and store the result;
    method -> the stored audit (ExplanationDB.audit)."""
    out = {}
    for method, setting_id in settings.items():
        t0 = time.perf_counter()
        rows = store.maps(setting_id, indices=np.asarray(indices).tolist())
        own = rows["target"] == rows["predicted"]
        if not own.any():
            print(f"audit ({method}): no stored map explains its predicted class; run with --targets predicted")
            continue
        index, maps = rows["index"][own], torch.from_numpy(rows["maps"][own])
        seeds = map_seeds(dataset, split, index, rows["target"][own])
        found = audit_maps(model, layer, images[torch.from_numpy(index)], maps, rows["predicted"][own], seeds, features)
        strategies, members = as_rows(found, rows["attribution_id"][own])
        store.add_audit(setting_id, {"features": features, "alarm": ALARM, "min_alarm": MIN_ALARM}, strategies, members)
        out[method] = store.audit(setting_id)
        print(f"audit ({method}): {int(own.sum())} maps, {len(strategies)} strategies in "
              f"{len(found.strategies)} classes, {time.perf_counter() - t0:.1f} s")
    return out


def in_words(s: dict, class_names) -> str:
    """One strategy in words, as the report's cards say it."""
    return (f"{s['n']} predictions of {class_names[s['class']]}: filling the map's hot spot "
            f"({100 * s['area']:.1f}% of the image, {100 * s['concentration']:.0f}% of the relevance) changes "
            f"{100 * s['flip']:.0f}% of them, the same shape elsewhere {100 * s['control_flip']:.0f}%; "
            f"unlike the tissue in {100 * s['atypical']:.0f}%")


def print_audit(audits: dict[str, dict], class_names) -> None:
    """Per method: the alarms (audit.alarmed), else the most suspicious strategy."""
    for method, a in audits.items():
        ranked = sorted(a["strategies"], key=lambda s: -evidence(s["suspicion"], s["n"]))
        alarms = [s for s in ranked if alarmed(s["suspicion"], s["n"])]
        level = f"the alarm level (suspicion {ALARM} over at least {MIN_ALARM} maps)"
        print(f"shortcut audit ({method}, {a['n_maps']} maps): "
              + (f"{len(alarms)} strategy(ies) at {level}, the strongest evidence (suspicion x sqrt(maps)) first:"
                 if alarms else f"no strategy reaches {level}; the strongest evidence (suspicion x sqrt(maps)):"))
        for s in alarms or ranked[:1]:
            print(f"  suspicion {s['suspicion']:.2f}: {in_words(s, class_names)}")
