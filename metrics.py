"""Classification metrics exactly as MedMNIST computes them, plus calibration and per-class rates.

    from metrics import compute_metrics, print_report
    m = compute_metrics(labels, probs, task="multi-class", class_names=names)
    m["acc"], m["auc"]          # == medmnist.evaluator.getACC / getAUC for every task
    print_report(m, names)

All numpy: no scikit-learn (ROC AUC is the Mann-Whitney U statistic with tie-averaged ranks).
"""
from __future__ import annotations

import numpy as np

from data import BINARY, MULTI_LABEL

THRESHOLD = 0.5  # MedMNIST's getACC threshold for binary and multi-label tasks


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


def as_label_vector(y_true) -> np.ndarray:
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


def youden_threshold(y_true, p_positive) -> float:
    """The threshold on the positive class's probability that maximises sensitivity + specificity
    (Youden's J) on these labels: midway between neighbouring scores, 0.5 if a class is absent."""
    y, p = as_label_vector(y_true).astype(bool), np.asarray(p_positive, np.float64)
    if y.all() or not y.any():
        return THRESHOLD
    cuts = np.unique(p)
    cuts = np.concatenate([[cuts[0] - 1e-9], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-9]])
    j = [(p[y] > t).mean() + (p[~y] <= t).mean() for t in cuts]
    return float(cuts[int(np.argmax(j))])


def compute_metrics(y_true, scores, task: str, class_names: list[str], n_bins: int = 15,
                    threshold: float | None = None) -> dict:
    """All metrics as a plain dict; "acc"/"auc" equal medmnist's getACC/getAUC for every task.

    task is INFO[flag]["task"]. scores are probabilities (softmax, or sigmoid for multi-label).
    An AUC that is undefined (a class absent from y_true) is nan, as in getAUC.
    """
    if task == MULTI_LABEL:
        return _multi_label_metrics(y_true, scores, class_names)
    y = as_label_vector(y_true)
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
    binary = {}
    if task == BINARY:  # the positive class (last column) at MedMNIST's threshold, and at `threshold`
        binary = {"sensitivity": float(recall[-1]), "specificity": float(recall[0]), "threshold": THRESHOLD}
        if threshold is not None:
            at = probs[:, -1] > threshold
            binary["operating_point"] = {"threshold": float(threshold), "sensitivity": float(at[y == 1].mean()),
                                         "specificity": float((~at[y == 0]).mean())}
    return {
        "acc": float(correct.mean()),
        "auc": auc,
        **binary,
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
    if "sensitivity" in metrics:
        head += (f"  sensitivity {metrics['sensitivity']:.4f}  specificity {metrics['specificity']:.4f}"
                 f" (threshold {metrics['threshold']})")
        if "operating_point" in metrics:
            op = metrics["operating_point"]
            head += (f"; at the threshold chosen on validation ({op['threshold']:.3f}): sensitivity "
                     f"{op['sensitivity']:.4f}  specificity {op['specificity']:.4f}")
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
