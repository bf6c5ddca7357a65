"""An evaluation of one split: scores with their labels (from a checkpoint or a score file), and the
outputs evaluate.py and train.py's final test write: metrics JSON, MedMNIST's score file, figures.

    from report import score_checkpoint, write_report
    scored = score_checkpoint("runs/latest/best.pt", "test", batch_size=128, amp="auto", device="cpu")
    metrics = write_report(scored, out=scored.default_out, run="", config={...})
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import BINARY, MULTI_LABEL, DataError, data_for_run, load_data, medmnist_info
from figures import plot_confusion_matrix, plot_roc_curves, plot_samples
from metrics import as_label_vector, compute_metrics, print_report, top_label, youden_threshold
from model import load_checkpoint, predict, stain_reference
from runtime import amp_dtype, precision_name, resolve_device
from scores import ScoresFileError, read_scores_csv, write_scores_csv


@dataclass
class Scored:
    """Scores with their labels and the dataset they belong to."""
    flag: str
    size: int
    task: str
    class_names: list[str]
    labels: np.ndarray  # (N,) class indices, or (N, L) 0/1 for multi-label
    scores: np.ndarray  # (N, K) probabilities
    images: torch.Tensor | None  # uint8 (N, C, H, W), None when only a score file was given
    source: str
    default_out: Path
    name: str  # what figures call the data: the flag, or the file it came from
    split: str = "test"
    precision: str = ""  # the model's inference precision; empty for a score file
    model: torch.nn.Module | None = None  # the model that scored them; None for a score file
    threshold: float | None = None  # binary tasks: the operating point chosen on the validation split
    stain: dict | None = None  # the checkpoint's stain normalisation (train.py --stain-norm), or None


def score_checkpoint(checkpoint: str, split: str, batch_size: int, amp: str, device: str,
                     data_dir: str = "", tta: bool = False) -> Scored:
    """Rebuild the model from its checkpoint and predict a split of the data it was trained on
    (or of `data_dir`): synthetic data is regenerated from the seed and sizes in the checkpoint."""
    device = resolve_device(device)
    model, train_cfg, ckpt = load_checkpoint(checkpoint, device)
    data = data_for_run(train_cfg, (split,), data_dir, checkpoint)
    images, labels = data.splits[split].images, data.splits[split].labels.numpy()
    stain = stain_reference(ckpt)
    scores = predict(model, images, batch_size, device, data.task, amp, tta=tta, stain=stain)
    threshold = None
    if data.task == BINARY and split != "val":  # an operating point chosen on validation, where there is one
        with contextlib.suppress(DataError):
            val = data_for_run(train_cfg, ("val",), data_dir, checkpoint).splits["val"]
            threshold = youden_threshold(val.labels.numpy(),
                                         predict(model, val.images, batch_size, device, data.task, amp, tta=tta,
                                                 stain=stain)[:, -1])
    return Scored(data.flag, data.size, data.task, data.class_names, labels, scores, images,
                  f"{checkpoint} on {data.source}", default_out=Path(checkpoint).resolve().parent,
                  name=data.name, split=split,
                  precision=f"{precision_name(amp_dtype(amp, device))} (--amp {amp})" + (", 8-fold TTA" if tta else ""),
                  model=model, threshold=threshold, stain=stain)


def score_file(path: str, split: str, dataset: str, size: int, data_dir: str) -> Scored:
    """Scores from a CSV. Labels come from the file, else (with images) from `dataset`'s split."""
    ids, labels, scores = read_scores_csv(path)
    images, source = None, path
    if labels is not None and dataset != "synthetic":
        info = medmnist_info(dataset)  # task and class names need no data file
        task, class_names = info["task"], [info["label"][str(i)] for i in range(len(info["label"]))]
    else:
        data = load_data(dataset, size, data_dir or "data", splits=(split,))
        part = data.splits[split]
        if ids.max() >= len(part):
            raise ScoresFileError(f"{path}: ids go up to {ids.max()} but the {split} split of {data.source} "
                                  f"has {len(part)} images; pass the matching --dataset, --size and --data-dir")
        task, class_names = data.task, data.class_names
        labels = part.labels.numpy()[ids] if labels is None else labels
        images, source = part.images[ids], f"{source} (labels and images: {data.source})"
    if scores.shape[1] != len(class_names) and not (task == BINARY and scores.shape[1] == 1):
        raise ScoresFileError(f"{path}: {scores.shape[1]} score columns but {dataset} has "
                              f"{len(class_names)} classes; pass the matching --dataset")
    return Scored(dataset, size, task, class_names, labels, scores, images, source,
                  default_out=Path("eval"), name=Path(path).stem, split=split)


def write_report(ev: Scored, out: Path, run: str, config: dict) -> dict:
    """Print the metrics, then write {split}_metrics.json, MedMNIST's score file and the figures
    into `out`; returns the metrics."""
    metrics = compute_metrics(ev.labels, ev.scores, ev.task, ev.class_names, threshold=ev.threshold)
    print(f"{ev.split} split of {ev.name}: {ev.source}" + (f", {ev.precision}" if ev.precision else ""))
    print_report(metrics, ev.class_names)
    out.mkdir(parents=True, exist_ok=True)
    record = {"split": ev.split, "dataset": ev.flag, "size": ev.size, "task": ev.task, "source": ev.source,
              "precision": ev.precision or None, "config": config, **metrics}
    json_path = out / f"{ev.split}_metrics.json"
    json_path.write_text(json.dumps(_nan_to_none(record), indent=2, allow_nan=False) + "\n")
    write_scores_csv(ev.scores, out, ev.flag, ev.size, ev.split, metrics["acc"], metrics["auc"],
                     run or out.resolve().name)
    what = f"{ev.name} {ev.split} split, n={metrics['n']}"
    plot_roc_curves(ev.labels, ev.scores, ev.class_names, out / "images" / "roc_curves.png",
                    f"One-vs-rest ROC curves ({what})")
    if ev.task != MULTI_LABEL:
        plot_confusion_matrix(metrics["confusion_matrix"], ev.class_names, out / "images" / "confusion_matrix.png",
                              f"Confusion matrix, % of each true class ({what})")
    if ev.images is not None and ev.task != MULTI_LABEL:
        pred, confidence = top_label(ev.scores, ev.task)
        k = min(16, len(pred))
        plot_samples(ev.images[:k], as_label_vector(ev.labels)[:k], pred[:k], confidence[:k], ev.class_names,
                     out / "images" / f"{ev.split}_samples.png",
                     f"First {k} images of the {ev.name} {ev.split} split: true vs predicted (mistakes in red)")
    print(f"wrote {json_path}, the MedMNIST score file and {out / 'images'}/*.png")
    return metrics


def _nan_to_none(obj):
    """Strict JSON: undefined metrics (nan) become null."""
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys) as a CSV file with a header, replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
