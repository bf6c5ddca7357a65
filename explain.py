"""Explain a trained model's predictions with Integrated Gradients and Grad-CAM, stored in SQLite.

    python explain.py --checkpoint runs/latest/best.pt                  # whole test split, IG + Grad-CAM
    python explain.py --checkpoint RUN/best.pt --n 200 --only-errors     # the first 200 mistakes
    python explain.py --checkpoint RUN/best.pt --methods smoothgrad --indices 3,14,15
    python explain.py --checkpoint RUN/best.pt --trust --trust-n 256    # ... and can the maps be trusted?
    python explain.py --checkpoint RUN/best.pt --shard 2/4               # this process: the 2nd of 4 slices
    python explain.py --db all.db --merge-from shard1.db,shard2.db       # copy shard files into one
    python explain.py --checkpoint RUN/best.pt --report report.html      # ... then one HTML page of it all
    python explain.py --checkpoint RUN/best.pt --images tiles/ a.tif     # your own files, at their resolution
    torchrun --nproc_per_node 4 explain.py --checkpoint RUN/best.pt      # 4 processes, one database

Every map goes into the database (--db) keyed by checkpoint hash, method settings, sample (the data
file's name and content hash, split, index) and target class; a rerun skips what is already there,
so an interrupted run resumes where it stopped. Figures of one example per class are drawn from the
database into images/ next to the checkpoint.

--shard K/N splits the selected images into N contiguous slices and explains slice K only, so N
processes or machines share the work, writing one database (concurrent writers are safe) or one file
each, joined with --merge-from. Figures and --trust need the whole selection: run once more without
--shard, which finds every map stored and only draws and measures.

--images explains image files instead of a split (tiles.py: MedMNIST's resize), stores them keyed
by content hash, prints and writes predictions.csv and draws each at its own resolution.

--trust then measures whether the stored maps reflect the model (trust.METRICS: IG completeness,
the cascading parameter-randomisation sanity check, deletion and insertion, localisation against
the evidence masks of synthetic data) and IG-vs-Grad-CAM agreement, each against a random or
model-blind baseline. The numbers go into the database next to the maps, a table is printed and
images/sanity_check.png, deletion_insertion.png and localisation.png are drawn.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from attribution import METHODS, AttributionSettings, as_stored, map_seeds
from data import BINARY, TUMOR_CLASS, DataError, data_for_run, file_digest, normalize
from db import FILE_SPLIT, UNKNOWN_LABEL, DatabaseError, ExplanationDB, StoreError, check_sources
from figures import plot_examples, plot_tiles, plot_trust
from gallery import report_html
from report import write_csv
from model import GRADCAM_LAYERS, CheckpointError, gradcam_layer, inference_copy, load_checkpoint, predict
from runtime import distributed, exit_with_one_line, parse_config
from tiles import TileError, find_images, label_from_name, read_tile
from trust import (METRICS, Context, Maps, TrustSettings, agreement, edge_control_sanity, summarise_agreement)

READ_CHUNK = 1024  # images per read of stored maps: bounds memory for large selections at 224x224


@dataclass
class ExplainConfig(AttributionSettings, TrustSettings):
    checkpoint: str = field(default="runs/latest/best.pt", metadata={"help": "checkpoint written by train.py"})
    db: str = field(default="explanations.db", metadata={"help": "SQLite database the maps are stored in"})
    methods: str = field(default="ig,gradcam", metadata={"help": f"comma-separated, from: {', '.join(METHODS)}"})
    split: str = field(default="test", metadata={"help": "split to explain", "choices": ("train", "val", "test")})
    data_dir: str = field(default="", metadata={"help": "data folder or .npz file (default: the checkpoint's)"})
    n: int = field(default=0, metadata={"min": 0, "help": "explain the first N selected images (0: all)"})
    indices: str = field(default="", metadata={"help": "comma-separated image indices (default: all)"})
    classes: str = field(default="", metadata={"help": "only images whose TRUE class is in this comma-separated list"})
    only_errors: bool = field(default=False, metadata={"help": "only misclassified images"})
    targets: str = field(default="auto", metadata={"help": "class to explain; auto: the predicted one, and for a binary task (--task tumor) the positive class (cancer), whatever was predicted", "choices": ("auto", "predicted", "true", "both")})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    figures: bool = field(default=True, metadata={"help": "draw images/ig_examples.png, gradcam_examples.png (and the --trust figures)"})
    trust: bool = field(default=False, metadata={"help": "then test the maps: completeness, sanity, deletion/insertion, localisation, agreement"})
    shard: str = field(default="", metadata={"help": "K/N: explain only the K-th of N slices of the selected images (1-based); no figures or --trust"})
    images: list[str] = field(default_factory=list, metadata={"nargs": "+", "help": "explain these image files, or every PNG/JPEG/TIFF under these folders, instead of a split: any size, RGB, RGBA or grayscale, resized to the model's input as MedMNIST made its images (PIL's antialiased bilinear, matched on a real tile: tiles.py), stored keyed by each file's SHA-256"})
    labels_from_names: bool = field(default=False, metadata={"help": "with --images: a file's true class is the PathMNIST code in its name (ADI, BACK, DEB, LYM, MUC, MUS, NORM, STR, TUM: TUM-TCGA-AAHIDTWA.jpg is 8)"})
    files_out: str = field(default="", metadata={"help": "with --images: folder for predictions.csv and one figure per file (default: files/ next to the checkpoint)"})
    figure_grid: str = field(default="", metadata={"help": "with --images: draw one grid of every file into this PNG instead of one figure per file"})
    report: str = field(default="", metadata={"help": "then write a self-contained HTML report of the selection's stored maps to this file: trust metrics and figures, a gallery with filters and sorting"})
    merge_from: str = field(default="", metadata={"help": "comma-separated databases (e.g. shard files) to copy into --db, then stop; nothing is explained"})

    def check(self) -> str | None:
        unknown = set(self.method_list) - set(METHODS)
        if unknown:
            return f"unknown method(s) {sorted(unknown)}; choose from {sorted(METHODS)}"
        if self.shard and self.shard_kn is None:
            return f"--shard must be K/N with 1 <= K <= N, got {self.shard!r}"
        if self.merge_from and (self.shard or not self.merge_list):
            return "--merge-from takes comma-separated database paths and no --shard"
        if self.images and (self.trust or self.report or self.shard or self.indices or self.classes or self.only_errors
                            or self.n):
            return ("--images explains every file given; --trust, --report, --shard, --indices, --classes, "
                    "--only-errors and --n are for splits")
        return TrustSettings.check(self)

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def merge_list(self) -> list[str]:
        return [p.strip() for p in self.merge_from.split(",") if p.strip()]

    @property
    def shard_kn(self) -> tuple[int, int] | None:
        """(K, N) from --shard, None if absent or malformed."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", self.shard)
        k, n = (int(m[1]), int(m[2])) if m else (0, 0)
        return (k, n) if 1 <= k <= n else None


@dataclass
class Work:
    """The maps to compute, one entry each: image index, target class, and what is stored with it."""
    index: np.ndarray
    target: np.ndarray
    sample_id: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    seeds: np.ndarray  # per-map noise seeds (SmoothGrad), from the map's natural key

    def __len__(self) -> int:
        return len(self.index)

    def part(self, start: int, stop: int) -> Work:
        return Work(**{k: v[start:stop] for k, v in asdict(self).items()})


@dataclass(frozen=True)
class Where:
    """What the maps of one run are stored under, besides their setting."""
    model_id: int
    dataset: str
    size: int
    split: str


# ------------------------------------------------------------------------------------------------
# Selection and storage

def select(labels: np.ndarray, pred: np.ndarray, cfg: ExplainConfig) -> np.ndarray:
    """Indices of the images to explain, from --indices, --classes, --only-errors and --n."""
    idx = np.arange(len(labels))
    if cfg.indices:
        idx = np.array(_int_list(cfg.indices, "--indices"), dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= len(labels))]
        if len(bad):
            raise DataError(f"--indices {bad.tolist()} outside the split's 0..{len(labels) - 1}")
    if cfg.classes:
        idx = idx[np.isin(labels[idx], _int_list(cfg.classes, "--classes"))]
    if cfg.only_errors:
        idx = idx[pred[idx] != labels[idx]]
    return idx[: cfg.n] if cfg.n else idx


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise DataError(f"{flag} {text!r}: give comma-separated integers, e.g. 3,14,15") from None


def shard_slice(idx: np.ndarray, k: int, n: int) -> np.ndarray:
    """The K-th (1-based) of N contiguous slices of the selection, sizes differing by at most one.

    By image, before targets are paired with images, so both targets of an image land in one shard;
    it depends on the selection alone, so a rerun of a shard gets the same slice and the same chunks."""
    return np.array_split(idx, n)[k - 1]


def work_list(idx, labels, pred, conf, sample_ids, where: Where, targets: str) -> Work:
    """One entry per (image, explained class): predicted, true or both (without duplicates)."""
    chosen = {"predicted": [pred[idx]], "true": [labels[idx]], "both": [pred[idx], labels[idx]],
              "positive": [np.ones_like(pred[idx])]}[targets]
    pairs = np.unique(np.stack([np.concatenate([idx] * len(chosen)), np.concatenate(chosen)]), axis=1)
    index, target = pairs[0], pairs[1]
    sid = dict(zip(idx.tolist(), np.asarray(sample_ids).tolist()))
    return Work(index, target, np.array([sid[i] for i in index.tolist()], np.int64), pred[index], conf[index],
                map_seeds(where.dataset, where.split, index, target))


def explain(db, model, layer, x_uint8, work: Work, method: str, cfg: ExplainConfig, device, setting_id: int,
            where: Where) -> int:
    """Run `method` over the work list in fixed chunks of --batch-size, one transaction per chunk.

    What is stored is asked again before each chunk, and a stored map is never replaced: processes
    that share a database skip what another finished meanwhile, and a map computed elsewhere (a
    shard's, a concurrent writer's) stays the map its metrics describe. Each map depends only on its
    image, target and settings (SmoothGrad's noise on the map's own seed), so which chunk, shard or
    rerun computes it does not change it.
    """
    written = 0
    for start in tqdm(range(0, len(work), cfg.batch_size), desc=method, unit="batch", disable=None):
        part = work.part(start, start + cfg.batch_size)
        done = db.done_targets(where.model_id, setting_id, part.sample_id)
        if all((s, t) in done for s, t in zip(part.sample_id.tolist(), part.target.tolist())):
            continue
        x = normalize(x_uint8[torch.from_numpy(part.index)].to(device))
        out = METHODS[method].attribute(model, layer, x.contiguous(memory_format=torch.channels_last),
                                        torch.from_numpy(part.target).to(device), cfg, part.seeds)
        written += db.add_attributions(
            model_id=where.model_id, setting_id=setting_id, sample_ids=part.sample_id, targets=part.target,
            predicted=part.predicted, confidence=part.confidence, maps=as_stored(out.maps, cfg.store_dtype),
            deltas=None if out.delta is None else out.delta.detach().cpu().numpy(),
            raw_maps=None if out.raw is None else as_stored(out.raw, cfg.store_dtype),
            dtype=cfg.store_dtype, replace=False)
    return written


def one_per_class(rows: dict, num_classes: int) -> np.ndarray:
    """Row numbers of the first explained image of each true class, correct predictions first."""
    picks = []
    for c in range(num_classes):
        mine = np.flatnonzero(rows["label"] == c)
        right = mine[rows["predicted"][mine] == c]
        if len(mine):
            picks.append((right if len(right) else mine)[0])
    return np.array(picks, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# Trust: every metric of trust.METRICS over the stored maps

def stored_maps(db, where: Where, setting_id: int, indices, work: Work, split, method: str) -> Maps:
    """The stored maps of these images, restricted to the run's (index, target) pairs."""
    rows = db.maps(model_id=where.model_id, setting_id=setting_id, dataset=where.dataset, size=where.size,
                   split=where.split, indices=np.asarray(indices).tolist())
    pairs = dict(zip(zip(work.index.tolist(), work.target.tolist()), work.seeds.tolist()))
    keep = np.array([(i, t) in pairs for i, t in zip(rows["index"].tolist(), rows["target"].tolist())], bool)
    index = rows["index"][keep]
    return Maps(method, rows["attribution_id"][keep], index, rows["label"][keep], rows["target"][keep],
                np.array([pairs[(i, t)] for i, t in zip(index.tolist(), rows["target"][keep].tolist())], np.int64),
                torch.from_numpy(rows["maps"][keep]) if keep.any() else torch.zeros(0),
                torch.from_numpy(rows["delta"][keep]), split.images[torch.from_numpy(index)],
                None if split.masks is None else split.masks[torch.from_numpy(index)])


def measure_trust(db, model, model_name, split, idx, work: Work, settings: dict, where: Where, class_names,
                  cfg: ExplainConfig, device) -> None:
    """Every metric of trust.METRICS per method, stored per map and aggregated; then IG-vs-Grad-CAM
    agreement and the model-free control. Cheap metrics cover every explained map, read back once
    per chunk of images; expensive ones the maps of the first --trust-n selected images."""
    ctx = Context(model, GRADCAM_LAYERS[model_name], cfg, device, class_names)
    values = {(sid, name): {} for sid in settings.values() for name in METRICS}  # per-map arrays, per chunk
    agree = []
    for expensive, parts in ((False, np.array_split(idx, max(1, -(-len(idx) // READ_CHUNK)))),
                             (True, [idx[: cfg.trust_n]])):
        for part in parts:
            maps = {m: stored_maps(db, where, sid, part, work, split, m) for m, sid in settings.items()}
            for method, sid in settings.items():
                for name, metric in METRICS.items():
                    if metric.expensive == expensive:
                        _measure(db, metric, ctx, maps[method], values[sid, name])
            if not expensive and "ig" in maps and "gradcam" in maps:
                a = agreement(maps["ig"], maps["gradcam"])
                db.add_sample_metrics(a["ig_id"], "spearman_gradcam", a["rho"])
                db.add_sample_metrics(a["gradcam_id"], "spearman_ig", a["rho"])
                agree.append(a)
    summaries = {sid: {} for sid in [0, *settings.values()]}  # setting id (0: model-level) -> name -> Summary
    for (sid, name), found in values.items():
        if found:
            summaries[sid] |= METRICS[name].summarise({k: np.concatenate(v) for k, v in found.items()}, ctx)
    if agree:
        summaries[0]["agreement_ig_gradcam"] = summarise_agreement(
            np.concatenate([a["rho"] for a in agree]), np.concatenate([a["target"] for a in agree]),
            class_names, settings)
    summaries[0]["sanity_control_edge"] = edge_control_sanity(model, split.images[torch.from_numpy(idx[: cfg.trust_n])],
                                                              cfg, device)
    for sid, named in summaries.items():
        for name, s in named.items():
            db.add_summary_metric(model_id=where.model_id, setting_id=sid or None, dataset=where.dataset,
                                  size=where.size, split=where.split, name=name, value=s.value, n=s.n,
                                  detail=s.detail)


def _measure(db, metric, ctx: Context, maps: Maps, values: dict) -> None:
    """One metric on one read of stored maps: its per-map values stored, all of them kept in `values`."""
    found = metric.measure(ctx, maps) if len(maps.index) else None
    for key, v in (found or {}).items():
        if not key.startswith("_") and v.ndim == 1:
            db.add_sample_metrics(maps.attribution_id, key, v)
        values.setdefault(key, []).append(v)
    if found:
        values.setdefault("_label", []).append(maps.label)
        values.setdefault("_target", []).append(maps.target)


def print_trust(rows: list[dict]) -> None:
    """One line per (model, method) from the stored summary metrics, then agreement per class."""
    def pair(m: dict, name: str) -> str:
        if name not in m:
            return "-"
        rnd = m[name]["detail"].get("random")
        return f"{m[name]['value']:.3f}" + ("" if rnd is None else f"/{rnd:.3f}")

    per_setting = {}
    for r in rows:
        per_setting.setdefault((r["model"], r["sha256"], r["method"] or "", r["setting_id"] or 0), {})[r["name"]] = r
    print("trust (n: images of the expensive checks; relΔ = |IG delta| / |f(x)-f(baseline)|; steps95: IG steps "
          "for 95% under --trust-tol; sanity ρ: Spearman |map| after randomising all layers; m/rnd: map vs random; "
          "maps ranked by their positive part, |map| rows by absolute value)")
    print(f"{'model':9s} {'method':10s} {'n':>5s} {'relΔ med':>8s} {'relΔ p90':>8s} {'steps95':>7s} "
          f"{'sanity ρ':>8s} {'deletion m/rnd':>14s} {'insertion m/rnd':>15s} {'rel.mass m/rnd':>14s} "
          f"{'pointing m/rnd':>14s}")
    for (model, _, method, sid), m in per_setting.items():
        if not sid:
            continue
        d = m.get("rel_delta", {}).get("detail", {})
        steps = m.get("steps_for_tol", {}).get("value", np.nan)
        n = m["sanity_spearman"]["n"] if "sanity_spearman" in m else 0
        rel = f"{d['median']:8.4f} {d['p90']:8.4f}" if d else f"{'-':>8s} {'-':>8s}"
        print(f"{model:9s} {method:10s} {n:5d} {rel} "
              f"{'-' if 'steps_for_tol' not in m else '>max' if np.isnan(steps) else int(steps):>7} "
              f"{pair(m, 'sanity_spearman'):>8s} {pair(m, 'deletion_auc'):>14s} "
              f"{pair(m, 'insertion_auc'):>15s} {pair(m, 'relevance_mass'):>14s} {pair(m, 'pointing_game'):>14s}")
        if "deletion_auc_abs" in m:
            print(f"{'':9s} {'  |map|':10s} {'':5s} {'':8s} {'':8s} {'':7s} {'':8s} {pair(m, 'deletion_auc_abs'):>14s} "
                  f"{pair(m, 'insertion_auc_abs'):>15s}")
    for (model, _, _, sid), m in per_setting.items():
        if sid:
            continue
        if "sanity_control_edge" in m:
            print(f"{model:9s} {'edge (ctl)':10s} sanity ρ after full randomisation "
                  f"{m['sanity_control_edge']['value']:.3f} (a map that ignores the model stays at 1)")
        if "agreement_ig_gradcam" in m:
            a = m["agreement_ig_gradcam"]
            classes = "  ".join(f"{c} {v:+.2f}" for c, v in a["detail"]["per_class"].items())
            print(f"{model:9s} IG vs Grad-CAM Spearman {a['value']:+.3f} (n={a['n']}); by target class: {classes}")


# ------------------------------------------------------------------------------------------------
# Merging and the summary

def merge(cfg: ExplainConfig) -> dict:
    """--merge-from: copy each database into --db, one transaction each. Every source is checked
    first, before --db is opened or created, so a bad one in the list leaves every file as it was."""
    check_sources(cfg.merge_list, cfg.db)
    merged = {}
    with ExplanationDB(cfg.db) as db:
        for path in cfg.merge_list:
            c = merged[path] = db.merge_from(path)
            print(f"merged {path} into {cfg.db}: {c['maps']} maps added, {c['maps_present']} already there, "
                  f"{c['map_conflicts']} conflicting (--db's kept); {c['models']} models, {c['settings']} "
                  f"settings, {c['samples']} samples, {c['sample_metrics'] + c['summary_metrics']} metrics "
                  f"added, {c['metric_conflicts']} left out")
        summary = db.summary()
    print_summary(summary)
    return {"config": asdict(cfg), "merged": merged, "summary": summary}


def print_summary(summary: list[dict]) -> None:
    for row in summary:
        print(f"{row['model']:9s} {row['sha256']} {row['method']:10s} {row['dataset']:24s} {row['split']:5s} "
              f"maps {row['n_maps']:6d} errors {row['n_errors']:5d} mean|delta| {row['mean_abs_delta']:.2e}")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ExplainConfig, argv, description=__doc__.split("\n")[0])
    if cfg.merge_from:
        return merge(cfg)
    with distributed(cfg.device) as (device, rank, world):
        if world == 1 or cfg.shard:
            return run(cfg, device)
        # torchrun: each process explains its slice into the one database; then rank 0 makes the
        # figures and --trust over the whole selection, finding every map already stored.
        result = run(replace(cfg, shard=f"{rank + 1}/{world}", figures=False, trust=False), device, rank, world)
        torch.distributed.barrier()
        return run(cfg, device) if rank == 0 and (cfg.figures or cfg.trust or cfg.images) else result


def write_report(cfg: ExplainConfig, where: Where, split, class_names, title: str) -> None:
    """--report: the HTML page of every stored map of this model on this split (gallery.py)."""
    t0 = time.perf_counter()
    images = Path(cfg.checkpoint).parent / "images"
    with ExplanationDB(cfg.db) as db:
        page = report_html(db, where.model_id, where.dataset, where.size, where.split, split.images, class_names, title,
                           [images / f"{n}.png" for n in ("sanity_check", "deletion_insertion", "localisation")])
    path = Path(cfg.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s); open it in a browser")


def target_rule(targets: str, task: str) -> str:
    """--targets auto: the positive class of a binary task (the cancer logit), else the predicted one."""
    return ("positive" if task == BINARY else "predicted") if targets == "auto" else targets


def run(cfg: ExplainConfig, device, rank: int = 0, world: int = 1) -> dict:
    """Explain the selection (or this shard's slice, or --images), store it, draw and measure."""
    # The model and its data, both described by the checkpoint alone (or --data-dir's file).
    model, mcfg, ckpt = load_checkpoint(cfg.checkpoint, device)
    if cfg.images:
        return explain_images(cfg, model, mcfg, ckpt.get("arch", {}), device, rank, world)
    data = data_for_run(mcfg, (cfg.split,), cfg.data_dir, cfg.checkpoint)
    if data.task.startswith("multi-label"):
        raise DataError(f"{data.source}: explaining multi-label tasks is not supported (there is no one class "
                        "to explain); evaluate it with evaluate.py")
    split = data.splits[cfg.split]
    print(f"explaining {cfg.split} split of {data.source} with {mcfg['model']} ({cfg.checkpoint})")

    # Predictions decide the explained class and the selection (--only-errors); a shard takes its
    # slice of the whole selection, so every shard must see the same predictions.
    scores = predict(model, split.images, 128, device, data.task)  # float32: the class IG explains
    pred, conf, labels = scores.argmax(1), scores.max(1), split.labels.numpy()
    idx = select(labels, pred, cfg)
    whole = not cfg.shard  # figures and --trust need the whole selection
    if not whole:
        n_selected, idx = len(idx), shard_slice(idx, *cfg.shard_kn)
        print(f"shard {cfg.shard}: {len(idx)} of {n_selected} selected images")
        if cfg.figures or cfg.trust:
            print(f"shard {cfg.shard}: {' and '.join(['figures'] * cfg.figures + ['--trust'] * cfg.trust)} "
                  "skipped, they need the whole selection: once every shard is done, run explain.py again "
                  "without --shard (it finds every map stored and only draws and measures)")

    with ExplanationDB(cfg.db) as db:
        where = Where(db.add_model(file_digest(cfg.checkpoint, "sha256"), mcfg["model"], mcfg), data.key,
                      data.size, cfg.split)
        sample_ids = db.add_samples(dataset=where.dataset, size=where.size, split=where.split, indices=idx,
                                    labels=labels[idx])
        work = work_list(idx, labels, pred, conf, sample_ids, where, target_rule(cfg.targets, data.task))
        fast = inference_copy(model)  # BatchNorm folded, channels_last: IG 1.5x faster on CPU
        layer = gradcam_layer(fast, mcfg["model"])
        settings = {}
        for method in cfg.method_list:
            settings[method] = db.add_setting(method, METHODS[method].params(cfg, GRADCAM_LAYERS[mcfg["model"]]))
            n = explain(db, fast, layer, split.images, work, method, cfg, device, settings[method], where)
            print(f"{method}: {n} maps written, {len(work) - n} already in {cfg.db}")
            if whole and cfg.figures and method in ("ig", "gradcam") and len(idx):
                rows = db.maps(model_id=where.model_id, setting_id=settings[method], dataset=where.dataset,
                               size=where.size, split=where.split, indices=idx.tolist())
                pick = one_per_class(rows, data.num_classes)
                path = plot_examples(split.images, {k: v[pick] for k, v in rows.items() if v is not None},
                                     data.class_names, method,
                                     Path(cfg.checkpoint).parent / "images" / f"{method}_examples.png",
                                     f"{mcfg['model']} on {cfg.split} split of {data.name} ({data.size}x{data.size})")
                print(f"wrote {path}")
        trust = []
        if whole and cfg.trust and len(idx):
            measure_trust(db, model, mcfg["model"], split, idx, work, settings, where, data.class_names, cfg, device)
            trust = [r for r in db.summary_metrics(where.model_id)
                     if (r["dataset"], r["size"], r["split"]) == (where.dataset, where.size, where.split)
                     and r["setting_id"] in (None, *settings.values())]  # this run's settings
        summary = db.summary()
    print_summary(summary)
    title = f"{mcfg['model']} on the {cfg.split} split of {data.name} ({data.size}x{data.size})"
    if trust:
        print_trust(trust)
        if cfg.figures:
            for path in plot_trust(trust, data.class_names, Path(cfg.checkpoint).parent / "images", title):
                print(f"wrote {path}")
    if whole and cfg.report:
        write_report(cfg, where, split, data.class_names, f"{title}: {Path(cfg.checkpoint).parent.name}")
    return {"config": asdict(cfg), "summary": summary, "trust": trust}


# ------------------------------------------------------------------------------------------------
# --images: a pathologist's own files

def explain_images(cfg: ExplainConfig, model, mcfg: dict, arch: dict, device, rank: int = 0, world: int = 1) -> dict:
    """Predict and explain every image file, --batch-size files at a time: each is stored as the
    sample of its SHA-256 (a rerun adds nothing), printed, written to predictions.csv and drawn at
    its own resolution. A file that cannot be read is one line on stderr and the others go on;
    the result's "problems" lists them (the command then exits 1)."""
    names, task = arch.get("class_names") or [str(c) for c in range(arch.get("num_classes", 9))], arch.get("task", "")
    if task.startswith("multi-label"):
        raise DataError(f"{cfg.checkpoint}: explaining multi-label tasks is not supported (there is no one class "
                        "to explain); evaluate it with evaluate.py")
    files, problems = find_images(cfg.images)
    files = np.array_split(np.array(files, dtype=object), world)[rank].tolist() if world > 1 else files
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    out = Path(cfg.files_out or Path(cfg.checkpoint).parent / "files")
    size, rule = mcfg["size"], target_rule(cfg.targets, task)
    print(f"explaining {len(files)} image file(s) with {mcfg['model']} ({cfg.checkpoint}), each resized to "
          f"{size}x{size} as MedMNIST made its images")
    csv_rows, grid, first = [], [], {}  # first: sha256 -> the path it was first read from in this run
    written = dict.fromkeys(cfg.method_list, 0)
    with ExplanationDB(cfg.db) as db:
        model_id = db.add_model(file_digest(cfg.checkpoint, "sha256"), mcfg["model"], mcfg)
        fast = inference_copy(model)
        layer = gradcam_layer(fast, mcfg["model"])
        settings = {m: db.add_setting(m, METHODS[m].params(cfg, GRADCAM_LAYERS[mcfg["model"]])) for m in cfg.method_list}
        for start in range(0, len(files), cfg.batch_size):
            tiles, sample_ids = [], []
            for path in files[start:start + cfg.batch_size]:
                try:
                    tile = read_tile(path, size, arch.get("in_channels", 3))
                    label = file_label(path, task) if cfg.labels_from_names else UNKNOWN_LABEL
                    sample_ids.append(db.add_files(size=size, sha256s=[tile.sha256], paths=[str(path)],
                                                   widths=[tile.width], heights=[tile.height], labels=[label])[0])
                except (TileError, StoreError) as e:
                    problems.append(str(e))
                    print(f"error: {e}", file=sys.stderr)
                    continue
                tile.label = label
                tiles.append(tile)
            if not tiles:
                continue
            x = torch.stack([t.small for t in tiles])
            scores = predict(model, x, 128, device, task)
            pred, conf = scores.argmax(1), scores.max(1)
            new = [i for i, t in enumerate(tiles) if first.setdefault(t.sha256, t.path) == t.path]
            work = file_work(tiles, new, np.array(sample_ids), pred, conf, rule)
            stored = {}
            for method, sid in settings.items():
                written[method] += explain(db, fast, layer, x, work, method, cfg, device, sid,
                                           Where(model_id, "files", size, FILE_SPLIT))
                rows = db.maps(model_id=model_id, setting_id=sid, sample_ids=np.array(sample_ids)[new].tolist())
                for r in range(len(rows["sample_id"])):
                    stored.setdefault((method, int(rows["sample_id"][r])), (
                        rows["raw"][r] if rows["raw"] is not None else rows["maps"][r], int(rows["target"][r])))
            for i, t in enumerate(tiles):
                row = {"path": str(t.path), "sha256": t.sha256, "width": t.width, "height": t.height,
                       "predicted": names[pred[i]], "confidence": round(float(conf[i]), 6),
                       "label": names[t.label] if t.label >= 0 else "",
                       **{f"score_{n}": round(float(v), 6) for n, v in zip(names, scores[i])}}
                csv_rows.append(row)
                same = "" if first[t.sha256] == t.path else f" (the same image as {first[t.sha256]})"
                verdict = "" if t.label < 0 else f"; labelled {names[t.label]}: {'right' if t.label == pred[i] else 'WRONG'}"
                print(f"{t.path}: {names[pred[i]]} ({conf[i]:.3f}){verdict}{same}")
                maps = {m: stored[m, sample_ids[i]] for m in settings if (m, sample_ids[i]) in stored}
                if cfg.figures and not same:
                    drawn = tile_row(t, maps, names, pred[i], conf[i])
                    if cfg.figure_grid:
                        grid.append(drawn)
                    else:
                        plot_tiles([drawn], out / "figures" / f"{t.path.stem}-{t.sha256[:8]}.png",
                                   f"{mcfg['model']} trained on {trained_on(mcfg)}: the file at {t.width}x{t.height}; "
                                   f"the model saw it at {size}x{size}")
        summary = db.summary()
    for method, n in written.items():
        print(f"{method}: {n} maps written, the others already in {cfg.db}")
    if csv_rows and world == 1:  # under torchrun, rank 0's pass over every file writes it
        write_csv(out / "predictions.csv", csv_rows)
        print(f"wrote {out / 'predictions.csv'} ({len(csv_rows)} rows)" + ("" if cfg.figure_grid or not cfg.figures
                                                                         else f" and figures in {out / 'figures'}"))
        labelled = [r for r in csv_rows if r["label"]]
        if labelled:
            right = sum(r["label"] == r["predicted"] for r in labelled)
            print(f"{right} of {len(labelled)} labelled files classified correctly")
    if grid:
        path = plot_tiles(grid, cfg.figure_grid, f"{mcfg['model']} trained on {trained_on(mcfg)}: {len(grid)} image "
                          f"files at their own resolution; the model saw each at {size}x{size}")
        print(f"wrote {path}")
    if problems:
        print(f"{len(problems)} path(s) could not be explained (listed above); everything else is stored in {cfg.db}",
              file=sys.stderr)
    return {"config": asdict(cfg), "files": csv_rows, "problems": problems, "summary": summary}


def trained_on(mcfg: dict) -> str:
    """What a checkpoint was trained on, for figure titles."""
    return "synthetic data" if mcfg["dataset"] == "synthetic" else f"{Path(mcfg['data_dir']).name} ({mcfg['dataset']})"


def file_label(path: Path, task: str) -> int:
    """The true class a file's name gives (tiles.label_from_name), in the model's task: for the
    binary tumor task, 1 for TUM and 0 for every other code."""
    label = label_from_name(path)
    return label if label < 0 or task != BINARY else int(label == TUMOR_CLASS)


def file_work(tiles, new: list[int], sample_ids, pred, conf, rule: str) -> Work:
    """The maps to compute for the files first seen in this run: per file one entry per target
    class, SmoothGrad's seed from the file's content hash."""
    idx = np.array(new, dtype=np.int64)
    labels = np.array([t.label for t in tiles], dtype=np.int64)
    work = work_list(idx, labels, pred, conf, np.asarray(sample_ids)[idx], Where(0, "files", 0, FILE_SPLIT), rule)
    keep = work.target >= 0  # --targets true of a file without a label: nothing to explain
    work = Work(**{k: v[keep] for k, v in asdict(work).items()})
    work.seeds = np.array([map_seeds(f"sha256:{tiles[i].sha256}", FILE_SPLIT, [0], [t])[0]
                           for i, t in zip(work.index.tolist(), work.target.tolist())], dtype=np.int64)
    return work


def tile_row(tile, maps: dict, names, pred: int, conf: float) -> dict:
    """What plot_tiles draws of one file; large files are drawn at most 1024 px wide."""
    scale = min(1.0, 1024 / max(tile.width, tile.height))
    full = tile.full if scale == 1 else np.asarray(Image.fromarray(tile.full.squeeze()).resize(
        (round(tile.width * scale), round(tile.height * scale)), Image.BILINEAR)).reshape(
        round(tile.height * scale), round(tile.width * scale), -1)
    title = f"{tile.path.name}\npred: {names[pred]} ({conf:.2f})"
    if tile.label >= 0:
        title += f"\ntrue: {names[tile.label]}"
    return {"full": full, "small": tile.small.permute(1, 2, 0).numpy(), "title": title,
            "wrong": tile.label >= 0 and tile.label != pred,
            "maps": {m: (v, names[t]) for m, (v, t) in maps.items()}}


def _cli() -> None:
    if main().get("problems"):
        sys.exit(1)


if __name__ == "__main__":
    exit_with_one_line(_cli, (DataError, CheckpointError, DatabaseError))
