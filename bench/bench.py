"""Benchmarks: the first seed's pipeline (bench/baseline.py) against ours, same data, same machine.

    python bench/bench.py                    # full run (under 10 min on 2 cores): the ratio table
    python bench/bench.py --quick            # smoke run (~1 min): small sizes, one run
    python bench/bench.py --only ig,evaluation  # some sections (without training, ours just trains)
    python bench/bench.py --json table.json  # also write the table as JSON
    python bench/bench.py --train amp=off --explain ig_steps=32   # ours with other settings
    python bench/bench.py accuracy           # both training recipes, 3 seeds: test accuracy
    python bench/bench.py real               # real-image cross-validation of the training recipes (bench/cv.py)
    python bench/bench.py xai                # the explanation leaderboard on real folds (bench/xai.py)
    python bench/bench.py planted            # explanations against planted marks on real folds (bench/planted.py)
    python bench/bench.py trust              # explain.py --trust on the first run's models, adaptive vs fixed (bench/firstrun.py)
    python bench/bench.py audit --models runs/planted-models   # the shortcut audit on planted marks (bench/shortcuts.py)

The data is our synthetic set written as pathmnist.npz (MedMNIST layout, no masks) in a temp folder;
the seed reads it through medmnist.PathMNIST, ours through data.load_data. Other processes share
the machine, so the CPU-bound sections interleave the two sides finely: each run alternates a chunk
of baseline work and the same chunk of ours (ABBA order) and sums each side's time. Storage is
disk-bound (one side's fsyncs would flush the other's writes), so there the sides take turns whole.
A row shows medians over runs and the median of per-run ratios, judged as printed (2 decimals).
Peak RSS comes from fresh processes (recipes.py), one per side. Both sides use the same LightCNN
weights, each in its own layout (the seed's contiguous, ours channels_last).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
import baseline  # noqa: E402
from attribution import AttributionSettings, as_stored, integrated_gradients, make_baseline  # noqa: E402
from data import load_data, normalize, save_npz  # noqa: E402
from db import ExplanationDB  # noqa: E402
from model import build_model, inference_copy, predict  # noqa: E402
from recipes import Ours, Seed, parse_sets  # noqa: E402

TARGETS = {"training images/s": (">=", 3), "training peak RSS MiB (fresh process)": ("<=", 1),
           "IG explanations/s (zero baseline both)": (">=", 3),
           "IG mean relative delta (zero baseline both)": ("<=", 1), "storage rows/s": (">=", 50),
           "storage bytes per IG map": ("<=", 0.4), "evaluation images/s": (">=", 5)}


SECTIONS = ("training", "ig", "storage", "evaluation")


def machine() -> str:
    cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name"))
    return (f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}")


def make_data(root: Path, n_train: int, n_test: int) -> None:
    """Synthetic train/test splits as root/pathmnist.npz, laid out like the real file (no masks)."""
    data = load_data("synthetic", 28, splits=("train", "test"), synthetic_sizes=(n_train, 1, n_test))
    for split in data.splits.values():
        split.masks = None
    save_npz(root / "pathmnist.npz", data)


def race(*sides) -> list[float]:
    """Advance generators in turn, one chunk each, in ABBA order; the seconds each one took."""
    seconds, live, turn = [0.0] * len(sides), list(range(len(sides))), 0
    while live:
        for i in live[:] if turn % 2 == 0 else live[::-1]:
            t0 = time.perf_counter()
            if next(sides[i], StopIteration) is StopIteration:
                live.remove(i)
            seconds[i] += time.perf_counter() - t0
        turn += 1
    return seconds


def recipe(side: str, root: Path, sets: list[str], *args: str) -> dict:
    """Run bench/recipes.py in a fresh process (its own peak RSS); returns its JSON report."""
    extra = ["--set", *sets] if sets and side == "ours" else []
    out = subprocess.run([sys.executable, str(BENCH / "recipes.py"), side, str(root), *args, *extra],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# The work of each side, as generators that yield after every chunk

def seed_ig(model, images, chunk, out):
    for part in images.split(chunk):
        out.append(baseline.explain(model, normalize(part))[1:])
        yield


def our_ig(model, images, cfg, zero_baseline: bool, out):
    """Predictions, then IG in batches of cfg.batch_size on an inference copy, as explain.py runs
    it. zero_baseline: Captum with our steps, quadrature and batching but the seed's reference
    (zeros in normalised space, i.e. mid-grey); otherwise attribution.integrated_gradients as shipped
    (black by default)."""
    fast = inference_copy(model)
    for part in images.split(cfg.batch_size):
        target = torch.from_numpy(predict(model, part, 128, "cpu", "multi-class").argmax(1))
        x = normalize(part).contiguous(memory_format=torch.channels_last)
        if zero_baseline:
            attr, delta = IntegratedGradients(fast).attribute(
                x, baselines=torch.zeros_like(x), target=target, n_steps=cfg.ig_steps, method=cfg.ig_method,
                internal_batch_size=cfg.ig_internal_batch, return_convergence_delta=True)
        else:
            shipped = integrated_gradients(fast, None, x, target, cfg, None)
            attr, delta = shipped.maps, shipped.delta
        out.append((attr.detach(), target, delta.detach()))
        yield


@torch.no_grad()
def relative_delta(model, images, reference, out) -> float:
    """Mean |completeness error| / |f(x) - f(reference)| of the explained logits."""
    x, target, delta = normalize(images), torch.cat([o[-2] for o in out]), torch.cat([o[-1] for o in out])
    t = target.view(-1, 1)
    gap = model(x).gather(1, t) - model(reference(x)).gather(1, t)
    return float((delta.abs().view(-1) / gap.abs().view(-1)).mean())


def seed_store(path, maps, chunk, lengths):
    store = baseline.Store(str(path))
    for s in range(0, len(maps), chunk):
        lengths += [store.put(f"lightcnn/ig/test/{i}", maps[i]) for i in range(s, min(s + chunk, len(maps)))]
        yield
    store.close()


def our_store(path, maps, targets, cfg):
    """explain.py's writes: float32 maps as computed, cast and stored a batch per transaction."""
    with ExplanationDB(path) as db:  # registering model, setting and samples is part of the work
        model_id, setting_id = db.add_model("0" * 64, "lightcnn", {}), db.add_setting("ig", {"bench": 1})
        ids = db.add_samples(dataset="bench", size=28, split="test", indices=np.arange(len(maps)),
                             labels=targets)
        for s in range(0, len(maps), cfg.batch_size):
            part = slice(s, s + cfg.batch_size)
            n = len(ids[part])
            db.add_attributions(model_id=model_id, setting_id=setting_id, sample_ids=ids[part],
                                targets=targets[part], predicted=targets[part], confidence=np.full(n, 0.9),
                                maps=as_stored(maps[part], cfg.store_dtype), deltas=np.zeros(n),
                                dtype=cfg.store_dtype, replace=False)
            yield


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-journal")) if p.exists())


def seed_eval(model, loader, chunk):
    batches = iter(loader)
    for _ in range(0, len(loader.dataset), chunk):
        baseline.predict(model, islice(batches, chunk // baseline.BATCH))
        yield


def our_eval(model, images):
    """evaluate.py's inference over the whole split (one predict call, as evaluate.py makes), with
    its default batch size (128) and precision (--amp auto)."""
    predict(model, images, 128, "cpu", "multi-class", "auto")
    yield


# ------------------------------------------------------------------------------------------------

def speed(args) -> list[dict]:
    ecfg = AttributionSettings(**parse_sets(args.explain, AttributionSettings))
    print(f"machine: {machine()}", flush=True)
    rows: dict[str, tuple[list, list]] = {}

    def record(name, base, ours):
        rows.setdefault(name, ([], []))[0].append(base)
        rows[name][1].append(ours)

    with tempfile.TemporaryDirectory(dir=args.tmp or None) as tmp:
        root = Path(tmp)
        make_data(root, args.n_train, args.n_test)
        test = load_data("pathmnist", 28, root, ("test",), download_missing=False).splits["test"]
        model = bench_training(args, root, record, race_seed="training" in args.only)
        seed_model = as_seed_built_it(model)
        if {"ig", "storage"} & set(args.only):  # storage writes the IG maps
            maps, targets = bench_ig(args, ecfg, model, seed_model, test.images[:args.n_ig], record)
        if "storage" in args.only:
            bench_storage(args, ecfg, root, maps, targets, record)
        if "evaluation" in args.only:
            loader = baseline.loader(str(root), "test", train=False)
            race(seed_eval(seed_model, loader, 512), our_eval(model, test.images[:512]))  # warm-up
            for _ in range(args.runs):
                a, b = race(seed_eval(seed_model, loader, 512), our_eval(model, test.images))
                record("evaluation images/s", len(test) / a, len(test) / b)

    table = []
    for name, (base, ours) in rows.items():
        op, target = TARGETS.get(name, ("", None))
        ratio = statistics.median(o / b for b, o in zip(base, ours))
        shown = round(ratio, 2)  # judged as printed: deltas equal to float rounding are equal
        ok = None if target is None else shown >= target if op == ">=" else shown <= target
        table.append({"what": name, "baseline": statistics.median(base), "ours": statistics.median(ours),
                      "ratio": ratio, "target": f"{op} {target}x" if target else "info", "pass": ok})
    # The IG target is a speed-up at an equal or smaller delta: both rows must pass.
    ig = {r["what"]: r for r in table if "zero baseline both" in r["what"]}
    if ig:
        rate, delta = ig["IG explanations/s (zero baseline both)"], ig["IG mean relative delta (zero baseline both)"]
        rate["pass"], rate["target"] = rate["pass"] and delta["pass"], ">= 3x, delta <= 1x"
    return table


def bench_training(args, root: Path, record, race_seed: bool = True):
    """Runs are consecutive epochs of the same two models; returns ours, trained, for IG/eval.
    Without race_seed, ours alone trains the model the other sections use."""
    seed, ours = Seed(str(root)) if race_seed else None, Ours(str(root), sets=args.train)
    for epoch in range(1, args.runs + 1):
        if not race_seed:
            race(ours.epoch(epoch))
            continue
        a, b = race(seed.epoch(epoch, 1024), ours.epoch(epoch, 1024))
        record("training images/s", seed.n / a, ours.n / b)
        print(f"epoch {epoch}: seed {seed.n / a:.0f} images/s, ours {ours.n / b:.0f} images/s", flush=True)
    for _ in range(args.rss_runs if race_seed else 0):
        record("training peak RSS MiB (fresh process)", recipe("seed", root, [])["peak_rss_mib"],
               recipe("ours", root, args.train)["peak_rss_mib"])
    print(f"IG/eval model: LightCNN after {args.runs} epochs of ours, test accuracy {ours.test_accuracy():.3f}")
    return ours.model.eval()


def as_seed_built_it(model):
    """The same weights in the seed's own layout: build_model + load_state_dict, contiguous
    (train.py keeps its model channels_last; the seed never converted it)."""
    net = build_model("lightcnn")
    net.load_state_dict(model.state_dict())
    return net.eval()


def bench_ig(args, ecfg, model, seed_model, images, record):
    """Seed vs ours with the seed's zero reference (like for like), and explain.py as shipped."""
    zero, shipped = torch.zeros_like, lambda x: make_baseline(x, ecfg.baseline)
    for _ in range(args.runs):
        a, b, c = [], [], []
        t = race(seed_ig(seed_model, images, ecfg.batch_size, a), our_ig(model, images, ecfg, True, b),
                 our_ig(model, images, ecfg, False, c))
        delta = [relative_delta(model, images, ref, out) for ref, out in ((zero, a), (zero, b), (shipped, c))]
        record("IG explanations/s (zero baseline both)", len(images) / t[0], len(images) / t[1])
        record("IG mean relative delta (zero baseline both)", delta[0], delta[1])
        record("IG explanations/s (ours: explain.py as shipped)", len(images) / t[0], len(images) / t[2])
        record(f"IG mean relative delta (ours: as shipped, {ecfg.baseline} baseline)", delta[0], delta[2])
    return torch.cat([o[0] for o in c]), torch.cat([o[1] for o in c]).numpy()


def bench_storage(args, ecfg, root: Path, maps, targets, record) -> None:
    """explain.py's IG maps (float32 tensors), repeated to --n-store rows, written by each side
    into a new file: the seed takes them as numpy arrays, as its explain loop produced them.
    Disk-bound, so the sides take turns whole (the seed first in even runs), not interleaved:
    one side's fsyncs would otherwise also flush the other's writes."""
    repeat = -(-args.n_store // len(maps))
    maps, targets = maps.repeat(repeat, 1, 1, 1)[:args.n_store], np.resize(targets, args.n_store)
    for run in range(args.runs):
        lengths, paths = [], (root / f"seed{run}.db", root / f"ours{run}.db")
        sides = [lambda: seed_store(paths[0], maps.numpy(), args.n_store, lengths),
                 lambda: our_store(paths[1], maps, targets, ecfg)]
        a, b = [race(side())[0] for side in sides] if run % 2 == 0 else [race(side())[0] for side in sides[::-1]][::-1]
        with ExplanationDB(paths[1]) as db:
            blob = db.map_bytes()
        record("storage rows/s", args.n_store / a, args.n_store / b)
        record("storage bytes per IG map", float(np.mean(lengths)), blob)
        record("storage file bytes per row", *(file_bytes(p) / args.n_store for p in paths))
        for p in paths:  # gone before the next run, so neither side waits on this run's write-back
            for f in (p, Path(f"{p}-wal"), Path(f"{p}-shm"), Path(f"{p}-journal")):
                f.unlink(missing_ok=True)


def print_table(table: list[dict], header: str) -> None:
    print(f"\n{header}\n\n| what | baseline | ours | ratio | target | pass |\n|---|---:|---:|---:|---|---|")
    for r in table:
        fmt = (lambda v: f"{v:.2e}") if "delta" in r["what"] else (lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.1f}")
        verdict = {True: "pass", False: "**FAIL**", None: "-"}[r["pass"]]
        print(f"| {r['what']} | {fmt(r['baseline'])} | {fmt(r['ours'])} | {r['ratio']:.2f}x | {r['target']} "
              f"| {verdict} |")


def accuracy(args) -> dict:
    """Both recipes for --epochs epochs per seed, each in a fresh process; final test accuracy."""
    print(f"machine: {machine()}", flush=True)
    acc = {"seed": [], "ours": []}
    with tempfile.TemporaryDirectory(dir=args.tmp or None) as tmp:
        make_data(Path(tmp), args.n_train, args.n_test)
        for seed in range(args.seeds):
            for side in acc:
                r = recipe(side, Path(tmp), args.train, "--epochs", str(args.epochs), "--seed", str(seed), "--test")
                acc[side].append(r["test_acc"])
                print(f"seed {seed} {side:4s}: test acc {r['test_acc']:.4f}, images/s per epoch "
                      f"{[round(v) for v in r['images_per_s']]}", flush=True)
    for side, v in acc.items():
        print(f"{side:4s}: test accuracy {np.mean(v):.4f} +- {np.std(v, ddof=1):.4f} (mean +- std, {len(v)} seeds; "
              f"{args.epochs} epochs on {args.n_train} synthetic images, {args.n_test} test images)")
    return acc


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", nargs="?", default="speed", choices=("speed", "accuracy", "real", "xai", "planted", "trust",
                                                                   "audit"))
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, one run")
    p.add_argument("--only", default=",".join(SECTIONS),
                   type=lambda v: [k for k in v.split(",") if k], help="speed: the sections to run")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs per row (training: epochs)")
    p.add_argument("--rss-runs", type=int, default=1, help="fresh-process peak RSS measurements per side")
    p.add_argument("--n-train", type=int, default=0, help="training images (0: 4096 for speed, 10000 for accuracy)")
    p.add_argument("--n-test", type=int, default=2048, help="test images, for evaluation")
    p.add_argument("--n-ig", type=int, default=64, help="images explained per run and side")
    p.add_argument("--n-store", type=int, default=7180, help="maps written per run and side (the PathMNIST test split)")
    p.add_argument("--epochs", type=int, default=0, help="accuracy: training epochs per recipe (0: 4); real: the seed's "
                   "recipe's epochs (0: 40; ours trains its Recipe's budget, --train epochs=N to change it)")
    p.add_argument("--patience", type=int, default=10, help="real: early stopping after this many epochs without a "
                   "better validation score")
    p.add_argument("--seeds", type=int, default=3, help="accuracy, real, xai: training seeds")
    p.add_argument("--seed-ids", default="", help="real: only these comma-separated seeds (e.g. 1,2), to run the seeds "
                   "of one protocol in parallel processes; the folds of seed s are those of --seeds")
    p.add_argument("--train", nargs="*", default=[], help="training.Recipe overrides for ours (real, xai, planted: "
                   "of train.py's defaults), KEY=VALUE")
    p.add_argument("--variants", default="", help="real: our recipes to compare, 'NAME=KEY=VALUE,KEY=VALUE ...' "
                   "(default: ours as shipped, with --train)")
    p.add_argument("--folds", type=int, default=5, help="real, xai: cross-validation folds")
    p.add_argument("--real", default=str(BENCH.parents[1] / "shared" / "data" / "pathmnist28_real_test718.npz"),
                   help="real: the 718 real test-split images")
    p.add_argument("--no-seed-recipe", action="store_true", help="real: leave out the seed's recipe")
    p.add_argument("--task", default="classes", choices=("classes", "tumor"),
                   help="real: the 9 classes, or cancer vs non-cancer (ours and the colour baseline only)")
    p.add_argument("--explain", nargs="*", default=[], help="AttributionSettings overrides for ours (explain.py's IG settings), KEY=VALUE")
    p.add_argument("--tmp", default="", help="folder for the temporary data and databases (a real disk)")
    p.add_argument("--rand-n", type=int, default=16, help="xai: images per fold for the randomisation checks")
    p.add_argument("--figure", default="", help="xai: also draw the ROAD curves into this PNG; "
                   "planted: the marks and maps of --entries; audit: fold 0's first strategies")
    p.add_argument("--map-figure", default="", help="audit: draw fold 0's map of the data set (the report's "
                   "mosaic) for one planted mark into this PNG")
    p.add_argument("--entries", default="", help="xai, planted: only the entries whose name contains one of these "
                   "comma-separated words (case-insensitive), e.g. occlusion,Grad-CAM")
    p.add_argument("--workers", type=int, default=2, help="planted, audit: processes at once (one thread each)")
    p.add_argument("--models", default="", help="planted, audit: keep the trained models in this folder and reuse "
                   "those already there (audit: runs/planted-models by default; its maps are kept there too)")
    p.add_argument("--fold-ids", default="", help="planted, audit: only these comma-separated folds (e.g. 0,1)")
    p.add_argument("--share", type=float, default=None, help="audit: the share of each class's images the mark is "
                   "drawn on (default: bench/shortcuts.py's SHARE, 0.3)")
    p.add_argument("--draw", type=int, default=0, help="audit: which images carry it (0: the benchmark's own "
                   "selection; another draw checks the audit on images its choices were not made on)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args()
    if args.share is not None and not 0 < args.share <= 1:
        p.error(f"--share is a share of each class's images, in (0, 1]; got {args.share}")
    if set(args.only) - set(SECTIONS):
        p.error(f"--only takes a comma-separated subset of {','.join(SECTIONS)}")
    args.n_train = args.n_train or (4096 if args.mode == "speed" else 10000)
    args.epochs = args.epochs or (40 if args.mode == "real" else 4)
    if args.quick:
        args.runs, args.n_train, args.n_test, args.n_ig, args.n_store = 1, 1024, 512, 8, 128
        args.epochs, args.seeds = 1, 2
    if args.mode == "speed":
        results = speed(args)
        print_table(results, f"Medians of {args.runs} interleaved runs; machine: {machine()}")
    elif args.mode == "real":
        import cv
        from training import Recipe
        print(f"machine: {machine()}", flush=True)
        base = Recipe(**parse_sets(args.train + (["epochs=3", "epoch_steps=1"] if args.quick else []), Recipe))
        results = cv.run(Path(args.real), cv.parse_variants(args.variants, base), k=args.folds,
                         seeds=1 if args.quick else [int(s) for s in args.seed_ids.split(",") if s] or args.seeds,
                         epochs=3 if args.quick else args.epochs,
                         patience=args.patience,
                         seed_recipe=not args.no_seed_recipe and args.task == "classes", task=args.task)
        cv.report(results)
    elif args.mode == "xai":
        import xai
        print(f"machine: {machine()}", flush=True)
        from training import Recipe
        recipe = Recipe(**parse_sets(args.train + (["epochs=3", "epoch_steps=1"] if args.quick else []), Recipe))
        results = xai.run(Path(args.real), k=2 if args.quick else args.folds, seeds=2 if args.quick else args.seeds,
                          recipe=recipe, rand_n=4 if args.quick else args.rand_n,
                          n_per_fold=12 if args.quick else 0, entries=xai.pick(args.entries))
        print(xai.report(results))
        if args.figure:
            print(f"wrote {xai.figure(results, Path(args.figure))}")
    elif args.mode == "planted":
        import planted
        import xai
        from training import Recipe
        if args.figure and not args.models:  # before the hour of training, not after it
            p.error("planted --figure redraws from the kept models: give --models")
        print(f"machine: {machine()}", flush=True)
        folds = [int(f) for f in args.fold_ids.split(",") if f] or None
        results = planted.run(Path(args.real), k=args.folds, folds=[0] if args.quick else folds,
                              entries=xai.pick(args.entries), workers=args.workers,
                              recipe_sets=parse_sets(args.train + (["epochs=2"] if args.quick else []), Recipe),
                              n_max=8 if args.quick else 0, groups=[0] if args.quick else None,
                              models=args.models)
        print(planted.report(results))
        if args.figure:  # the default, its members, a former default (images/planted_marks.png)
            shown = xai.pick(args.entries) or ["(Blur IG + LRP) × Grad-CAM", "Blur IG × Grad-CAM",
                                               "LRP × Grad-CAM (ε-z⁺-flat rules)", "Blur IG (scale-space path)", "Grad-CAM"]
            print(f"wrote {planted.figure(Path(args.real), args.models, Path(args.figure), shown, args.folds)}")
    elif args.mode == "audit":
        import shortcuts
        print(f"machine: {machine()}", flush=True)
        folds = [int(f) for f in args.fold_ids.split(",") if f] or None
        results = shortcuts.run(Path(args.real), k=args.folds, folds=folds, workers=args.workers,
                                models=args.models or "runs/planted-models",
                                share=shortcuts.SHARE if args.share is None else args.share, draw=args.draw)
        results["speed"] = shortcuts.speed(Path(args.real), args.models or "runs/planted-models", args.tmp)
        print(shortcuts.report(results))
        if args.figure:  # images/audit_planted.png: fold 0's audits, from the maps kept with the models
            print(f"wrote {shortcuts.figure(Path(args.real), args.models or 'runs/planted-models', Path(args.figure))}")
        if args.map_figure:  # images/audit_map.png: the report's map of the data set for fold 0's tinted square
            print(f"wrote {shortcuts.map_figure(Path(args.real), args.models or 'runs/planted-models', Path(args.map_figure))}")
    elif args.mode == "trust":
        import firstrun
        print(f"machine: {machine()}", flush=True)
        results = firstrun.run(quick=args.quick, tmp=args.tmp)
    else:
        results = accuracy(args)
    if args.json:
        record = {"machine": machine(), "args": vars(args), "results": results}
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
