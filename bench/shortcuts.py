"""The shortcut audit's benchmark: does explain.py --audit (audit.py) find a mark that a model learnt
as a shortcut without being told where or what it is, and does it stay quiet on models that never
learnt one?

    python bench/bench.py audit --models runs/planted-models   # bench/planted.py's models, trained if missing
    python bench/bench.py audit --models runs/planted-models --fold-ids 0 --json audit.json

The models are bench/planted.py's (the 718 real test-split images, 5 stratified folds, seed 0, three
LightCNNs per fold trained with train.py's defaults: one on clean images, two with four kinds of mark
each drawn on every training image of the mark's class). The audited selection is the held-out fold
as a lab would meet it: the mark drawn on a seeded SHARE of the images of *every* class, as pen marks
are on some slides and not others. Every image is explained with explain.py's default method at its
predicted class, then audited as explain.py --audit audits stored maps.

- Planted models, one audit per mark: the mark *caused* a prediction where the marked image is
  predicted as the mark's class and the same image without it is not. The audit's most suspicious
  strategy of the mark's class is scored by recall (the share of the caused images it holds) and
  precision (the share of its images that carry the mark; the stricter share that the mark caused is
  reported too), and whether it raised an alarm (suspicion >= audit.ALARM).
- Clean models: one audit of the unmarked fold and one per mark's selection: the highest suspicion
  of any strategy of any class, and whether it raised an alarm (a false alarm: nothing was learnt).
Both kinds of map description (audit.FEATURES) are audited on the same maps.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

SHARE = 0.3    # of each class's held-out images carry the mark
ENTRY = "Blur IG × Grad-CAM"  # explain.py's default method (bench/xai.py's name for it)


def carriers(labels: np.ndarray, mark: str, fold: int) -> np.ndarray:
    """bool per held-out image: a seeded SHARE of every class's images carries the mark."""
    rng = np.random.default_rng([fold, sum(map(ord, mark))])
    out = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out[rng.choice(rows, int(round(SHARE * len(rows))), replace=False)] = True
    return out


def audit_job(real: str, k: int, f: int, folder: str, groups=None) -> dict:
    """Every audit of fold f: each planted model on each of its marks, the clean model on the
    unmarked images and on every mark's selection."""
    torch.set_num_threads(1)
    import planted
    import xai
    from audit import FEATURES, audit_maps
    from data import normalize
    from marks import plant
    from model import GRADCAM_LAYERS, predict
    data, images, labels, train_idx, val_idx, test_idx, Split = planted._fold_data(Path(real), k, f)
    refs = normalize(images[train_idx]).contiguous(memory_format=torch.channels_last)
    everything = np.arange(len(labels))  # the audited selection: all 718 images (see the module's text)
    y = labels
    seeds = np.array([int(i) * 1009 + 7 for i in everything])
    all_marks = [m for g in planted.GROUPS for m in g]
    out = {"fold": f, "planted": [], "clean": [], "seconds": {}}
    for group in ((-1, *range(len(planted.GROUPS))) if groups is None else groups):
        net = planted._load(str(Path(folder) / f"fold{f}-group{group}.pt"))
        layer = net.get_submodule(GRADCAM_LAYERS["lightcnn"])
        base = images
        base_pred = predict(net, base, 256, "cpu", data.task).argmax(1)
        t0 = time.perf_counter()
        base_maps = xai.explain(ENTRY, net, base, torch.from_numpy(base_pred), seeds, refs)
        out["seconds"].setdefault("maps", []).append((time.perf_counter() - t0) / len(base))
        marks = list(planted.GROUPS[group]) if group >= 0 else [None] + all_marks
        for mark in marks:
            x, maps, pred = base.clone(), base_maps.clone(), base_pred.copy()
            carries = np.zeros(len(y), bool) if mark is None else carriers(y, mark, f)
            if mark is not None:
                rows = np.flatnonzero(carries)
                x[rows] = plant(base[rows], mark, planted.mark_seeds(rows, mark, 3))[0]
                pred[rows] = predict(net, x[rows], 256, "cpu", data.task).argmax(1)
                maps[rows] = xai.explain(ENTRY, net, x[rows], torch.from_numpy(pred[rows]), seeds[rows], refs)
            row = {"mark": mark, "carries": int(carries.sum()), "pred": pred.tolist(), "base_pred": base_pred.tolist(),
                   "features": {}}
            if group >= 0:
                c = planted.target_class(f, group, planted.GROUPS[group].index(mark))
                caused = carries & (pred == c) & (base_pred != c)
                learnt = planted._marked_held_out(net, images, labels, test_idx, mark, c, base_pred[test_idx])[3]
                row.update(target=c, caused=int(caused.sum()), learnt=bool(learnt.sum() >= planted.MIN_CAUSED),
                           decided_of_eligible=[int(learnt.sum()), len(learnt)])
            for kind in FEATURES:
                t0 = time.perf_counter()
                found = audit_maps(net, layer, x, maps, pred, seeds, kind)
                out["seconds"].setdefault(f"audit {kind}", []).append((time.perf_counter() - t0) / len(x))
                strategies = [{"cls": s.cls, "n": s.n, "suspicion": s.suspicion, "flip": s.flip,
                               "control_flip": s.control_flip, "atypical": s.atypical, "area": s.area,
                               "marked": int(carries[s.members].sum()),
                               **({"caused": int(caused[s.members].sum())} if group >= 0 else {})}
                              for s in found.flat()]
                r = {"strategies": strategies, "max_suspicion": max(s["suspicion"] for s in strategies),
                     "n_strategies": len(strategies), "member_of": found.member_of.tolist(),
                     "per_map": {n: np.asarray(v, np.float64).round(4).tolist() for n, v in found.per_map.items()}}
                if group >= 0:
                    top = found.strategies[c][0] if c in found.strategies else None
                    r["top"] = None if top is None else {
                        "n": top.n, "suspicion": top.suspicion, "recall": float(caused[top.members].sum() / max(1, caused.sum())),
                        "precision_marked": float(carries[top.members].mean()),
                        "precision_caused": float(caused[top.members].mean())}
                    others = [s["suspicion"] for s in strategies if s["cls"] != c]
                    r["max_other_suspicion"] = max(others) if others else 0.0
                row["features"][kind] = r
            out["planted" if group >= 0 else "clean"].append(row)
    return out


def run(real: Path, k: int = 5, folds=None, workers: int = 2, models: str = "runs/planted-models") -> dict:
    """Train what bench/planted.py's folder lacks, then every fold's audits in `workers` processes."""
    import planted
    folds = list(range(k) if folds is None else folds)
    here = Path(__file__).resolve()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(here.parents[1]), str(here.parent),
                                                os.environ.get("PYTHONPATH", "")])
    Path(models).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        trained = [pool.submit(planted.train_job, str(real), k, f, g, {}, models) for f in folds
                   for g in (-1, *range(len(planted.GROUPS))) if not (Path(models) / f"fold{f}-group{g}.pt").exists()]
        for t in trained:
            print(f"trained {Path(t.result()).stem}", flush=True)
        jobs = [pool.submit(audit_job, str(real), k, f, models) for f in folds]
        return {"k": k, "share": SHARE, "folds": [j.result() for j in jobs]}
