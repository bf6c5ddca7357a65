"""The real-data protocol: repeated stratified k-fold cross-validation over the 718 real PathMNIST
test-split images in ../shared/data, our recipe and the first seed's side by side on the same folds.

    python bench/bench.py real                         # 5 folds x 3 seeds, ours (defaults) vs the seed's
    python bench/bench.py real --train batch_size=64   # ours with other training.Recipe values
    python bench/bench.py real --variants "old=rotate=10 flips=rotate=0 flips+hed=rotate=0,stain_jitter=0.3"
    python bench/bench.py real --train select=best --patience 40   # also scores each run's last epoch

Each held-out fold is read once, by the model each recipe keeps; validation is a part carved
(stratified, 20%) from the other folds. Both recipes train LightCNN. The seed's recipe trains
--epochs (40) epochs, keeps its best validation epoch and stops after --patience (10) epochs
without improvement, as the seed did; ours trains the budget train.py gives by default
(Recipe.epochs of at least Recipe.epoch_steps steps each; `--train epochs=40 epoch_steps=1` is
the protocol before that budget) and follows its Recipe.select (by default: the last epoch).
Printed: mean +- std accuracy and AUC, per-class recall, accuracy
under the HED stain change calibrated as another centre (stain.CENTRE_LEVEL) and the mean over every
perturbation and level, the paired difference to the seed's recipe with a 95% t-interval over the
fold x seed pairs (folds share training images, so the interval is optimistic), a colour-only
classifier on the same folds, and the time taken. These are cross-validation numbers on 718 images
from one centre, not the PathMNIST benchmark.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import baseline
from data import BINARY, Data, Split, load_data, save_npz
from metrics import compute_metrics, youden_threshold
from model import build_model, predict
from runtime import amp_dtype, autocast, set_seed
from robustness import shift_table, summarise
from stain import CENTRE_LEVEL, LAB_LEVEL, perturb
from stainnorm import fit as stain_fit
from stainnorm import normalise as normalise_stain
from training import (Recipe, epoch_recipe, make_ema, make_optimizer, make_scheduler, passes_per_epoch, seed_epoch,
                      step_schedule, steps_per_epoch, train_one_epoch, validate)

T_975 = {14: 2.145, 9: 2.262, 4: 2.776, 2: 4.303}  # Student t quantiles for the intervals used here


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint folds covering every index, each holding about 1/k of every class."""
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(k)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = rng.integers(k)  # rotate which folds get the remainder, so fold sizes stay even
        for j, i in enumerate(idx):
            folds[(start + j) % k].append(i)
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def carve_val(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) of `idx`, val a stratified `fraction` of it."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels[idx]):
        mine = rng.permutation(idx[labels[idx] == c])
        val.extend(mine[: max(1, round(fraction * len(mine)))])
    val = np.sort(np.array(val, dtype=np.int64))
    return np.setdiff1d(idx, val), val


def fit_ours(data: Data, recipe: Recipe, seed: int, patience: int) -> tuple[torch.nn.Module, dict | None]:
    """training.py's loop as train.py runs it, on CPU, for the recipe's epochs (train.py's default
    budget unless a variant sets it): the recipe's --select keeps the last epoch, or the best on
    validation with early stopping. Returns the kept model and,
    for select=best, the state of the last epoch trained (to measure what the selection buys)."""
    set_seed(seed)
    device = torch.device("cpu")
    net = build_model("lightcnn", num_classes=data.num_classes).to(memory_format=torch.channels_last)
    optimizer, dtype = make_optimizer(net, recipe), amp_dtype(recipe.amp, device)
    scheduler = make_scheduler(optimizer, recipe, recipe.epochs)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train, val = data.splits["train"], data.splits["val"]
    ema = make_ema(net, recipe, steps_per_epoch(len(train), recipe))
    kept = net if ema is None else ema.module  # the weights that are validated and kept
    best, best_state, stale = -1.0, None, 0
    for epoch in range(1, recipe.epochs + 1):
        order, g = seed_epoch(seed, epoch, len(train), passes=passes_per_epoch(len(train), recipe))
        train_one_epoch(net, train, order, optimizer, scaler, autocast(device, dtype), g, epoch_recipe(recipe, epoch), "cv",
                        progress=False, ema=ema)
        va = validate(kept, val, data, recipe, device)
        # The plateau rule watches the trained weights: the average's loss lags behind them.
        step_schedule(scheduler, va["loss"] if kept is net else validate(net, val, data, recipe, device)["loss"])
        if recipe.select == "best":
            score = va["auc"] if data.task == BINARY else va["acc"]  # train.py's --monitor auto
            best, best_state, stale = ((score, copy.deepcopy(kept.state_dict()), 0) if score > best
                                       else (best, best_state, stale + 1))
            if stale >= patience:
                break
    if recipe.select == "last":
        return kept.eval(), None
    last_state = copy.deepcopy(kept.state_dict())
    kept.load_state_dict(best_state)
    return kept.eval(), last_state


def fit_seed(data: Data, root: Path, seed: int, epochs: int, patience: int) -> torch.nn.Module:
    """The first seed's recipe (bench/baseline.py: PIL flips and 10-degree rotations with black
    corners, batch 64, Adam 1e-3) under the same epoch budget and selection rule."""
    save_npz(root / "pathmnist.npz", data)
    torch.manual_seed(seed)
    net = build_model("lightcnn")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    train, val = baseline.loader(str(root), "train", train=True), data.splits["val"]
    best, best_state, stale = -1.0, None, 0
    for _ in range(epochs):
        baseline.train_epoch(net, train, optimizer)
        acc = float((predict(net, val.images, 128, "cpu", "multi-class").argmax(1) == val.labels.numpy()).mean())
        best, best_state, stale = (acc, copy.deepcopy(net.state_dict()), 0) if acc > best else (best, best_state, stale + 1)
        if stale >= patience:
            break
    net.load_state_dict(best_state)
    return net.eval()


def colour_features(images: torch.Tensor, bins: int = 16) -> np.ndarray:
    """Per image: mean RGB and a `bins`-bin histogram of each channel (colour only, no structure)."""
    x = images.flatten(2).long()  # (N, 3, P) uint8 values
    hist = F.one_hot(x * bins // 256, bins).float().mean(2)  # (N, 3, bins), each row sums to 1
    return torch.cat([x.float().mean(2) / 255, hist.flatten(1)], 1).numpy()


def colour_baseline(train: Split, test: Split) -> np.ndarray:
    """Class probabilities of a logistic regression on colour_features (the colour shortcut)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    clf.fit(colour_features(train.images), train.labels.numpy())
    return clf.predict_proba(colour_features(test.images))


def scores_of(net, test: Split, amp: str, task: str = "multi-class", k: int = 9, val: Split | None = None,
              stain: dict | None = None) -> dict:
    """Accuracy (plain and with 8-fold TTA), AUC, per-class recall (and for a binary task the
    sensitivity and specificity); accuracy under the calibrated HED change and the mean over every
    perturbation and level (the ImageNet-C-style summary). `stain`: a --stain-norm model's
    reference, applied to every image after its change, as evaluate.py does."""
    probs = predict(net, test.images, 256, "cpu", task, amp, stain=stain)
    threshold = None  # binary: the operating point chosen on the validation part, as report.py does
    if task == BINARY and val is not None:
        threshold = youden_threshold(val.labels.numpy(), predict(net, val.images, 256, "cpu", task, amp,
                                                                 stain=stain)[:, -1])
    m = compute_metrics(test.labels.numpy(), probs, task, list(map(str, range(k))), threshold=threshold)
    shifted_table = shift_table(lambda x: float((predict(net, x, 256, "cpu", task, amp, stain=stain).argmax(1)
                                                 == test.labels.numpy()).mean()), test.images)
    shifted = summarise(shifted_table)
    tta = predict(net, test.images, 256, "cpu", task, amp, tta=True, stain=stain)
    return {"acc": m["acc"], "auc": m["auc"], "recall": [m["per_class"][str(c)]["recall"] for c in range(k)],
            **{key: m[key] for key in ("sensitivity", "specificity") if key in m},
            **({f"{key}_val_threshold": m["operating_point"][key] for key in ("sensitivity", "specificity")}
               if "operating_point" in m else {}),
            "acc_tta": float((tta.argmax(1) == test.labels.numpy()).mean()),
            "hed_centre": shifted_table["hed"][CENTRE_LEVEL], "shift_mean": shifted["summary"],
            "hed_uniform": shifted_table["hed_uniform"], "hed_offset": shifted_table["hed_offset"],
            "worst_mean": shifted["worst_mean"], "families": shifted["families"]}


def last_epoch_scores(net, test: Split, amp: str, task: str, stain: dict | None = None) -> dict:
    """Accuracy, plain and under the calibrated HED change, of a model (the last epoch's)."""
    acc = lambda images: float((predict(net, images, 256, "cpu", task, amp, stain=stain).argmax(1)
                                == test.labels.numpy()).mean())
    return {"acc_last": acc(test.images), "hed_centre_last": acc(perturb(test.images, "hed", CENTRE_LEVEL))}


def run(real: Path, variants: dict[str, Recipe], k: int = 5, seeds: int | list[int] = 3, epochs: int = 40,
        patience: int = 10, seed_recipe: bool = True, task: str = "classes") -> dict:
    """Every variant (and the seed's recipe) on every (seed, fold); returns per-run results. The
    folds are stratified by the 9 classes whatever the task, so --task tumor runs on the same folds.
    `seeds`: how many (0, 1, ...), or which."""
    classes = load_data("pathmnist", 28, real, ("test",))
    data = load_data("pathmnist", 28, real, ("test",), task=task)
    images, labels = data.splits["test"].images, data.splits["test"].labels.numpy()
    strata = classes.splits["test"].labels.numpy()
    results = {name: [] for name in (["seed"] if seed_recipe else []) + list(variants) + ["colour"]}
    seconds = {name: 0.0 for name in results}
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(seeds) if isinstance(seeds, int) else seeds:
            for f, test_idx in enumerate(stratified_folds(strata, k, seed=s)):
                train_idx, val_idx = carve_val(np.setdiff1d(np.arange(len(labels)), test_idx), strata, 0.2, seed=100 + s)
                part = lambda i: Split(images[i], torch.from_numpy(labels[i]))
                fold = replace(data, splits={"train": part(train_idx), "val": part(val_idx), "test": part(test_idx)})
                for name in results:
                    t0 = time.perf_counter()
                    if name == "colour":
                        probs = colour_baseline(fold.splits["train"], fold.splits["test"])
                        acc = float((probs.argmax(1) == labels[test_idx]).mean())
                        results[name].append({"acc": acc, "auc": compute_metrics(labels[test_idx], probs, data.task,
                                                                                 list(map(str, range(data.num_classes))))["auc"]})
                    else:
                        ours = fold if name == "seed" else with_stain_norm(fold, variants[name].stain_norm, s)
                        net, last = ((fit_seed(fold, Path(tmp), s, epochs, patience), None) if name == "seed" else
                                     fit_ours(ours, variants[name], s, patience))
                        amp = "off" if name == "seed" else variants[name].amp
                        results[name].append(scores_of(net, fold.splits["test"], amp, data.task, data.num_classes,
                                                       fold.splits["val"], ours.stain_norm))
                        if last is not None:  # the last epoch's weights instead of the selected ones
                            net.load_state_dict(last)
                            results[name][-1] |= last_epoch_scores(net, fold.splits["test"], amp, data.task,
                                                                   ours.stain_norm)
                    seconds[name] += time.perf_counter() - t0
                    r = results[name][-1]
                    print(f"seed {s} fold {f} {name:14s} acc {r['acc']:.3f} auc {r['auc']:.3f}" +
                          (f" sensitivity {r['sensitivity']:.3f} specificity {r['specificity']:.3f} (at the validation "
                           f"threshold {r['sensitivity_val_threshold']:.3f}, {r['specificity_val_threshold']:.3f})"
                           if "sensitivity" in r else "") +
                          (f" hed@centre {r['hed_centre']:.3f} shift-mean {r['shift_mean']:.3f} worst "
                           f"{min(r['families'], key=r['families'].get)} {r['worst_mean']:.3f}" if "hed_centre" in r
                           else "") +
                          (f" last epoch: acc {r['acc_last']:.3f} hed@centre {r['hed_centre_last']:.3f}" if "acc_last" in r
                           else ""), flush=True)
    return {"results": results, "seconds": seconds, "n": len(labels), "k": k,
            "seeds": seeds if isinstance(seeds, int) else len(seeds), "task": task}


def with_stain_norm(fold: Data, kind: str, seed: int) -> Data:
    """The fold with its training images normalised to their own stain (fitted as train.py
    --stain-norm fits it); validation and test stay as scanned and are normalised as scored."""
    if kind == "none":
        return fold
    reference = stain_fit(kind, fold.splits["train"].images, seed)
    train = replace(fold.splits["train"], images=normalise_stain(fold.splits["train"].images, reference))
    return replace(fold, splits={**fold.splits, "train": train}, stain_norm=reference)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b and the half-width of its 95% t-interval over the pairs."""
    d = np.array(a) - np.array(b)
    t = T_975.get(len(d) - 1, 2.0)
    return float(d.mean()), float(t * d.std(ddof=1) / math.sqrt(len(d)))


def report(out: dict) -> None:
    res, ref = out["results"], out["results"].get("seed")
    print(f"\n{out['k']}-fold x {out['seeds']} seeds on {out['n']} real PathMNIST test-split images "
          "(cross-validation on one centre, not the PathMNIST benchmark)\n")
    print("| recipe | acc | acc, 8-fold TTA | AUC | HED at another centre | all shifts (mean) | worst family "
          "| acc - seed's [95% CI] | minutes |")
    print("|---|---|---|---|---|---|---|---|---:|")
    for name, runs in res.items():
        cell = lambda key: (f"{np.mean([r[key] for r in runs]):.3f} ± {np.std([r[key] for r in runs], ddof=1):.3f}"
                            if key in runs[0] else "–")
        diff = "–"
        if ref is not None and name != "seed":
            m, h = paired([r["acc"] for r in runs], [r["acc"] for r in ref])
            diff = f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]"
        print(f"| {name} | {cell('acc')} | {cell('acc_tta')} | {cell('auc')} | {cell('hed_centre')} | {cell('shift_mean')} | "
              f"{worst_family(runs)} | {diff} | {out['seconds'][name] / 60:.1f} |")
    print_hed_levels(res)
    families = {name: family_means(runs) for name, runs in res.items() if "families" in runs[0]}
    if families:
        print("\nmean accuracy over severities 1-5 of each perturbation family (mean over runs):")
        print(f"  {'family':16s} " + " ".join(f"{name[:10]:>10s}" for name in families))
        for fam in next(iter(families.values())):
            print(f"  {fam:16s} " + " ".join(f"{m[fam]:10.3f}" for m in families.values()))
    print(f"\nper-class recall (mean over runs), classes 0-{len(next(iter(res.values()))[0].get('recall', [0] * 9)) - 1}:")
    for name, runs in res.items():
        if "recall" in runs[0]:
            print(f"  {name:14s} " + " ".join(f"{v:.2f}" for v in np.mean([r["recall"] for r in runs], 0)))
    for name, runs in res.items():
        if "acc_last" in runs[0]:  # --select best: what keeping the last epoch would have given
            print(f"  {name:14s} the last epoch instead of the selected one: acc "
                  f"{np.mean([r['acc_last'] for r in runs]):.3f}, HED at another centre "
                  f"{np.mean([r['hed_centre_last'] for r in runs]):.3f}")
    for name, runs in res.items():
        if "sensitivity" in runs[0]:
            stat = lambda key: f"{np.mean([r[key] for r in runs]):.3f} ± {np.std([r[key] for r in runs], ddof=1):.3f}"
            print(f"  {name:14s} sensitivity {stat('sensitivity')}, specificity {stat('specificity')} "
                  "(cancer = adenocarcinoma epithelium, at MedMNIST's 0.5 threshold); at the threshold chosen on "
                  f"validation: {stat('sensitivity_val_threshold')}, {stat('specificity_val_threshold')}")


def print_hed_levels(res: dict) -> None:
    """Per recipe, accuracy under uniform and exact HED offsets at each level (level 4: between
    laboratories, stain.LAB_LEVEL) minus its own clean accuracy, paired over the runs; and each
    recipe's clean accuracy minus the first recipe's."""
    ours = {name: runs for name, runs in res.items() if "hed_uniform" in runs[0]}
    if not ours:
        return
    print(f"\nHED offsets, accuracy - clean accuracy [95% CI] per level (level {LAB_LEVEL}: between laboratories):")
    for name, runs in ours.items():
        for fam in ("hed_uniform", "hed_offset"):
            cells = []
            for level in range(1, 6):
                m, h = paired([r[fam][level] for r in runs], [r["acc"] for r in runs])
                cells.append(f"{np.mean([r[fam][level] for r in runs]):.3f} ({m:+.3f} [{m - h:+.3f}, {m + h:+.3f}])")
            print(f"  {name:10s} {fam:12s} " + " | ".join(cells))
    first, *others = ours
    for name in others:
        m, h = paired([r["acc"] for r in ours[name]], [r["acc"] for r in ours[first]])
        print(f"  clean accuracy, {name} - {first}: {m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]")


def family_means(runs: list[dict]) -> dict[str, float]:
    """Each perturbation family's accuracy (mean over severities 1-5), averaged over the runs."""
    return {fam: float(np.mean([r["families"][fam] for r in runs])) for fam in runs[0]["families"]}


def worst_family(runs: list[dict]) -> str:
    """The family with the lowest mean accuracy over the runs, as 'name 0.xxx' ('–' for none)."""
    if "families" not in runs[0]:
        return "–"
    means = family_means(runs)
    worst = min(means, key=means.get)
    return f"{worst} {means[worst]:.3f}"


def parse_variants(text: str, base: Recipe) -> dict[str, Recipe]:
    """'name=key=value,key=value name2=...' -> recipes (`ours` alone when empty)."""
    from recipes import parse_sets
    if not text.strip():
        return {"ours": base}
    out = {}
    for item in text.split():
        name, _, sets = item.partition("=")
        out[name] = replace(base, **parse_sets([s for s in sets.split(",") if s], Recipe))
    return out

