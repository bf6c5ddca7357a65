"""Evaluate a trained classifier (or a saved score file) on one MedMNIST split.

Reports MedMNIST's official ACC/AUC (identical to medmnist.evaluator.getACC/getAUC) plus per-class
precision/recall/F1, balanced accuracy, expected calibration error and NLL, and writes the metrics
JSON, MedMNIST's standard score file and figures (confusion matrix, ROC curves, sample predictions).

Usage:
    # a checkpoint from train.py, on its own test split; outputs go to the run folder
    python evaluate.py --checkpoint runs/latest/best.pt --split test
    # the same checkpoint on the real 718-image PathMNIST test subset
    python evaluate.py --checkpoint runs/latest/best.pt --data-dir ../shared/data/pathmnist28_real_test718.npz
    # a score CSV (save_results format with labels, or MedMNIST's headerless format + --dataset)
    python evaluate.py --predictions ../shared/data/reference_resnet_scores_test.csv --out eval/reference
"""

import csv
import json
import math
import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from data import DataError, data_for_run, load_data, medmnist_info, normalize
from model import (AMP_CHOICES, CheckpointError, amp_dtype, autocast, inference_copy, load_checkpoint,
                   parse_config, precision_name, resolve_device)

matplotlib.use("Agg")  # figures only go to files; never needs a display
MULTI_LABEL = "multi-label, binary-class"
BINARY = "binary-class"
THRESHOLD = 0.5  # MedMNIST's getACC threshold for binary and multi-label tasks
DPI = 150


# ----------------------------------------------------------------------------- metrics

def roc_auc(y_true_binary, score) -> float:
    """Exact ROC AUC as the Mann-Whitney U statistic with average ranks for ties.

    Returns nan when y_true has a single class (as sklearn does, with a warning there).
    """
    y = np.asarray(y_true_binary).reshape(-1).astype(bool)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"roc_auc: {y.size} labels but {s.size} scores")
    if np.isnan(s).any():
        raise ValueError("roc_auc: scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last element of each tie group
    ranks = (last - (counts - 1) / 2.0)[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _as_label_vector(y_true) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"single-label task needs labels of shape (N,) or (N,1), got {y.shape}")
    return y.astype(np.int64)


def _single_label_probs(scores, task: str) -> np.ndarray:
    """(N, K) class probabilities; a 1-D binary score p becomes columns [1-p, p]."""
    s = np.asarray(scores, dtype=np.float64)
    if task == BINARY and (s.ndim == 1 or s.shape[1] == 1):
        p = s.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    if s.ndim != 2:
        raise ValueError(f"scores must have shape (N, K), got {s.shape}")
    return s


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """Top-label ECE: bins (k/n, (k+1)/n], gap |accuracy - mean confidence| weighted by bin count."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, hit, n_bins) - np.bincount(bins, conf, n_bins))
    return float(gap.sum() / max(count.sum(), 1))


def _multi_label_metrics(y_true, scores, class_names) -> dict:
    y = np.asarray(y_true).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"multi-label task needs labels and scores of equal shape (N, L), got "
                         f"{y.shape} and {s.shape}")
    pred = s > THRESHOLD
    aucs = [roc_auc(y[:, j], s[:, j]) for j in range(s.shape[1])]
    accs = [float((pred[:, j] == y[:, j].astype(bool)).mean()) for j in range(s.shape[1])]
    per_class = {name: {"auc": aucs[j], "acc": accs[j], "support": int(y[:, j].sum())}
                 for j, name in enumerate(class_names)}
    return {"acc": float(np.mean(accs)), "auc": float(np.mean(aucs)), "n": int(len(y)),
            "per_class": per_class}


def top_label(scores, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and its probability per row, by MedMNIST's getACC rule for the task."""
    probs = _single_label_probs(scores, task)
    if task == BINARY:  # MedMNIST thresholds the last column instead of taking the argmax
        pred = (probs[:, -1] > THRESHOLD).astype(np.int64)
    else:
        pred = probs.argmax(axis=1)
    return pred, probs[np.arange(len(probs)), pred]


def compute_metrics(y_true, scores, task: str, class_names: list[str], n_bins: int = 15) -> dict:
    """All metrics as a plain dict; "acc"/"auc" equal medmnist's getACC/getAUC for every task.

    task is INFO[flag]["task"]. scores are probabilities (softmax, or sigmoid for multi-label).
    An AUC that is undefined (a class absent from y_true) is nan, as in getAUC.
    """
    if task == MULTI_LABEL:
        return _multi_label_metrics(y_true, scores, class_names)
    y = _as_label_vector(y_true)
    probs = _single_label_probs(scores, task)
    n, k = probs.shape
    if len(y) != n or k != len(class_names):
        raise ValueError(f"{len(y)} labels, {n}x{k} scores, {len(class_names)} class names: shapes disagree")
    pred, confidence = top_label(probs, task)
    class_auc = [roc_auc(y == c, probs[:, c]) for c in range(k)]
    # binary: the AUC of the last column; multi-class and ordinal-regression: one-vs-rest macro AUC
    auc = class_auc[-1] if task == BINARY else float(np.mean(class_auc))

    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)  # rows = true class
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=precision + recall > 0)
    correct = pred == y
    p_true = np.clip(probs[np.arange(n), y], 1e-12, 1.0)  # scores of exactly 0 would give inf
    per_class = {
        name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
               "support": int(support[c]), "auc": class_auc[c]}
        for c, name in enumerate(class_names)
    }
    return {
        "acc": float(correct.mean()),
        "auc": auc,
        "n": int(n),
        "balanced_acc": float(recall[support > 0].mean()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
        "ece": expected_calibration_error(confidence, correct, n_bins),
        "nll": float(-np.log(p_true).mean()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def print_report(metrics: dict, class_names: list[str]) -> None:
    """Fixed-format summary: headline metrics, then one row per class."""
    head = f"n {metrics['n']}  acc {metrics['acc']:.4f}  auc {metrics['auc']:.4f}"
    if "ece" in metrics:
        head += (f"  ece {metrics['ece']:.4f}  nll {metrics['nll']:.4f}"
                 f"  bal_acc {metrics['balanced_acc']:.4f}  macro_f1 {metrics['macro_f1']:.4f}")
    print(head)
    width = max(len(name) for name in class_names)
    if "ece" in metrics:
        print(f"{'class':<{width}}  {'prec':>6} {'recall':>6} {'f1':>6} {'auc':>6} {'support':>7}")
        for name in class_names:
            m = metrics["per_class"][name]
            print(f"{name:<{width}}  {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f}"
                  f" {m['auc']:6.3f} {m['support']:7d}")
    else:
        print(f"{'label':<{width}}  {'acc':>6} {'auc':>6} {'support':>7}")
        for name in class_names:
            m = metrics["per_class"][name]
            print(f"{name:<{width}}  {m['acc']:6.3f} {m['auc']:6.3f} {m['support']:7d}")


# ----------------------------------------------------------------------------- score files

class ScoresFileError(ValueError):
    """A score CSV is missing or malformed; the message names the file and what is wrong."""


def read_scores_csv(path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Read a score CSV, rows sorted by id; returns (ids, labels or None, scores).

    Two formats: medmnist's save_results (header `id,true_0..,score_0..`, maybe a UTF-8 BOM,
    labels as floats like 2.0) and Evaluator's (no header, `index,score_0,...`, no labels).
    Labels come back int64 of shape (N,), or (N, L) when there are several true_ columns.
    """
    path = Path(path)

    def fail(what: str):
        raise ScoresFileError(f"{path}: {what}")

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r]
    except FileNotFoundError:
        fail("file not found; pass the path of an existing score CSV")
    except (UnicodeDecodeError, csv.Error) as e:
        fail(f"not a text CSV ({type(e).__name__}); expected rows of comma-separated numbers")
    except IsADirectoryError:
        fail("is a directory; pass a score CSV file")
    if not rows:
        fail("empty file; expected `id,true_0,score_0,...` or headerless `index,score_0,...` rows")

    header = [h.strip() for h in rows[0]]
    if _is_number(header[0]):
        header = None
        true_cols, score_cols = [], list(range(1, len(rows[0])))
    else:
        rows = rows[1:]
        true_cols = [i for i, h in enumerate(header) if h.startswith("true_")]
        score_cols = [i for i, h in enumerate(header) if h.startswith("score_")]
        if header[0] != "id" or not score_cols or len(true_cols) + len(score_cols) + 1 != len(header):
            fail(f"unrecognised header {','.join(header)!r}; expected id,true_0..,score_0..")
    if not rows or not score_cols:
        fail("no score rows; expected at least one row with an index and scores")
    width = len(header) if header else len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            fail(f"row {i + 1 + (header is not None)} has {len(r)} fields, expected {width} (ragged file)")
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError:
        bad = next(v for r in rows for v in r if not _is_number(v))
        fail(f"non-numeric value {bad!r}; every field after the header must be a number")
    if not np.isfinite(table).all():
        r, c = np.argwhere(~np.isfinite(table))[0]
        fail(f"NaN or infinite value in row {r + 1 + (header is not None)}, column {c + 1}")
    ids = table[:, 0]
    if (ids != np.round(ids)).any() or len(np.unique(ids)) != len(ids):
        fail("ids in the first column must be distinct integers")
    order = np.argsort(ids, kind="stable")
    table = table[order]
    labels = None
    if true_cols:
        labels = table[:, true_cols]
        if (labels != np.round(labels)).any():
            fail("true_ columns must hold integer class labels")
        labels = labels.astype(np.int64)
        labels = labels[:, 0] if labels.shape[1] == 1 else labels
    return table[:, 0].astype(np.int64), labels, table[:, score_cols]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def write_scores_csv(scores, out_dir, flag: str, size: int, split: str, acc: float, auc: float,
                     run) -> Path:
    """Write scores byte for byte as medmnist.Evaluator.evaluate does (standard file name, rows
    `index,score_0,...`, no header), so Evaluator.parse_and_evaluate can re-score the file.

    Evaluator.parse_and_evaluate takes the run from between "@" and the first ".", so characters
    other than letters, digits, "-" and "_" in run are replaced by "-".
    """
    size_flag = "" if size in (None, 28) else f"_{size}"
    run = re.sub(r"[^A-Za-z0-9_-]", "-", str(run))
    path = Path(out_dir) / f"{flag}{size_flag}_{split}_[AUC]{auc:.3f}_[ACC]{acc:.3f}@{run}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores)
    if scores.dtype != np.float32:  # float32 keeps its short repr, as pandas writes it
        scores = scores.astype(np.float64)
    text = scores.reshape(len(scores), -1).astype(str)  # shortest round-trip repr, as pandas
    path.write_text("".join(f"{i},{','.join(row)}\n" for i, row in enumerate(text)))
    return path


# ----------------------------------------------------------------------------- figures

def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion_matrix(cm, class_names: list[str], path, title: str) -> Path:
    """Row-normalised confusion matrix (each row sums to 100% of that true class)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    pct = 100 * np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * k, 1.0 + 0.65 * k))
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of true class")
    ax.set_xticks(range(k), class_names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k):
        for j in range(k):
            if pct[i, j] >= 0.05 or i == j:
                ax.text(j, i, f"{pct[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if pct[i, j] > 55 else "black")
    ax.set_title(title)
    return _save(fig, path)


def plot_roc_curves(y_true, scores, class_names: list[str], path, title: str) -> Path:
    """One-vs-rest ROC curve per class with its AUC; the title adds the macro AUC."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if s.ndim == 1:
        s = np.stack([1 - s, s], axis=1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    aucs = []
    for c, name in enumerate(class_names):
        positive = y[:, c] == 1 if y.ndim == 2 else y == c  # multi-label: one curve per label
        fpr, tpr = _roc_curve(positive, s[:, c])
        aucs.append(roc_auc(positive, s[:, c]))
        ax.plot(fpr, tpr, color=cmap(c % cmap.N), lw=1.4, label=f"{name} ({aucs[-1]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance (0.5)")
    ax.set(xlim=(-0.01, 1.0), ylim=(0.0, 1.01), xlabel="false positive rate",
           ylabel="true positive rate")
    ax.set_title(f"{title}\nmacro AUC {np.mean(aucs):.4f}")
    ax.legend(loc="lower right", fontsize=7, title="class (AUC)", title_fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _roc_curve(positive, score) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, highest score first."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    s, pos = np.asarray(score)[order], np.asarray(positive, dtype=bool)[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(pos)[last_of_tie]
    fp = np.cumsum(~pos)[last_of_tie]
    return np.r_[0, fp] / max(fp[-1], 1), np.r_[0, tp] / max(tp[-1], 1)


def plot_samples(images_uint8, y_true, y_pred, confidence, class_names: list[str], path,
                 title: str, ncols: int = 4) -> Path:
    """Grid of raw uint8 images in their true colours, titled true/pred; mistakes in red."""
    images = images_uint8.cpu().numpy() if torch.is_tensor(images_uint8) else np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"plot_samples shows raw uint8 images, got {images.dtype}; pass the "
                         "dataset images, not normalised model inputs")
    images = images.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.8 * nrows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        img = images[i]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        t, p = int(y_true[i]), int(y_pred[i])
        lines = [f"true: {class_names[t]}", f"pred: {class_names[p]} (p={float(confidence[i]):.2f})"]
        ax.set_title("\n".join(textwrap.fill(line, 30) for line in lines),  # long names wrap
                     fontsize=7.5, color="black" if t == p else "red")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------- model inference

@torch.inference_mode()
def predict(model, images_uint8, batch_size: int, device, task: str, amp: str = "off") -> np.ndarray:
    """Class probabilities (softmax; sigmoid for multi-label) for uint8 (N, C, H, W) images.

    Runs an inference_copy of the model (BatchNorm folded, channels_last) under --amp's autocast;
    probabilities are computed in float32 from the logits either way."""
    device = torch.device(device)
    net, dtype = inference_copy(model), amp_dtype(amp, device)
    activation = torch.sigmoid if task == MULTI_LABEL else (lambda z: torch.softmax(z, dim=1))
    probs = []
    for start in range(0, len(images_uint8), batch_size):
        x = normalize(images_uint8[start:start + batch_size].to(device, non_blocking=True))
        with autocast(device, dtype):
            logits = net(x.contiguous(memory_format=torch.channels_last))
        probs.append(activation(logits.float()).cpu())
    return torch.cat(probs).numpy()


# ----------------------------------------------------------------------------- main

@dataclass
class EvalConfig:
    checkpoint: str = field(default="runs/latest/best.pt", metadata={
        "help": "checkpoint from train.py; the model and its data settings are rebuilt from it"})
    predictions: str = field(default="", metadata={
        "help": "score CSV to evaluate instead of a checkpoint (save_results or MedMNIST format)"})
    split: str = field(default="test", metadata={"help": "train, val or test"})
    data_dir: str = field(default="", metadata={
        "help": "data directory or .npz file; empty = the one recorded in the checkpoint"})
    dataset: str = field(default="pathmnist", metadata={
        "help": "MedMNIST flag, used with --predictions (task, class names, labels if the CSV has none)"})
    size: int = field(default=28, metadata={"help": "image size, used with --predictions"})
    batch_size: int = field(default=128, metadata={"help": "inference batch (128 stays in a CPU's cache)"})
    amp: str = field(default="auto", metadata={"help": "bf16 (CPU) / fp16 (CUDA) autocast; auto: where the hardware has it; off: float32", "choices": AMP_CHOICES})
    out: str = field(default="", metadata={
        "help": "output folder; empty = the checkpoint's run folder (with --predictions: eval)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    run: str = field(default="", metadata={
        "help": "run name in the MedMNIST score file name; empty = the output folder's name"})


def main(argv=None) -> dict:
    cfg = parse_config(EvalConfig, argv)
    # Scores and labels: from a score file, or by running the checkpoint's model on the split.
    ev = scores_from_csv(cfg) if cfg.predictions else scores_from_checkpoint(cfg)
    metrics = compute_metrics(ev.labels, ev.scores, ev.task, ev.class_names)
    print(f"{cfg.split} split of {ev.name}: {ev.source}" + (f", {ev.precision}" if ev.precision else ""))
    print_report(metrics, ev.class_names)

    # Outputs: metrics JSON, MedMNIST's standard score file, and the figures.
    out = Path(cfg.out) if cfg.out else ev.default_out
    out.mkdir(parents=True, exist_ok=True)
    record = {"split": cfg.split, "dataset": ev.flag, "size": ev.size, "task": ev.task,
              "source": ev.source, "precision": ev.precision or None, "config": asdict(cfg), **metrics}
    json_path = out / f"{cfg.split}_metrics.json"
    json_path.write_text(json.dumps(_nan_to_none(record), indent=2, allow_nan=False) + "\n")
    write_scores_csv(ev.scores, out, ev.flag, ev.size, cfg.split, metrics["acc"],
                     metrics["auc"], cfg.run or out.resolve().name)
    what = f"{ev.name} {cfg.split} split, n={metrics['n']}"
    plot_roc_curves(ev.labels, ev.scores, ev.class_names, out / "images" / "roc_curves.png",
                    f"One-vs-rest ROC curves ({what})")
    if ev.task != MULTI_LABEL:
        plot_confusion_matrix(metrics["confusion_matrix"], ev.class_names,
                              out / "images" / "confusion_matrix.png",
                              f"Confusion matrix, % of each true class ({what})")
    if ev.images is not None and ev.task != MULTI_LABEL:
        pred, confidence = top_label(ev.scores, ev.task)
        k = min(16, len(pred))
        plot_samples(ev.images[:k], _as_label_vector(ev.labels)[:k], pred[:k], confidence[:k],
                     ev.class_names, out / "images" / f"{cfg.split}_samples.png",
                     f"First {k} images of the {ev.name} {cfg.split} split: true vs predicted "
                     "(mistakes in red)")
    print(f"wrote {json_path}, the MedMNIST score file and {out / 'images'}/*.png")
    return metrics


@dataclass
class Scored:
    """What main() evaluates: scores with their labels and the dataset they belong to."""
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
    precision: str = ""  # the model's inference precision; empty for a score file


def scores_from_checkpoint(cfg: EvalConfig) -> Scored:
    """Rebuild the model from its checkpoint and predict the split it was trained for."""
    device = resolve_device(cfg.device)
    model, train_cfg, _ = load_checkpoint(cfg.checkpoint, device)
    # The training seed matters for synthetic data: it generates the very same test split.
    data = data_for_run(train_cfg, (cfg.split,), cfg.data_dir)
    split = data.splits[cfg.split]
    scores = predict(model, split.images, cfg.batch_size, device, data.task, cfg.amp)
    return Scored(data.flag, data.size, data.task, data.class_names, split.labels.numpy(), scores,
                  split.images, f"{cfg.checkpoint} on {data.source}",
                  default_out=Path(cfg.checkpoint).resolve().parent, name=data.name,
                  precision=f"{precision_name(amp_dtype(cfg.amp, device))} (--amp {cfg.amp})")


def scores_from_csv(cfg: EvalConfig) -> Scored:
    """Scores from a CSV. Labels come from the file, else (with images) from --dataset's split."""
    ids, labels, scores = read_scores_csv(cfg.predictions)
    images, source = None, cfg.predictions
    if labels is not None and cfg.dataset != "synthetic":
        info = medmnist_info(cfg.dataset)  # task and class names need no data file
        task, class_names = info["task"], [info["label"][str(i)] for i in range(len(info["label"]))]
    else:
        data = load_data(cfg.dataset, cfg.size, cfg.data_dir or "data", splits=(cfg.split,))
        split = data.splits[cfg.split]
        if ids.max() >= len(split):
            raise ScoresFileError(f"{cfg.predictions}: ids go up to {ids.max()} but the {cfg.split} split "
                                  f"of {data.source} has {len(split)} images; pass the matching "
                                  "--dataset, --size and --data-dir")
        task, class_names = data.task, data.class_names
        labels = split.labels.numpy()[ids] if labels is None else labels
        images, source = split.images[ids], f"{source} (labels and images: {data.source})"
    if scores.shape[1] != len(class_names) and not (task == BINARY and scores.shape[1] == 1):
        raise ScoresFileError(f"{cfg.predictions}: {scores.shape[1]} score columns but {cfg.dataset} has "
                              f"{len(class_names)} classes; pass the matching --dataset")
    return Scored(cfg.dataset, cfg.size, task, class_names, labels, scores, images, source,
                  default_out=Path("eval"), name=Path(cfg.predictions).stem)


def _nan_to_none(obj):
    """Strict JSON: undefined metrics (nan) become null."""
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, ScoresFileError) as e:
        raise SystemExit(f"error: {e}") from None
