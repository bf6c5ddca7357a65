"""The planted-shortcut benchmark: marks planted on one class's training images of real tissue, a
model trained on them with train.py's defaults, and every explanation method scored against where
the mark really is, on the images whose prediction the mark caused.

    python bench/bench.py planted                  # 5 folds of the 718 real images, 2 workers (~1 h, 2 cores)
    python bench/bench.py planted --quick          # 1 fold, 2 marks, few images: a smoke run
    python bench/bench.py planted --json planted.json --entries "blur ig,lrp"

Per fold (bench/cv.py's stratified folds, seed 0) three LightCNNs are trained with training.Recipe()
(train.py's defaults): one on clean images and one per group of GROUPS, in which each mark of the
group is drawn (marks.py, at a random place) on every training and validation image of its own
target class. On the held-out fold, each mark is drawn on every image that is neither of nor
predicted as its target class; the mark *caused* the prediction where the marked twin is predicted
as the target class. A mark counts as learnt on a fold when it caused at least MIN_CAUSED of them.
On those images every entry of xai.ENTRIES explains the target class and is scored (groundtruth.py):
top-K rank accuracy (K = the mark's area), relevance mass accuracy, the pointing game. Controls: a
random map, the model-blind Sobel edges, and each method's own map from the clean model of the same
fold (a model that never saw the mark: what a method finds there comes from the image, not from the
model's use of it). Intervals: 95% bootstrap over images (the mean over marks: images resampled
within each mark). These are cross-validation numbers on 718 images from one centre.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

MIN_CAUSED = 5   # a mark counts as learnt on a fold when it decided at least this many held-out predictions
N_MAX = 32       # images explained per mark and fold (the first of those it decided)
N_CONTROL = 16   # of them, explained by the clean model too
GROUPS = (("small blue dot", "thin black stroke", "wide green blob", "tinted square"),
          ("striped patch", "blurred square", "red ring", "wide black stroke"))
CONTROLS = ("random map", "Sobel edges (ignores the model)")
SCORES = ("rank", "mass", "pointing")
CLEAN = " | clean model"  # an entry's maps from the model that never saw the mark


def target_class(fold: int, group: int, j: int, n_classes: int = 9) -> int:
    """Each mark's class: distinct within a fold, and moving from fold to fold."""
    return (2 * fold + 4 * group + j) % n_classes


def mark_seeds(indices, mark: str, salt: int) -> np.ndarray:
    """Where each image's mark goes: a seed from (image index, mark, salt)."""
    h = sum(map(ord, mark))
    return np.array([(int(i) * 7919 + h * 104729 + salt) % 2**31 for i in indices], dtype=np.int64)


def _fold_data(real: Path, k: int, f: int):
    from cv import carve_val, stratified_folds
    from data import Split, load_data
    data = load_data("pathmnist", 28, real, ("test",))
    images, labels = data.splits["test"].images, data.splits["test"].labels.numpy()
    test_idx = stratified_folds(labels, k, seed=0)[f]
    train_idx, val_idx = carve_val(np.setdiff1d(np.arange(len(labels)), test_idx), labels, 0.2, seed=100)
    return data, images, labels, train_idx, val_idx, test_idx, Split


def _planted(images, labels, idx, marks: dict[str, int], salt: int) -> torch.Tensor:
    """The images of idx with each mark drawn on every image of its target class."""
    from marks import plant
    out = images[idx].clone()
    for mark, c in marks.items():
        mine = np.flatnonzero(labels[idx] == c)
        if len(mine):
            out[mine] = plant(out[mine], mark, mark_seeds(idx[mine], mark, salt))[0]
    return out


def train_job(real: str, k: int, f: int, group: int, recipe_sets: dict, folder: str) -> str:
    """Train one model of fold f (group -1: on clean images) and save its weights in folder."""
    torch.set_num_threads(1)
    from cv import fit_ours
    from training import Recipe
    data, images, labels, train_idx, val_idx, test_idx, Split = _fold_data(Path(real), k, f)
    marks = {} if group < 0 else {m: target_class(f, group, j) for j, m in enumerate(GROUPS[group])}
    part = lambda i, salt: Split(_planted(images, labels, i, marks, salt), torch.from_numpy(labels[i]))
    d = replace(data, splits={"train": part(train_idx, 1), "val": part(val_idx, 2)})
    net, _ = fit_ours(d, replace(Recipe(), **recipe_sets), 0, 10)
    path = Path(folder) / f"fold{f}-group{group}.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def _load(path: str) -> torch.nn.Module:
    from model import build_model, inference_copy
    net = build_model("lightcnn")
    net.load_state_dict(torch.load(path, weights_only=True))
    return inference_copy(net.eval())


def road_job(real: str, k: int, f: int, entries: list[str], folder: str) -> dict:
    """ROAD minus a random map's, per held-out image, of every entry on the clean model of fold f
    (bench/xai.py's protocol for one seed)."""
    torch.set_num_threads(1)
    import xai
    from data import normalize
    from model import predict
    from road import road_curves
    from trust import edge_control
    data, images, labels, train_idx, val_idx, test_idx, Split = _fold_data(Path(real), k, f)
    net = _load(str(Path(folder) / f"fold{f}-group-1.pt"))
    x_uint8 = images[test_idx]
    x = normalize(x_uint8)
    pred = torch.from_numpy(predict(net, x_uint8, 256, "cpu", data.task).argmax(1))
    refs = normalize(images[train_idx]).contiguous(memory_format=torch.channels_last)
    seeds = [int(i) * 1009 + 7 for i in test_idx]
    base = road_curves(net, x, pred, torch.rand(len(x), 28, 28, generator=torch.Generator().manual_seed(0)), seeds)
    gain = lambda c: (((c["lerf"] - c["morf"]).mean(1) - (base["lerf"] - base["morf"]).mean(1)) / 2).numpy().tolist()
    out = {xai.EDGES: gain(road_curves(net, x, pred, edge_control(None, None, x, pred, None, None).maps, seeds))}
    for e in entries:
        out[e] = gain(road_curves(net, x, pred, xai.explain(e, net, x_uint8, pred, seeds, refs), seeds))
    return {"fold": f, "road": out, "held_out_acc": float((pred.numpy() == labels[test_idx]).mean())}


def score_job(real: str, k: int, f: int, group: int, entries: list[str], n_max: int, folder: str) -> dict:
    """The marks of one group on fold f: which the planted model learnt, and every entry's scores on
    the images whose prediction a mark caused (with the clean model's maps as a control)."""
    torch.set_num_threads(1)
    import xai
    from data import normalize
    from groundtruth import localisation_scores
    from marks import plant
    from model import predict
    from attribution import pixel_scores
    from trust import edge_control
    data, images, labels, train_idx, val_idx, test_idx, Split = _fold_data(Path(real), k, f)
    nets = {"clean": _load(str(Path(folder) / f"fold{f}-group-1.pt")),
            "planted": _load(str(Path(folder) / f"fold{f}-group{group}.pt"))}
    refs = normalize(images[train_idx]).contiguous(memory_format=torch.channels_last)
    pred = predict(nets["planted"], images[test_idx], 256, "cpu", data.task).argmax(1)
    out = {"fold": f, "group": group, "marks": {}, "held_out_acc": float((pred == labels[test_idx]).mean())}
    for j, mark in enumerate(GROUPS[group]):
        c = target_class(f, group, j)
        keep = (labels[test_idx] != c) & (pred != c)
        idx = test_idx[keep]
        x, masks = plant(images[idx], mark, mark_seeds(idx, mark, 3))
        caused = predict(nets["planted"], x, 256, "cpu", data.task).argmax(1) == c
        clean_caused = predict(nets["clean"], x, 256, "cpu", data.task).argmax(1) == c
        row = {"target": c, "eligible": int(keep.sum()), "caused": int(caused.sum()),
               "clean_model_caused": int(clean_caused.sum()), "mask_px": float(masks.sum((1, 2)).float().mean()),
               "scores": {}}
        out["marks"][mark] = row
        if caused.sum() < MIN_CAUSED:
            continue
        x, masks, idx = x[caused][:n_max], masks[caused][:n_max], idx[caused][:n_max]
        target = torch.full((len(x),), c, dtype=torch.int64)
        seeds = [int(i) * 1009 + 7 for i in idx]
        maps = {CONTROLS[0]: torch.rand(len(x), *masks.shape[1:], generator=torch.Generator().manual_seed(f)),
                CONTROLS[1]: edge_control(None, None, normalize(x), target, None, None).maps}
        for e in entries:
            maps[e] = xai.explain(e, nets["planted"], x, target, seeds, refs)
            maps[e + CLEAN] = xai.explain(e, nets["clean"], x[:N_CONTROL], target[:N_CONTROL], seeds[:N_CONTROL],
                                          refs)
        row["scores"] = {e: {s: v.numpy().tolist() for s, v in localisation_scores(
            pixel_scores(m, "signed"), masks[:len(m)]).items()} for e, m in maps.items()}
    return out


def run(real: Path, k: int = 5, folds=None, entries: list[str] | None = None, workers: int = 2,
        recipe_sets: dict | None = None, n_max: int = 0, groups=None, models: str = "") -> dict:
    """models: a folder that keeps the trained weights; models already there are reused (the same
    folds, marks and recipe are the caller's to keep), so other entries can be scored without training."""
    import tempfile

    import xai
    entries = entries or list(xai.ENTRIES)
    folds = list(range(k) if folds is None else folds)
    groups = list(range(len(GROUPS)) if groups is None else groups)
    here = Path(__file__).resolve()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(here.parents[1]), str(here.parent),
                                                os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as scratch, ProcessPoolExecutor(workers) as pool:
        folder = models or scratch
        Path(folder).mkdir(parents=True, exist_ok=True)
        trained = [pool.submit(train_job, str(real), k, f, g, recipe_sets or {}, folder)
                   for f in folds for g in [-1] + groups if not (Path(folder) / f"fold{f}-group{g}.pt").exists()]
        for t in trained:
            print(f"trained {Path(t.result()).stem}", flush=True)
        roads = [pool.submit(road_job, str(real), k, f, entries, folder) for f in folds]
        scored = [pool.submit(score_job, str(real), k, f, g, entries, n_max or N_MAX, folder)
                  for f in folds for g in groups]
        results = []
        for t in scored:
            r = t.result()
            print(f"fold {r['fold']} group {r['group']}: held-out acc {r['held_out_acc']:.3f}; " + ", ".join(
                f"{m} caused {v['caused']}/{v['eligible']}" for m, v in r["marks"].items()), flush=True)
            results.append(r)
        road = [t.result() for t in roads]
    return {"jobs": results, "road": road, "k": k, "entries": entries, "min_caused": MIN_CAUSED}


def summarise(out: dict) -> dict:
    """Per entry and mark: the scores pooled over the folds that learnt the mark, with intervals;
    the mean over the tuned marks and over the held-out marks (marks.Mark.tuned)."""
    from marks import MARKS
    from road import bootstrap_interval
    pooled, learnt = {}, {}
    for r in out["jobs"]:
        for mark, row in r["marks"].items():
            learnt.setdefault(mark, []).append({"fold": r["fold"], "target": row["target"], "caused": row["caused"],
                                                "eligible": row["eligible"], "clean": row["clean_model_caused"],
                                                "learnt": bool(row["scores"])})
            for e, sc in row["scores"].items():
                for s, v in sc.items():
                    pooled.setdefault(e, {}).setdefault(s, {}).setdefault(mark, []).extend(v)
    rows = {}
    for e, by_score in pooled.items():
        rows[e] = {}
        for s, by_mark in by_score.items():
            per_mark = {m: (float(np.mean(v)), bootstrap_interval(np.array(v)), len(v)) for m, v in by_mark.items()}
            r = {"per_mark": per_mark}
            for part, tuned in (("tuned", True), ("held_out", False)):
                chosen = [m for m in by_mark if MARKS[m].tuned == tuned]
                if chosen:
                    r[part] = (float(np.mean([per_mark[m][0] for m in chosen])),
                               _stratified_interval([np.array(by_mark[m]) for m in chosen]))
            rows[e][s] = r
    return {"rows": rows, "learnt": learnt}


def _stratified_interval(groups: list[np.ndarray], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of group means, images resampled within each group."""
    rng = np.random.default_rng(seed)
    means = np.mean([g[rng.integers(0, len(g), (n_boot, len(g)))].mean(1) for g in groups], 0)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def road_rows(out: dict) -> dict:
    """ROAD minus random per entry over the clean models' held-out images, with 95% bootstrap intervals."""
    from road import bootstrap_interval
    rows = {}
    for e in out["road"][0]["road"]:
        g = np.concatenate([r["road"][e] for r in out["road"]])
        rows[e] = (float(g.mean()), bootstrap_interval(g), len(g))
    return rows


def choose(out: dict, n: int = 2) -> list[str]:
    """The rule for the defaults: rank the methods by each yardstick (rank accuracy over the tuned
    marks, ROAD - random), score each by the worse of its two ranks, keep the n best (ties: the
    better rank accuracy). Controls and clean-model rows take no part."""
    s, road = summarise(out), road_rows(out)
    methods = [e for e in s["rows"] if e in road and not e.endswith(CLEAN) and e not in CONTROLS]
    by_gt = sorted(methods, key=lambda e: -s["rows"][e]["rank"]["tuned"][0])
    by_road = sorted(methods, key=lambda e: -road[e][0])
    worse = {e: max(by_gt.index(e), by_road.index(e)) for e in methods}
    return sorted(methods, key=lambda e: (worse[e], by_gt.index(e)))[:n]


def report(out: dict) -> str:
    """Which marks were learnt; every entry by the default rule with both yardsticks; then the rank
    accuracy per mark, the other ground-truth scores and the controls."""
    from marks import MARKS
    s = summarise(out)
    lines = ["| mark | what | learnt on folds | images the mark decided (of eligible) | clean model fooled |",
             "|---|---|---|---|---|"]
    for mark, rs in s["learnt"].items():
        ok = [r for r in rs if r["learnt"]]
        lines.append(f"| {mark}{'' if MARKS[mark].tuned else ' (held out)'} | {MARKS[mark].what} | "
                     f"{len(ok)} of {len(rs)} | {sum(r['caused'] for r in rs)} of {sum(r['eligible'] for r in rs)} | "
                     f"{sum(r['clean'] for r in rs)} |")
    marks = list(s["learnt"])
    rows = s["rows"]
    fmt = lambda t: "–" if t is None else f"{t[0]:.2f}"
    ci = lambda t, spec=".2f": "" if t is None else f" [{t[1][0]:{spec}}, {t[1][1]:{spec}}]"
    if out.get("road"):
        road = road_rows(out)
        order = choose(out, n=len(rows))
        lines += ["", f"Both yardsticks (ROAD on {next(iter(road.values()))[2]} held-out images of the clean models; "
                  "rank accuracy on the images each mark decided). Ordered by the rule for the defaults: the worse "
                  "of a method's two ranks.", "",
                  "| method | rank accuracy, tuned marks [95% CI] | held-out marks | ROAD − random [95% CI] |",
                  "|---|---|---|---|"]
        for e in order + [c for c in CONTROLS if c in rows]:
            r = road.get(e)
            lines.append(f"| {e} | {fmt(rows[e]['rank'].get('tuned'))}{ci(rows[e]['rank'].get('tuned'))} | "
                         f"{fmt(rows[e]['rank'].get('held_out'))} | "
                         + ("–" if r is None else f"{r[0]:+.3f} [{r[1][0]:+.3f}, {r[1][1]:+.3f}]") + " |")
    ranked = sorted(rows, key=lambda e: -rows[e]["rank"].get("tuned", (-1,))[0])
    lines += ["", "Top-K rank accuracy per mark (K = the mark's area); mean over the tuned marks and over the "
              "held-out ones, with 95% bootstrap intervals; mass accuracy and pointing game: means over tuned marks.",
              "", "| method | " + " | ".join(marks) + " | tuned mean [95% CI] | held-out mean | mass | pointing |",
              "|---|" + "---|" * (len(marks) + 4)]
    for e in ranked:
        r = rows[e]
        pm = r["rank"]["per_mark"]
        lines.append(f"| {e} | " + " | ".join(fmt(pm.get(m)) for m in marks)
                     + f" | {fmt(r['rank'].get('tuned'))}{ci(r['rank'].get('tuned'))}"
                     + f" | {fmt(r['rank'].get('held_out'))} | {fmt(r['mass'].get('tuned'))} "
                     f"| {fmt(r['pointing'].get('tuned'))} |")
    return "\n".join(lines)
