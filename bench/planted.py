"""The planted-shortcut benchmark: marks planted on one class's training images of real tissue, a
model trained on them with train.py's defaults, and every explanation method scored against where
the mark really is, on the images whose prediction the mark caused.

    python bench/bench.py planted --models runs/planted-models   # 5 folds, 2 workers (80 min, 2 cores)
    python bench/bench.py planted --quick          # 1 fold, one group of marks, 2 epochs: a smoke run
    python bench/bench.py planted --models runs/planted-models --entries "lrp" --figure marks.png

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
within each mark). ROAD - random of every entry on the clean models' held-out images, and the time
per map. choose() is the rule for explain.py's default over both yardsticks. These are
cross-validation numbers on 718 images from one centre.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from marks import plant as plant_marks

MIN_CAUSED = 5   # a mark counts as learnt on a fold when it decided at least this many held-out predictions
MIN_FOLDS = 3    # and enters the means when it was learnt on at least this many folds
N_MAX = 32       # images explained per mark and fold (the first of those it decided)
N_CONTROL = 16   # of them, explained by the clean model too
MAX_COST = 2.0   # the defaults' rule: at most this many times the time of a plain IG map (50 steps) a map
IG = "IG, black reference"
GROUPS = (("small blue dot", "thin black stroke", "wide green blob", "tinted square"),
          ("striped patch", "blurred square", "red ring", "wide black stroke"))
CONTROLS = ("random map", "Sobel edges (ignores the model)")
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
    out = images[idx].clone()
    for mark, c in marks.items():
        mine = np.flatnonzero(labels[idx] == c)
        if len(mine):
            out[mine] = plant_marks(out[mine], mark, mark_seeds(idx[mine], mark, salt))[0]
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
    from road import combined as road_combined
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
    gain = lambda c: (road_combined(c) - road_combined(base)).tolist()
    out = {xai.EDGES: gain(road_curves(net, x, pred, edge_control(None, None, x, pred, None, None).maps, seeds))}
    ms = {}
    for e in entries:
        t0 = time.perf_counter()
        maps = xai.explain(e, net, x_uint8, pred, seeds, refs)
        ms[e] = 1000 * (time.perf_counter() - t0) / len(x)
        out[e] = gain(road_curves(net, x, pred, maps, seeds))
    return {"fold": f, "road": out, "ms_per_map": ms, "held_out_acc": float((pred.numpy() == labels[test_idx]).mean())}


def _marked_held_out(net, images, labels, test_idx, mark: str, c: int, pred=None):
    """The held-out images neither of nor predicted as class c, with the mark drawn on each: their
    indices, the marked images, the masks, and where the mark made the model predict c."""
    from model import predict
    pred = predict(net, images[test_idx], 256, "cpu", "multi-class").argmax(1) if pred is None else pred
    idx = test_idx[(labels[test_idx] != c) & (pred != c)]
    x, masks = plant_marks(images[idx], mark, mark_seeds(idx, mark, 3))
    return idx, x, masks, predict(net, x, 256, "cpu", "multi-class").argmax(1) == c


def score_job(real: str, k: int, f: int, group: int, entries: list[str], n_max: int, folder: str) -> dict:
    """The marks of one group on fold f: which the planted model learnt, and every entry's scores on
    the images whose prediction a mark caused (with the clean model's maps as a control)."""
    torch.set_num_threads(1)
    import xai
    from data import normalize
    from groundtruth import localisation_scores
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
        idx, x, masks, caused = _marked_held_out(nets["planted"], images, labels, test_idx, mark, c, pred)
        clean_caused = predict(nets["clean"], x, 256, "cpu", data.task).argmax(1) == c
        row = {"target": c, "eligible": len(idx), "caused": int(caused.sum()),
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
    the mean over the tuned marks and over the held-out marks (marks.Mark.tuned) that were learnt
    on at least MIN_FOLDS folds (the others are reported, not averaged). NaN scores (a map with no
    positive relevance has no mass accuracy) are left out."""
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
                    v = np.asarray(v, np.float64)
                    pooled.setdefault(e, {}).setdefault(s, {}).setdefault(mark, []).extend(v[np.isfinite(v)])
    counted = [m for m, rs in learnt.items() if sum(r["learnt"] for r in rs) >= MIN_FOLDS]
    rows = {}
    for e, by_score in pooled.items():
        rows[e] = {}
        for s, by_mark in by_score.items():
            per_mark = {m: (float(np.mean(v)), bootstrap_interval(np.array(v)), len(v)) for m, v in by_mark.items()}
            r = {"per_mark": per_mark}
            for part, tuned in (("tuned", True), ("held_out", False)):
                chosen = [m for m in by_mark if MARKS[m].tuned == tuned and m in counted]
                if chosen:
                    r[part] = (float(np.mean([per_mark[m][0] for m in chosen])),
                               _stratified_interval([np.array(by_mark[m]) for m in chosen]))
            rows[e][s] = r
    return {"rows": rows, "learnt": learnt, "counted": counted}


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


def ms_per_map(out: dict) -> dict[str, float]:
    """Each entry's median milliseconds per map over the folds (one thread, on the clean models)."""
    found = {}
    for r in out["road"]:
        for e, ms in r.get("ms_per_map", {}).items():
            found.setdefault(e, []).append(ms)
    return {e: float(np.median(v)) for e, v in found.items()}


def choose(out: dict, n: int = 1, max_cost: float = MAX_COST) -> list[str]:
    """The rule for the defaults: rank the methods by each yardstick (rank accuracy over the counted
    tuned marks; ROAD - random), score each by the worse of its two ranks, and keep the n best (ties:
    the better rank accuracy) among those whose maps take at most max_cost times a plain IG map's
    time in the same run (the first run explains hundreds of images and --trust recomputes each map
    many times). Controls and clean-model rows take no part; without times, every method counts."""
    s, road, ms = summarise(out), road_rows(out), ms_per_map(out)
    methods = [e for e in s["rows"] if e in road and not e.endswith(CLEAN) and e not in CONTROLS
               and "tuned" in s["rows"][e]["rank"]]  # no counted mark: nothing to choose by
    by_gt = sorted(methods, key=lambda e: -s["rows"][e]["rank"]["tuned"][0])
    by_road = sorted(methods, key=lambda e: -road[e][0])
    worse = {e: max(by_gt.index(e), by_road.index(e)) for e in methods}
    fast = [e for e in methods if IG not in ms or ms.get(e, 0.0) <= max_cost * ms[IG]]
    return sorted(fast, key=lambda e: (worse[e], by_gt.index(e)))[:n]


def report(out: dict) -> str:
    """Which marks were learnt; every entry by the default rule with both yardsticks and the
    controls; then the rank accuracy per mark."""
    from marks import MARKS
    s = summarise(out)
    lines = ["| mark | what | learnt on folds | held-out predictions it decided (of eligible) | "
             "clean model fooled |", "|---|---|---|---|---|"]
    for mark, rs in s["learnt"].items():
        ok = [r for r in rs if r["learnt"]]
        lines.append(f"| {mark}{'' if MARKS[mark].tuned else ' (held out)'} | {MARKS[mark].what} | "
                     f"{len(ok)} of {len(rs)}{'' if mark in s['counted'] else ' (not counted)'} | "
                     f"{sum(r['caused'] for r in rs)} of {sum(r['eligible'] for r in rs)} | "
                     f"{sum(r['clean'] for r in rs)} |")
    marks = list(s["learnt"])
    rows = s["rows"]
    fmt = lambda t: "–" if t is None else f"{t[0]:.2f}"
    ci = lambda t: "" if t is None else f" [{t[1][0]:.2f}, {t[1][1]:.2f}]"
    methods = [e for e in rows if not e.endswith(CLEAN) and e not in CONTROLS]
    road = road_rows(out) if out.get("road") else {}
    ms = ms_per_map(out) if road else {}
    order = (choose(out, n=len(methods), max_cost=float("inf")) if road else
             sorted(methods, key=lambda e: -rows[e]["rank"].get("tuned", (0,))[0])) or methods
    lines += ["", "Rank accuracy: mean over the counted tuned marks of each mark's mean over the images it decided "
              "(95% bootstrap interval); the clean model's: the same method on a model that never saw the mark. "
              "ROAD on the clean models' held-out images. Ordered by the worse of each method's two ranks "
              f"(choose(); the default: the first within {MAX_COST:g}x a plain IG map's time).", "",
              "| method | rank accuracy, tuned marks | held-out marks | clean model (control) | ROAD − random | "
              "mass | pointing | ms/map |", "|---|---|---|---|---|---|---|---:|"]
    for e in order + [c for c in CONTROLS if c in rows]:
        r, clean = rows[e], rows.get(e + CLEAN, {}).get("rank", {}).get("tuned")
        rd = road.get(e)
        lines.append(f"| {e} | {fmt(r['rank'].get('tuned'))}{ci(r['rank'].get('tuned'))} | "
                     f"{fmt(r['rank'].get('held_out'))} | {fmt(clean)} | "
                     + ("–" if rd is None else f"{rd[0]:+.3f} [{rd[1][0]:+.3f}, {rd[1][1]:+.3f}]")
                     + f" | {fmt(r['mass'].get('tuned'))} | {fmt(r['pointing'].get('tuned'))} | "
                     + (f"{ms[e]:.1f} |" if e in ms else "– |"))
    lines += ["", "Rank accuracy per mark (pooled over the folds that learnt it):", "",
              "| method | " + " | ".join(marks) + " |", "|---|" + "---|" * len(marks)]
    for e in order + [c for c in CONTROLS if c in rows]:
        pm = rows[e]["rank"]["per_mark"]
        lines.append(f"| {e} | " + " | ".join(fmt(pm.get(m)) for m in marks) + " |")
    return "\n".join(lines)


def figure(real: Path, models: str, path: Path, entries: list[str], k: int = 5) -> Path:
    """One row per mark, from the first fold that learnt it: the marked image with the mark's outline,
    then each entry's map of the planted class (signed: red for, blue against) with the same outline."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import xai
    from attribution import pixel_scores
    from data import PATHMNIST_CLASSES, normalize
    from figures import save_figure
    from marks import MARKS
    rows = []
    for group, names in enumerate(GROUPS):
        for j, mark in enumerate(names):
            for f in range(k):
                weights = Path(models) / f"fold{f}-group{group}.pt"
                if not weights.exists():
                    continue
                data, images, labels, train_idx, val_idx, test_idx, Split = _fold_data(real, k, f)
                net, c = _load(str(weights)), target_class(f, group, j)
                idx, x, masks, caused = _marked_held_out(net, images, labels, test_idx, mark, c)
                caused = np.flatnonzero(caused)
                if len(caused) >= MIN_CAUSED:
                    i = caused[:1]
                    refs = normalize(images[train_idx]).contiguous(memory_format=torch.channels_last)
                    t = torch.tensor([c])
                    maps = [pixel_scores(xai.explain(e, net, x[i], t, [0], refs), "signed")[0].numpy() for e in entries]
                    rows.append((mark, f, PATHMNIST_CLASSES[c], PATHMNIST_CLASSES[labels[idx[i[0]]]], x[i[0]],
                                 masks[i[0]], maps))
                    break
    fig, axes = plt.subplots(len(rows), 1 + len(entries), figsize=(1.7 * (1 + len(entries)), 1.9 * len(rows) + 0.4),
                             squeeze=False, layout="constrained")  # keeps the title clear of the first row
    for r, (mark, f, planted_as, truth, img, mask, maps) in enumerate(rows):
        axes[r, 0].imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[r, 0].contour(mask.numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
        axes[r, 0].set_title(f"{mark}{'' if MARKS[mark].tuned else ' (held out)'}, fold {f}\n"
                             + textwrap.fill(f"{truth} → {planted_as}", 30), fontsize=6)
        for e, m, ax in zip(entries, maps, axes[r, 1:]):
            lim = max(float(np.percentile(np.abs(m), 99.5)), 1e-12)
            ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.contour(mask.numpy(), levels=[0.5], colors="black", linewidths=0.6)
            top = np.argsort(-m.ravel(), kind="stable")[:int(mask.sum())]
            ax.set_title(f"{e}\nrank acc {mask.numpy().ravel()[top].mean():.2f}", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path, "Planted marks (outlined) that decided a held-out prediction, and the maps "
                       "of the class they decided (real PathMNIST tissue, LightCNN)")
