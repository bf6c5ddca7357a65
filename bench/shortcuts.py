"""The shortcut audit's benchmark: does explain.py --audit (audit.py) find a mark that a model learnt
as a shortcut without being told where or what it is, and does it stay quiet on models that never
learnt one?

    python bench/bench.py audit --models runs/planted-models   # bench/planted.py's models, trained if missing
    python bench/bench.py audit --models runs/planted-models --fold-ids 0 --json audit.json
    python bench/bench.py audit --models runs/planted-models --share 0.15 --draw 1   # another selection

The models are bench/planted.py's (the 718 real test-split images, 5 stratified folds, seed 0, three
LightCNNs per fold trained with train.py's defaults: one on clean images, two with four kinds of mark
each drawn on every training image of the mark's class). The audited selection is all 718 images as
a lab would meet them: the mark drawn on a seeded SHARE of the images of *every* class, as pen marks
are on some slides and not others (--share and --draw audit another selection: other images, a
rarer mark, on which none of the audit's choices were made). (A held-out fold has some 16 images per
class, too few to group into strategies; the fold's training images never carried a mark outside
its class, so a mark that turns one of them to the mark's class is the shortcut at work there too.)
Every image is explained with explain.py's default method at its predicted class, then audited as
explain.py --audit audits stored maps.

- Planted models, one audit per mark: the mark *caused* a prediction where the marked image is
  predicted as the mark's class and the same image without it is not. The audit's first strategy of
  the mark's class (ranked by suspicion x sqrt(images), audit.evidence) is scored by recall (the
  share of the caused images it holds) and precision (the share of its images that carry the mark;
  the stricter share that the mark caused is reported too), and whether it raised an alarm
  (audit.alarmed: suspicion >= 0.2 over >= 5 images).
- The same audit with each carrier's map replaced by its mark's mask (oracle_maps): a miss that a
  perfect explanation would not fix is the audit's own.
- Clean models: one audit of the unmarked images and one per mark's selection: the highest suspicion
  of any strategy of any class, and whether one raised an alarm (a false alarm: no mark was learnt).
Both kinds of map description (audit.FEATURES) are audited on the same maps.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

SHARE = 0.3    # of each class's images carry the mark
ENTRY = "(Blur IG + LRP) × Grad-CAM"  # explain.py's default method (bench/xai.py's name for it)


def carriers(labels: np.ndarray, mark: str, fold: int, share: float = SHARE, draw: int = 0) -> np.ndarray:
    """bool per image: a seeded share of every class's images carries the mark; another draw picks
    other images (draw 0 is the benchmark's own selection)."""
    rng = np.random.default_rng([fold, sum(map(ord, mark))] + ([draw] if draw else []))
    out = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out[rng.choice(rows, int(round(share * len(rows))), replace=False)] = True
    return out


def maps_cache(folder, f: int, group: int, share: float = SHARE, draw: int = 0) -> Path:
    """Where the maps of fold f's model are kept: those of the benchmark's selection, or of another."""
    tail = "" if (share, draw) == (SHARE, 0) else f"-share{share:g}-draw{draw}"
    return Path(folder) / f"maps-fold{f}-group{group}{tail}.pt"


def _kept(cache: Path) -> dict:
    """The maps kept in cache if they are ENTRY's (a change of explain.py's default recomputes them)."""
    kept = torch.load(cache, weights_only=True) if cache.exists() else {}
    return kept if kept.get("entry") == ENTRY else {"entry": ENTRY}


def explained(net, refs, base, base_pred, y, seeds, marks, f: int, cache: Path, task: str, seconds: dict,
              share: float = SHARE, draw: int = 0, base_from: Path | None = None):
    """mark -> (images, predictions, maps, carriers) of the selection with that mark drawn (None: no
    mark), every image explained at its prediction with ENTRY. The unmarked images' maps are
    computed once and shared (or taken from `base_from`, another selection's cache of the same
    model); all are kept in `cache`, so audits can be rerun without the maps."""
    import xai
    from model import predict
    kept = _kept(cache)
    if "base" not in kept and base_from is not None:
        kept.update({k: v for k, v in _kept(base_from).items() if k == "base"})
    if "base" not in kept:
        t0 = time.perf_counter()
        kept["base"] = xai.explain(ENTRY, net, base, torch.from_numpy(base_pred), seeds, refs)
        seconds.setdefault("maps", []).append((time.perf_counter() - t0) / len(base))
    for mark in marks:
        if mark is not None and mark not in kept:
            rows = np.flatnonzero(carriers(y, mark, f, share, draw))
            x = drawn(base, rows, mark)[0]
            pred = predict(net, x, 256, "cpu", task).argmax(1)
            kept[mark] = {"rows": torch.from_numpy(rows), "x": x, "pred": torch.from_numpy(pred),
                          "maps": xai.explain(ENTRY, net, x, torch.from_numpy(pred), seeds[rows], refs)}
    torch.save(kept, cache)

    def of(mark):
        x, pred, maps = base.clone(), base_pred.copy(), kept["base"].clone()
        carries = np.zeros(len(base), bool)
        if mark is not None:
            k = kept[mark]
            rows = k["rows"].numpy()
            x[rows], pred[rows], maps[rows], carries[rows] = k["x"], k["pred"].numpy(), k["maps"], True
        return x, pred, maps, carries
    return of


def drawn(base: torch.Tensor, rows: np.ndarray, mark: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images `rows` of base with the mark drawn, and its masks: the same places on every call."""
    import planted
    from marks import plant
    return plant(base[rows], mark, planted.mark_seeds(rows, mark, 3))


def oracle_maps(base: torch.Tensor, maps: torch.Tensor, carries: np.ndarray, mark: str) -> torch.Tensor:
    """(N, H, W): the maps with each carrier's replaced by its mark's mask (drawn again from the same
    seeds as explained() drew it), the map a perfect explanation of a learnt mark would give. Audited
    like the stored maps, it tells a miss of the explanation (the mark found with its mask) from a miss
    of the audit's own tests (missed with its mask too)."""
    maps = torch.as_tensor(maps).float()
    out = (maps.sum(1) if maps.ndim == 4 else maps).clone()
    rows = np.flatnonzero(carries)
    out[rows] = drawn(base, rows, mark)[1].float()
    return out


def audit_job(real: str, k: int, f: int, folder: str, groups=None, share: float = SHARE, draw: int = 0) -> dict:
    """Every audit of fold f: each planted model on each of its marks, the clean model on the
    unmarked images and on every mark's selection (the mark on `share` of each class, draw `draw`)."""
    torch.set_num_threads(1)
    import planted
    from audit import FEATURES, audit_maps, describe
    from data import normalize
    from mosaic import layout
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
        marks = list(planted.GROUPS[group]) if group >= 0 else [None] + all_marks
        maps_of = explained(net, refs, base, base_pred, y, seeds, marks, f, maps_cache(folder, f, group, share, draw),
                            data.task, out["seconds"], share, draw, base_from=maps_cache(folder, f, group))
        for mark in marks:
            x, pred, maps, carries = maps_of(mark)
            row = {"mark": mark, "carries": int(carries.sum()), "pred": pred.tolist(), "base_pred": base_pred.tolist(),
                   "features": {}}
            if group >= 0:
                c = planted.target_class(f, group, planted.GROUPS[group].index(mark))
                caused = carries & (pred == c) & (base_pred != c)
                learnt = planted._marked_held_out(net, images, labels, test_idx, mark, c, base_pred[test_idx])[3]
                row.update(target=c, caused=int(caused.sum()), learnt=bool(learnt.sum() >= planted.MIN_CAUSED),
                           decided_of_eligible=[int(learnt.sum()), len(learnt)])
                # The comparison for the map of the data set: the model's features of the whole image,
                # no map (its penultimate features, average-pooled), laid out the same way.
                whole = layout(describe(net, layer, x, torch.ones_like(maps), "evidence"))
                row["features_alone"] = on_the_map(whole, caused, carries)
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
                    r["top"] = None if top is None else scored(top, caused, carries)
                    others = [s["suspicion"] for s in strategies if s["cls"] != c]
                    r["max_other_suspicion"] = max(others) if others else 0.0
                    r["map"] = on_the_map(np.stack([found.per_map["x"], found.per_map["y"]], 1), caused, carries)
                row["features"][kind] = r
            if group >= 0 and carries.any():
                found = audit_maps(net, layer, x, oracle_maps(base, maps, carries, mark), pred, seeds)
                row["oracle"] = scored(found.strategies[c][0], caused, carries) if c in found.strategies else None
            out["planted" if group >= 0 else "clean"].append(row)
    return out


def scored(s, caused: np.ndarray, carries: np.ndarray) -> dict:
    """A strategy's numbers for the benchmark: its tests, and how much of the mark it holds (recall:
    share of the images the mark caused; precision: share of its images that carry the mark, or
    that the mark caused)."""
    return {"n": s.n, "suspicion": s.suspicion, "flip": s.flip, "control_flip": s.control_flip, "atypical": s.atypical,
            "alarm": s.alarm, "recall": float(caused[s.members].sum() / max(1, caused.sum())),
            "precision_marked": float(carries[s.members].mean()), "precision_caused": float(caused[s.members].mean())}


def on_the_map(xy: np.ndarray, caused: np.ndarray, carries: np.ndarray) -> dict:
    """How visible the images a mark caused are on a map of the data set (mosaic.py): how much they
    keep to themselves (island; chance: their share of the other images) and how many of the report's
    mosaic tiles show one (or any image with the mark)."""
    from mosaic import island, mosaic
    shown = mosaic(xy)
    shown = shown[shown >= 0]
    return {"island": island(xy, caused), "chance": float((caused.sum() - 1) / max(1, len(caused) - 1)),
            "tiles": len(shown), "tiles_caused": int(caused[shown].sum()), "tiles_marked": int(carries[shown].sum())}


def run(real: Path, k: int = 5, folds=None, workers: int = 2, models: str = "runs/planted-models",
        share: float = SHARE, draw: int = 0) -> dict:
    """Train what bench/planted.py's folder lacks, then every fold's audits in `workers` processes,
    the mark drawn on `share` of each class's images (draw 0: the benchmark's selection; another
    draw and share: a selection the audit's choices were not made on)."""
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
        jobs = [pool.submit(audit_job, str(real), k, f, models, None, share, draw) for f in folds]
        return {"k": k, "share": share, "draw": draw, "folds": [j.result() for j in jobs]}


def speed(real: Path, models: str, tmp: str = "", n_copies: int = 10) -> dict:
    """Seconds explain.py --audit takes for 7,180 stored maps (the size of PathMNIST's test split):
    the 718 real images in 10 orientations (rotations and mirror images, as tissue can lie), fold 0's
    first planted model, explain.py's default maps stored in a fresh database, then run_audit (read,
    audit, store) timed with each kind of map description, in this process with its threads. The maps
    are kept in `models` (maps-speed-*.pt) with the time they took, so a rerun times the audit alone."""
    import tempfile

    import planted
    import xai
    from audit_run import run_audit
    from data import load_data, normalize
    from db import ExplanationDB
    from db_run import RunStore
    from model import GRADCAM_LAYERS, predict
    data = load_data("pathmnist", 28, real, ("test",))
    one = data.splits["test"].images
    turns = [(k, flip) for flip in (False, True) for k in range(4)] + [(1, False), (3, True)]
    images = torch.cat([torch.rot90(one.flip(-1) if flip else one, k, (-2, -1)) for k, flip in turns[:n_copies]])
    net = planted._load(str(Path(models) / "fold0-group0.pt"))
    layer = net.get_submodule(GRADCAM_LAYERS["lightcnn"])
    pred = predict(net, images, 256, "cpu", data.task)
    cache = Path(models) / f"maps-speed-{n_copies}.pt"  # kept, so the audit can be timed again without them
    kept = _kept(cache)
    if "maps" not in kept:
        t0 = time.perf_counter()
        refs = normalize(one[:256]).contiguous(memory_format=torch.channels_last)
        kept["maps"] = torch.cat([xai.explain(ENTRY, net, images[s:s + 512], torch.from_numpy(pred[s:s + 512].argmax(1)),
                                              range(s, s + 512), refs) for s in range(0, len(images), 512)])
        kept["seconds"] = time.perf_counter() - t0
        torch.save(kept, cache)
    maps = kept["maps"]
    out = {"maps": len(images), "seconds_maps": kept["seconds"]}
    with tempfile.TemporaryDirectory(dir=tmp or None) as folder, ExplanationDB(Path(folder) / "audit.db") as db:
        store = RunStore.open(db, checkpoint_sha256="0" * 64, model="lightcnn", config={}, dataset="bench",
                              size=28, split="test")
        idx = np.arange(len(images))
        method = xai.ENTRIES[ENTRY][0]
        sid = store.add_settings({method: {}})[method]
        store.put(sid, sample_ids=store.add_samples(idx, np.zeros(len(idx), np.int64)), targets=pred.argmax(1),
                  predicted=pred.argmax(1), confidence=pred.max(1), maps=maps.numpy())
        for kind in ("evidence", "spray"):
            t0 = time.perf_counter()
            run_audit(store, net, layer, images, idx, {method: sid}, kind, "bench", "test")
            out[f"seconds_audit_{kind}"] = time.perf_counter() - t0
            print(f"audit of {len(images)} stored maps ({kind}): {out[f'seconds_audit_{kind}']:.1f} s", flush=True)
    return out


def held(recall: float, precision: float) -> bool:
    """The issue's bar for a strategy that found a mark: >= 90% of the images it caused, >= 80% of its images marked."""
    return recall >= 0.9 and precision >= 0.8


def summary(out: dict, kind: str = "evidence") -> dict:
    """The issue's two figures for one kind of map description: per learnt (mark, fold), whether the
    most suspicious strategy of the mark's class holds >= 90% of the images the mark caused at a
    precision >= 80% and raised an alarm; per fold, whether any audit of its clean model did."""
    from audit import MIN_ALARM, alarmed, evidence
    rows, clean = [], []
    for fold in out["folds"]:
        for r in fold["planted"]:
            if not r["learnt"] or not r["caused"]:
                continue
            # The mark's class's first strategy, ranked as audit.py ranks them (from the stored counts).
            mine = [s for s in r["features"][kind]["strategies"] if s["cls"] == r["target"]]
            best = max(mine, key=lambda s: evidence(s["suspicion"], s["n"]))
            top = {"n": best["n"], "suspicion": best["suspicion"], "recall": best["caused"] / r["caused"],
                   "precision_marked": best["marked"] / best["n"], "precision_caused": best["caused"] / best["n"]}
            rows.append({"fold": fold["fold"], "mark": r["mark"], "target": r["target"], "caused": r["caused"], **top,
                         "found": held(top["recall"], top["precision_marked"]),
                         "alarm": alarmed(top["suspicion"], top["n"]),
                         "max_other": max([s["suspicion"] for s in r["features"][kind]["strategies"]
                                           if s["cls"] != r["target"] and s["n"] >= MIN_ALARM] or [0.0]),
                         "map": r["features"][kind].get("map"), "features_alone": r.get("features_alone"),
                         "oracle": r.get("oracle")})
        strategies = [s for r in fold["clean"] for s in r["features"][kind]["strategies"]]
        clean.append({"fold": fold["fold"], "max_suspicion": max(s["suspicion"] for s in strategies if s["n"] >= MIN_ALARM),
                      "alarm": any(alarmed(s["suspicion"], s["n"]) for s in strategies), "audits": len(fold["clean"])})
    return {"planted": rows, "clean": clean}


def report(out: dict) -> str:
    """Markdown: per kind of map description, every learnt (mark, fold) and every clean fold."""
    import planted
    from audit import ALARM, MIN_ALARM
    lines = [f"Selection: each mark on {out.get('share', SHARE):.0%} of every class's images, draw {out.get('draw', 0)}.", ""]
    for kind in out["folds"][0]["planted"][0]["features"]:
        s = summary(out, kind)
        found, alarmed = sum(r["found"] for r in s["planted"]), sum(r["alarm"] and r["found"] for r in s["planted"])
        false = sum(c["alarm"] for c in s["clean"])
        folds_of = {m: sum(r["mark"] == m for r in s["planted"]) for m in {r["mark"] for r in s["planted"]}}
        kinds = [r for r in s["planted"] if folds_of[r["mark"]] >= planted.MIN_FOLDS]
        lines += [f"### Map description: {kind}", "",
                  f"Planted marks (a mark learnt on a fold; {len(s['planted'])} pairs): the first strategy (by suspicion x sqrt(images)) of "
                  f"the mark's class held >= 90% of the images the mark caused at >= 80% precision in {found}; "
                  f"of those, {alarmed} raised the alarm (suspicion >= {ALARM} over >= {MIN_ALARM} images). Clean models: {false} of "
                  f"{len(s['clean'])} folds raised an alarm. The kinds of mark the planted benchmark counts as learnt (on >= "
                  f"{planted.MIN_FOLDS} folds; {', '.join(sorted(m for m, n in folds_of.items() if n < planted.MIN_FOLDS)) or 'none'} "
                  f"learnt on fewer): {sum(r['alarm'] and r['found'] for r in kinds)} of {len(kinds)} pairs.", "",
                  "| fold | mark | class | caused | top strategy: images | recall | precision (marked) | "
                  "precision (caused) | suspicion | alarm | highest other class's |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["planted"]:
            lines.append(f"| {r['fold']} | {r['mark']} | {r['target']} | {r['caused']} | {r['n']} | {r['recall']:.2f} | "
                         f"{r['precision_marked']:.2f} | {r['precision_caused']:.2f} | {r['suspicion']:.2f} | "
                         f"{'yes' if r['alarm'] else 'no'} | {r['max_other']:.2f} |")
        lines += ["", "| clean model, fold | audits (unmarked + one per mark) | highest suspicion | alarm |",
                  "|---|---|---|---|"]
        lines += [f"| {c['fold']} | {c['audits']} | {c['max_suspicion']:.2f} | {'yes' if c['alarm'] else 'no'} |"
                  for c in s["clean"]]
        lines += ["", *map_table(s["planted"], kind)]
        if kind == "evidence":
            lines += oracle_table(s["planted"])
    if "speed" in out:
        sp = out["speed"]
        lines.append(f"Speed: the audit of {sp['maps']} stored maps took {sp['seconds_audit_evidence']:.1f} s (evidence) "
                     f"and {sp['seconds_audit_spray']:.1f} s (spray); computing the maps took {sp['seconds_maps']:.0f} s.")
    return "\n".join(lines)


def map_table(rows: list[dict], kind: str) -> list[str]:
    """Markdown: per learnt (mark, fold), how visible the images the mark caused are on the report's
    map of the data set (the audit's descriptions laid out) and on a map of the model's features of
    the whole image (no map), against chance; and the same over the pairs the audit's first strategy missed."""
    from mosaic import GRID
    rows = [r for r in rows if r.get("map") and r.get("features_alone")]
    if not rows:
        return []
    med = lambda rs, key, part: float(np.median([r[part][key] for r in rs])) if rs else float("nan")
    missed = [r for r in rows if not r["found"]]
    out = [f"Map of the data set ({kind}; mosaic.py): the caused images' island score (the share of each one's 10 "
           f"nearest images on the map that the mark caused too; chance: their share of all images) and the "
           f"report's mosaic tiles (of {GRID}x{GRID} cells) showing one. Median over {len(rows)} pairs: "
           f"audit's map {med(rows, 'island', 'map'):.2f}, features of the whole image {med(rows, 'island', 'features_alone'):.2f}, "
           f"chance {med(rows, 'chance', 'map'):.2f}; over the {len(missed)} pairs the first strategy missed: "
           f"{med(missed, 'island', 'map'):.2f}, {med(missed, 'island', 'features_alone'):.2f}, {med(missed, 'chance', 'map'):.2f}.", "",
           "| fold | mark | caused | island: audit's map | island: whole-image features | chance | tiles showing a caused image "
           "(audit's map) | (features) | first strategy found it |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, f = r["map"], r["features_alone"]
        out.append(f"| {r['fold']} | {r['mark']} | {r['caused']} | {m['island']:.2f} | {f['island']:.2f} | {m['chance']:.2f} | "
                   f"{m['tiles_caused']} of {m['tiles']} | {f['tiles_caused']} of {f['tiles']} | {'yes' if r['found'] else 'no'} |")
    return out + [""]


def oracle_table(rows: list[dict]) -> list[str]:
    """Markdown: per learnt (mark, fold), the audit of the stored maps against the audit of the mark's
    own mask as the map of each image that carries it (oracle_maps): does a miss lie in the maps or in
    the audit's tests?"""
    rows = [r for r in rows if r.get("oracle")]
    if not rows:
        return []
    hit = lambda o: held(o["recall"], o["precision_marked"]) and o["alarm"]
    both = sum(hit(r["oracle"]) for r in rows)
    out = [f"The mark's own mask as the map of every image that carries it (a perfect explanation; the other images keep "
           f"their maps), audited alike: {both} of {len(rows)} pairs found and alarmed, against "
           f"{sum(r['found'] and r['alarm'] for r in rows)} with the stored maps.", "",
           "| fold | mark | stored maps: found and alarmed | mask: images | recall | precision (marked) | filled spot changes "
           "| moved control | unlike tissue | suspicion | found and alarmed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["oracle"]
        out.append(f"| {r['fold']} | {r['mark']} | {'yes' if r['found'] and r['alarm'] else 'no'} | {o['n']} | {o['recall']:.2f} | "
                   f"{o['precision_marked']:.2f} | {o['flip']:.2f} | {o['control_flip']:.2f} | {o['atypical']:.2f} | "
                   f"{o['suspicion']:.2f} | {'yes' if hit(o) else 'no'} |")
    return out + [""]


def figure(real: Path, models: str, path: Path, fold: int = 0, k: int = 5, n_show: int = 4) -> Path:
    """One row per audit of `fold` (from the maps kept with the models): each planted mark's class's
    most suspicious strategy, then the clean model's most suspicious strategy of any class on the
    unmarked images; each with n_show of its exemplars (image, then its map with the hot spot outlined)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import planted
    from audit import audit_maps, grow, hot_spots
    from data import PATHMNIST_CLASSES, normalize
    from figures import save_figure
    from model import GRADCAM_LAYERS, predict
    data, images, labels, train_idx, val_idx, test_idx, Split = planted._fold_data(real, k, fold)
    refs = normalize(images[train_idx]).contiguous(memory_format=torch.channels_last)
    seeds = np.array([int(i) * 1009 + 7 for i in range(len(labels))])
    rows = []
    for group in (*range(len(planted.GROUPS)), -1):
        net = planted._load(str(Path(models) / f"fold{fold}-group{group}.pt"))
        layer = net.get_submodule(GRADCAM_LAYERS["lightcnn"])
        base_pred = predict(net, images, 256, "cpu", data.task).argmax(1)
        marks = list(planted.GROUPS[group]) if group >= 0 else [None]
        of = explained(net, refs, images, base_pred, labels, seeds, marks, fold,
                       maps_cache(models, fold, group), data.task, {})
        for mark in marks:
            x, pred, maps, carries = of(mark)
            found = audit_maps(net, layer, x, maps, pred, seeds)
            if mark is None:
                top = max(found.flat(), key=lambda s: s.suspicion)
                title = "model trained without marks, unmarked images"
            else:
                c = planted.target_class(fold, group, planted.GROUPS[group].index(mark))
                if (carries & (pred == c) & (base_pred != c)).sum() < planted.MIN_CAUSED:
                    continue  # the mark decided (almost) nothing here: not learnt
                top = found.strategies[c][0]
                title = f"planted: {mark}"
            show = top.exemplars[:n_show]
            rows.append((title, top, PATHMNIST_CLASSES[top.cls], x[show], maps[show]))
    fig = plt.figure(figsize=(1.25 * 2 * n_show, 1.6 * len(rows) + 0.5), layout="constrained")
    for sub, (title, s, cls, x, m) in zip(fig.subfigures(len(rows), 1), rows):
        axes = sub.subplots(1, 2 * n_show)
        spot = grow(hot_spots(m), 1)
        for j in range(n_show):
            a, b = axes[2 * j], axes[2 * j + 1]
            if j < len(x):
                a.imshow(x[j].permute(1, 2, 0).numpy(), interpolation="nearest")
                lim = max(float(m[j].clamp(min=0).max()), 1e-12)
                b.imshow(m[j].clamp(min=0).numpy(), cmap="Reds", vmin=0, vmax=lim, interpolation="nearest")
                b.contour(spot[j].numpy(), levels=[0.5], colors="black", linewidths=0.6)
            a.set_xticks([]), a.set_yticks([]), b.set_xticks([]), b.set_yticks([])
            a.axis("off" if j >= len(x) else "on"), b.axis("off" if j >= len(x) else "on")
        verdict = "ALARM" if s.alarm else "no alarm"
        sub.suptitle(textwrap.fill(
            f"{title} | predicted {cls}, {s.n} images: filling the spot changes {100 * s.flip:.0f}% "
            f"(elsewhere {100 * s.control_flip:.0f}%), unlike tissue {100 * s.atypical:.0f}% | suspicion "
            f"{s.suspicion:.2f}: {verdict}", 110), fontsize=7, x=0.02, ha="left")
    return save_figure(fig, path, f"The shortcut audit on fold {fold} of the planted-mark models (real tissue, "
                       "LightCNN):\nper mark the first strategy of its class (last row: a model trained without "
                       "marks, its most suspicious),\nfour of its images and their maps (filled spot outlined)")


def map_figure(real: Path, models: str, path: Path, fold: int = 0, mark: str = "tinted square", k: int = 5) -> Path:
    """The report's map of the data set for one planted mark of `fold` (from the maps kept with the
    models), next to the same mosaic of the model's whole-image features: each cell's image, framed
    where the mark caused its prediction (what the audit is not told)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    import planted
    from audit import audit_maps, describe
    from data import PATHMNIST_CLASSES, normalize
    from figures import save_figure
    from model import GRADCAM_LAYERS, predict
    from mosaic import GRID, layout, mosaic
    group = next(g for g, marks in enumerate(planted.GROUPS) if mark in marks)
    c = planted.target_class(fold, group, planted.GROUPS[group].index(mark))
    data, images, labels, train_idx, val_idx, test_idx, Split = planted._fold_data(real, k, fold)
    refs = normalize(images[train_idx]).contiguous(memory_format=torch.channels_last)
    seeds = np.array([int(i) * 1009 + 7 for i in range(len(labels))])
    net = planted._load(str(Path(models) / f"fold{fold}-group{group}.pt"))
    layer = net.get_submodule(GRADCAM_LAYERS["lightcnn"])
    base_pred = predict(net, images, 256, "cpu", data.task).argmax(1)
    x, pred, maps, carries = explained(net, refs, images, base_pred, labels, seeds, [mark], fold,
                                       maps_cache(models, fold, group), data.task, {})(mark)
    caused = carries & (pred == c) & (base_pred != c)
    found = audit_maps(net, layer, x, maps, pred, seeds)
    places = {"the report's map: the audit's descriptions of the maps": np.stack([found.per_map["x"], found.per_map["y"]], 1),
              "for comparison: the model's features of the whole image": layout(describe(net, layer, x, torch.ones_like(maps),
                                                                                          "evidence"))}
    side = x.shape[-1]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.9), layout="constrained")
    for ax, (title, xy) in zip(axes, places.items()):
        cells = mosaic(xy)
        canvas = np.full((GRID * side, GRID * side, 3), 245, np.uint8)
        for (r, col), i in np.ndenumerate(cells):
            if i >= 0:
                canvas[r * side:(r + 1) * side, col * side:(col + 1) * side] = x[i].permute(1, 2, 0).numpy()
                if caused[i]:
                    ax.add_patch(Rectangle((col * side - 0.5, r * side - 0.5), side, side, fill=False, ec="#1f5fd6", lw=1.6))
        ax.imshow(canvas, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        seen = on_the_map(xy, caused, carries)
        ax.set_title(f"{title}\nisland score {seen['island']:.2f} (chance {seen['chance']:.2f}); "
                     f"{seen['tiles_caused']} of {seen['tiles']} tiles show an image the mark decided", fontsize=9)
    return save_figure(fig, path, f"Map of the data set, fold {fold}: {len(x)} real images, the {mark} drawn on 30% of "
                       f"every class's, on a model that learnt it as {PATHMNIST_CLASSES[c]} (blue frames: the "
                       f"{int(caused.sum())} predictions it decided)")
