"""Explain a trained model's predictions (by default Blur IG weighted by Grad-CAM, the method chosen on
real tissue by two yardsticks, planted marks and ROAD; Blur IG, IG, SmoothGrad, expected gradients,
occlusion, LRP and the Grad-CAM family on request), stored in SQLite.

    python explain.py --checkpoint runs/latest/best.pt                  # whole test split, Blur IG x Grad-CAM
    python explain.py --checkpoint RUN/best.pt --methods ig,gradcam      # IG (Gaussian-blur baseline) + Grad-CAM
    python explain.py --checkpoint RUN/best.pt --n 200 --only-errors     # the first 200 mistakes
    python explain.py --checkpoint RUN/best.pt --methods smoothgrad --indices 3,14,15
    python explain.py --checkpoint RUN/best.pt --trust --trust-n 256    # ... and can the maps be trusted?
    python explain.py --checkpoint RUN/best.pt --audit --report r.html   # ... does the model use shortcuts?
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

--audit groups each predicted class's stored maps into strategies by what they point at and tests
each strategy for a shortcut: does filling its maps' hot spots change the predictions (and the same
shape elsewhere not), and do the hot spots hold something unlike the tissue (audit.py)? Stored in
the database, printed, and a section of --report with example images per strategy.

--images explains image files instead of a split (tiles.py: MedMNIST's resize), stores them keyed
by content hash, prints and writes predictions.csv and draws each at its own resolution.

--trust then measures whether the stored maps reflect the model (trust.METRICS: IG and Blur IG
completeness, the cascading, smooth and efficient model-randomisation checks (MPRT, sMPRT, eMPRT),
ROAD (road.py), black-fill deletion and insertion (confounded on tissue: read ROAD), localisation
against the evidence masks of synthetic data) and IG-vs-Grad-CAM agreement, each against a random or
model-blind baseline. The numbers go into the database next to the maps, a table is printed and
images/sanity_check.png, deletion_insertion.png and localisation.png are drawn.
"""
from __future__ import annotations

import csv
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from attribution import METHODS, AttributionSettings, draw_references
from audit import FEATURES
from audit_run import print_audit, run_audit
from data import BINARY, TUMOR_CLASS, DataError, data_for_run, file_digest
from db import FILE_SPLIT, UNKNOWN_LABEL, DatabaseError, ExplanationDB, StoreError, check_sources
from db_run import RunStore
from explaining import compute_maps, file_work, one_per_class, select, shard_slice, work_list
from figures import plot_examples, plot_tiles, plot_trust, tile_row
from gallery import report_html
from model import (GRADCAM_LAYERS, CheckpointError, gradcam_layer, inference_copy, load_checkpoint, predict,
                   stain_reference)
from report import write_csv
from runtime import AMP_CHOICES, amp_dtype, distributed, exit_with_one_line, parse_config, precision_name
from stainnorm import normalise as normalise_stain
from tiles import TileError, file_label, find_images, read_tile
from trust import TrustSettings
from trust_run import measure_trust, print_trust


@dataclass
class ExplainConfig(AttributionSettings, TrustSettings):
    checkpoint: str = field(default="runs/latest/best.pt", metadata={"help": "checkpoint written by train.py"})
    db: str = field(default="explanations.db", metadata={"help": "SQLite database the maps are stored in"})
    methods: str = field(default="blur_ig_lrp_x_gradcam", metadata={"help": f"comma-separated, from: {', '.join(METHODS)}; the default: the best by the worse of its two ranks on real tissue, planted marks found and ROAD, among the methods that cost at most twice a plain IG map (bench/bench.py planted; docs/trust.md)"})
    split: str = field(default="test", metadata={"help": "split to explain", "choices": ("train", "val", "test")})
    data_dir: str = field(default="", metadata={"help": "data folder or .npz file (default: the checkpoint's)"})
    n: int = field(default=0, metadata={"min": 0, "help": "explain the first N selected images (0: all)"})
    indices: str = field(default="", metadata={"help": "comma-separated image indices (default: all)"})
    classes: str = field(default="", metadata={"help": "only images whose TRUE class is in this comma-separated list"})
    only_errors: bool = field(default=False, metadata={"help": "only misclassified images"})
    targets: str = field(default="auto", metadata={"help": "class to explain; auto: the predicted one, and for a binary task (--task tumor) the positive class (cancer), whatever was predicted", "choices": ("auto", "predicted", "true", "both")})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    amp: str = field(default="auto", metadata={"help": "precision of the predictions that choose the explained class, as evaluate.py's --amp (so the class explained is the class evaluate.py reported); the maps themselves are computed in float32", "choices": AMP_CHOICES})
    figures: bool = field(default=True, metadata={"help": "draw images/METHOD_examples.png for each method (and the --trust figures)"})
    trust: bool = field(default=False, metadata={"help": "then test the maps: completeness, model randomisation (MPRT, sMPRT, eMPRT), ROAD, deletion/insertion, localisation, agreement"})
    shard: str = field(default="", metadata={"help": "K/N: explain only the K-th of N slices of the selected images (1-based); no figures or --trust"})
    images: list[str] = field(default_factory=list, metadata={"nargs": "+", "help": "explain these image files, or every PNG/JPEG/TIFF under these folders, instead of a split: any size, RGB, RGBA or grayscale, resized to the model's input as MedMNIST made its images (PIL's antialiased bilinear, matched on a real tile: tiles.py), stored keyed by each file's SHA-256"})
    labels_from_names: bool = field(default=False, metadata={"help": "with --images: a file's true class is the PathMNIST code in its name (ADI, BACK, DEB, LYM, MUC, MUS, NORM, STR, TUM: TUM-TCGA-AAHIDTWA.jpg is 8)"})
    files_out: str = field(default="", metadata={"help": "with --images: folder for predictions.csv and one figure per file (default: files/ next to the checkpoint)"})
    figure_grid: str = field(default="", metadata={"help": "with --images: draw one grid of every file into this PNG instead of one figure per file"})
    audit: bool = field(default=False, metadata={"help": "then audit the selection's stored maps for shortcuts: group each predicted class's maps into strategies by what they point at, and test each by filling its maps' hot spots (audit.py); stored, printed, and a section of --report"})
    audit_features: str = field(default="evidence", metadata={"help": "--audit groups maps by: evidence (the model's features where the map points, wherever that is) or spray (the downsampled maps, SpRAy's)", "choices": FEATURES})
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
        if self.images and "expected_gradients" in self.method_list:
            return ("expected_gradients draws its reference images from a split; with --images choose other "
                    "--methods")
        if self.images and (self.trust or self.audit or self.report or self.shard or self.indices or self.classes or self.only_errors
                            or self.n):
            return ("--images explains every file given; --trust, --audit, --report, --shard, --indices, --classes, "
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


def run(cfg: ExplainConfig, device, rank: int = 0, world: int = 1) -> dict:
    """Explain the selection (or this shard's slice, or --images), store it, draw and measure."""
    # The model and its data, both described by the checkpoint alone (or --data-dir's file).
    model, mcfg, ckpt = load_checkpoint(cfg.checkpoint, device)
    if cfg.images:
        return explain_files(cfg, model, mcfg, ckpt.get("arch", {}), device, rank, world)
    data = data_for_run(mcfg, (cfg.split,), cfg.data_dir, cfg.checkpoint)
    refuse_multi_label(data.task, data.source)
    split = data.splits[cfg.split]
    print(f"explaining {cfg.split} split of {data.source} with {mcfg['model']} ({cfg.checkpoint})")
    if stain := stain_reference(ckpt):  # the images the model sees: maps, figures and checks are of them
        split.images = normalise_stain(split.images, stain)
        print(f"stain: the images normalised to the training split's ({stain['kind']})")

    # Predictions decide the explained class and the selection (--only-errors); a shard takes its
    # slice of the whole selection, so every shard must see the same predictions.
    scores = predict(model, split.images, 128, device, data.task, cfg.amp)  # evaluate.py's precision
    pred, conf, labels = scores.argmax(1), scores.max(1), split.labels.numpy()
    idx = select(labels, pred, cfg)
    whole = not cfg.shard  # figures and --trust need the whole selection
    if not whole:
        n_selected, idx = len(idx), shard_slice(idx, *cfg.shard_kn)
        print(f"shard {cfg.shard}: {len(idx)} of {n_selected} selected images")
        if cfg.figures or cfg.trust or cfg.audit:
            skipped = ["figures"] * cfg.figures + ["--trust"] * cfg.trust + ["--audit"] * cfg.audit
            skipped = ", ".join(skipped[:-1]) + " and " + skipped[-1] if len(skipped) > 1 else skipped[0]
            print(f"shard {cfg.shard}: {skipped} "
                  "skipped, they need the whole selection: once every shard is done, run explain.py again "
                  "without --shard (it finds every map stored and only draws and measures)")

    # The maps: each method over the work list, stored batch by batch (a rerun computes only what is missing).
    images_dir = Path(cfg.checkpoint).parent / "images"
    title = f"{mcfg['model']} on the {cfg.split} split of {data.name} ({data.size}x{data.size})"
    with ExplanationDB(cfg.db) as db:
        store = RunStore.open(db, checkpoint_sha256=file_digest(cfg.checkpoint, "sha256"), model=mcfg["model"],
                              config=mcfg, dataset=data.key, size=data.size, split=cfg.split)
        sample_ids = store.add_samples(idx, labels[idx])
        work = work_list(idx, labels, pred, conf, sample_ids, data.key, cfg.split,
                         target_rule(cfg.targets, data.task))
        settings = store.add_settings(method_params(cfg, mcfg["model"], device))
        fast = inference_copy(model)  # BatchNorm folded, channels_last: IG 1.5x faster on CPU
        layer = gradcam_layer(fast, mcfg["model"])
        if "expected_gradients" in settings:
            cfg.references = draw_references(split.images, cfg.eg_references, device)
        print(f"{len(work)} maps per method for {len(idx)} images: {', '.join(settings)}")
        for method, setting_id in settings.items():
            n = compute_maps(store, setting_id, fast, layer, split.images, work, method, cfg, device)
            print(f"{method}: {n} maps written, {len(work) - n} already in {cfg.db}")
            if whole and cfg.figures and len(idx):
                rows = store.maps(setting_id, indices=idx.tolist())
                pick = one_per_class(rows, data.num_classes)
                picked = {k: v[pick] for k, v in rows.items() if v is not None}
                path = plot_examples(split.images, picked, data.class_names, method,
                                     images_dir / f"{method}_examples.png", title)
                print(f"wrote {path}")
        # Can the maps be trusted? Every metric of trust.METRICS, stored next to the maps.
        trust = []
        if whole and cfg.trust and len(idx):
            trust = measure_trust(store, model, mcfg["model"], split, idx, work, settings, data.class_names,
                                  cfg, device)
        # Which strategies does the model use per class, and which look like shortcuts? (audit.py)
        audits = {}
        if whole and cfg.audit and len(idx):
            audits = run_audit(store, fast, layer, split.images, idx, settings, cfg.audit_features, data.key,
                               cfg.split)
        summary = db.summary()
    print_summary(summary)
    if audits:
        print_audit(audits, data.class_names)
    if trust:
        print_trust(trust)
        if cfg.figures:
            for path in plot_trust(trust, data.class_names, images_dir, title):
                print(f"wrote {path}")
    if whole and cfg.report:
        write_report(cfg, store, split, data.class_names, f"{title}: {run_name(cfg.checkpoint)}")
    return {"config": asdict(cfg), "summary": summary, "trust": trust, "audits": audits}


def method_params(cfg: ExplainConfig, model_name: str, device) -> dict[str, dict]:
    """Each --methods entry with the parameters its maps are stored under (its setting), and the
    precision of the predictions whose class it explains (stored with the setting)."""
    prediction = precision_name(amp_dtype(cfg.amp, device))
    return {m: {**METHODS[m].params(cfg, GRADCAM_LAYERS[model_name]), "prediction": prediction}
            for m in cfg.method_list}


def refuse_multi_label(task: str, source: str) -> None:
    if task.startswith("multi-label"):
        raise DataError(f"{source}: explaining multi-label tasks is not supported (there is no one class "
                        "to explain); evaluate it with evaluate.py")


def target_rule(targets: str, task: str) -> str:
    """--targets auto: the positive class of a binary task (the cancer logit), else the predicted one."""
    return ("positive" if task == BINARY else "predicted") if targets == "auto" else targets


def run_name(checkpoint: str) -> str:
    """The run folder's own name, also when the checkpoint was given through runs/latest."""
    return Path(checkpoint).resolve().parent.name


def write_report(cfg: ExplainConfig, store: RunStore, split, class_names, title: str) -> None:
    """--report: the HTML page of every stored map of this model on this split (gallery.py)."""
    t0 = time.perf_counter()
    images = Path(cfg.checkpoint).parent / "images"
    with ExplanationDB(cfg.db) as db:
        page = report_html(db, store.model_id, store.dataset, store.size, store.split, split.images, class_names,
                           title, [images / f"{n}.png" for n in ("sanity_check", "deletion_insertion", "localisation")])
    path = Path(cfg.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s); open it in a browser")


# ------------------------------------------------------------------------------------------------
# --images: a pathologist's own files

def explain_files(cfg: ExplainConfig, model, mcfg: dict, arch: dict, device, rank: int = 0, world: int = 1) -> dict:
    """Predict and explain every image file, --batch-size files at a time: each is stored as the
    sample of its SHA-256 (a rerun adds nothing), printed, written to predictions.csv and drawn at
    its own resolution. A file that cannot be read is one line on stderr and the others go on;
    the result's "problems" lists them (the command then exits 1)."""
    names, task = arch.get("class_names") or [str(c) for c in range(arch.get("num_classes", 9))], arch.get("task", "")
    refuse_multi_label(task, cfg.checkpoint)
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
        store = RunStore.open(db, checkpoint_sha256=file_digest(cfg.checkpoint, "sha256"), model=mcfg["model"],
                              config=mcfg, dataset="files", size=size, split=FILE_SPLIT)
        settings = store.add_settings(method_params(cfg, mcfg["model"], device))
        fast = inference_copy(model)
        layer = gradcam_layer(fast, mcfg["model"])
        for start in range(0, len(files), cfg.batch_size):
            tiles, sample_ids = [], []
            for path in files[start:start + cfg.batch_size]:
                try:
                    tile = read_tile(path, size, arch.get("in_channels", 3))
                    tile.label = (file_label(path, task == BINARY, TUMOR_CLASS) if cfg.labels_from_names
                                  else UNKNOWN_LABEL)
                    sample_ids.append(store.add_file(sha256=tile.sha256, path=str(path), width=tile.width,
                                                     height=tile.height, label=tile.label))
                except (TileError, StoreError) as e:
                    problems.append(str(e))
                    print(f"error: {e}", file=sys.stderr)
                    continue
                tiles.append(tile)
            if not tiles:
                continue
            x = normalise_stain(torch.stack([t.small for t in tiles]), arch.get("stain_norm"))
            scores = predict(model, x, 128, device, task, cfg.amp)
            pred, conf = scores.argmax(1), scores.max(1)
            new = [i for i, t in enumerate(tiles) if first.setdefault(t.sha256, t.path) == t.path]
            work = file_work(tiles, new, np.array(sample_ids), pred, conf, rule)
            stored = {}
            for method, sid in settings.items():
                written[method] += compute_maps(store, sid, fast, layer, x, work, method, cfg, device)
                rows = store.maps(sid, sample_ids=np.array(sample_ids)[new].tolist())
                for r in range(len(rows["sample_id"])):
                    stored.setdefault((method, int(rows["sample_id"][r])), (
                        rows["raw"][r] if rows["raw"] is not None else rows["maps"][r], int(rows["target"][r])))
            for i, t in enumerate(tiles):
                csv_rows.append({"path": str(t.path), "sha256": t.sha256, "width": t.width, "height": t.height,
                                 "predicted": names[pred[i]], "confidence": round(float(conf[i]), 6),
                                 "label": names[t.label] if t.label >= 0 else "",
                                 **{f"score_{n}": round(float(v), 6) for n, v in zip(names, scores[i])}})
                same = "" if first[t.sha256] == t.path else f" (the same image as {first[t.sha256]})"
                verdict = ("" if t.label < 0 else
                           f"; labelled {names[t.label]}: {'right' if t.label == pred[i] else 'WRONG'}")
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
        path, kept = write_predictions(out, csv_rows)
        print(f"wrote {path} ({len(csv_rows)} rows from this run" + (f", {kept} kept from earlier runs" if kept else "")
              + (")" if cfg.figure_grid or not cfg.figures else f") and figures in {out / 'figures'}"))
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


def write_predictions(folder: Path, rows: list[dict]) -> tuple[Path, int]:
    """predictions.csv in `folder`, with the rows of earlier runs kept: a file explained again
    replaces its own row (by path). A predictions.csv with other columns (another model's classes)
    is left as it is and this run's rows go to the first free predictions-N.csv. Returns the path
    written and how many earlier rows it kept."""
    path, header = folder / "predictions.csv", list(rows[0])
    earlier = []
    for n in range(2, 10_000):
        if not path.exists():
            break
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames == header:
                earlier = list(reader)
                break
        path = folder / f"predictions-{n}.csv"
    fresh = {r["path"] for r in rows}
    kept = [r for r in earlier if r["path"] not in fresh]
    write_csv(path, kept + rows)
    return path, len(kept)


# ------------------------------------------------------------------------------------------------
# Merging, and what the database holds

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
    """What the database holds: one line per model, method and data (image files as one line)."""
    width = max([24] + [len(r["dataset"]) for r in summary])
    print(f"in the database: {'model':9s} {'checkpoint':12s} {'method':10s} {'data':{width}s} {'split':5s} "
          f"{'maps':>6s} {'wrong':>6s} {'mean |δ|':>9s}  (δ: completeness gap of IG-type maps)")
    for row in summary:
        delta = "-" if np.isnan(row["mean_abs_delta"]) else f"{row['mean_abs_delta']:.2e}"
        print(f"{'':17s}{row['model']:9s} {row['sha256']} {row['method']:10s} {row['dataset']:{width}s} "
              f"{row['split']:5s} {row['n_maps']:6d} {row['n_errors']:6d} {delta:>9s}")


def _cli() -> None:
    if main().get("problems"):
        sys.exit(1)


if __name__ == "__main__":
    exit_with_one_line(_cli, (DataError, CheckpointError, DatabaseError))
