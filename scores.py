"""Score files: MedMNIST's own formats, read and written byte for byte.

    from scores import read_scores_csv, write_scores_csv
    ids, labels, scores = read_scores_csv("../shared/data/reference_resnet_scores_test.csv")
    write_scores_csv(scores, "eval", "pathmnist", 28, "test", acc, auc, run="mine")
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np


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
