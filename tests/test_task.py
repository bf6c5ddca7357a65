"""--task tumor: the binary cancer vs non-cancer task derived from PathMNIST's labels, its metrics
against scikit-learn, and a run through train.py, evaluate.py and explain.py (the cancer logit)."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import recall_score, roc_auc_score

import data as D
import explain as X
import train
from db import ExplanationDB
from metrics import compute_metrics, youden_threshold
from model import load_checkpoint, predict

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tumor_labels_come_from_the_nine_classes(shared_data):
    path = shared_data / "pathmnist28_real_test718.npz"
    classes = D.load_data("pathmnist", 28, path, ("test",))
    tumor = D.load_data("pathmnist", 28, path, ("test",), task="tumor")
    y9 = classes.splits["test"].labels
    assert torch.equal(tumor.splits["test"].labels, (y9 == 8).long()) and int((y9 == 8).sum()) == 122
    assert int(tumor.splits["test"].labels[y9 == 7].sum()) == 0  # stroma counts as non-cancer
    assert tumor.task == D.BINARY and tumor.class_names == ["non-cancer", "cancer"]
    assert tumor.key != classes.key and tumor.key.startswith("pathmnist28_real_test718-tumor-")
    assert torch.equal(tumor.splits["test"].images, classes.splits["test"].images)


def test_tumor_is_refused_for_other_flags():
    blood = D.Data("bloodmnist", 28, "multi-class", ["a"] * 8, 3, "x.npz", {})
    with pytest.raises(D.DataError, match="--task tumor is defined for pathmnist"):
        D.as_task(blood, "tumor")


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p1 = np.clip(0.35 * y + rng.random(300) * 0.65, 0, 1)
    m = compute_metrics(y, np.stack([1 - p1, p1], 1), D.BINARY, D.TUMOR_NAMES)
    pred = (p1 > 0.5).astype(int)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1)) and m["threshold"] == 0.5


def test_validation_threshold_maximises_youden_and_is_applied():
    """youden_threshold against a brute force over every cut; the operating point uses it."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.2 * y + 0.3 * rng.random(200), 0, 1)  # every score below 0.5: the 0.5 rule finds no cancer
    t = youden_threshold(y, p1)
    j = lambda c: (p1[y == 1] > c).mean() + (p1[y == 0] <= c).mean()
    assert j(t) == pytest.approx(max(j(c) for c in np.unique(p1)), abs=1e-12)  # no cut does better
    m = compute_metrics(y, np.stack([1 - p1, p1], 1), D.BINARY, D.TUMOR_NAMES, threshold=t)
    assert m["sensitivity"] == 0.0 and m["specificity"] == 1.0
    op = m["operating_point"]
    assert op["sensitivity"] == pytest.approx(recall_score(y, p1 > t)) and op["threshold"] == t
    assert op["specificity"] == pytest.approx(recall_score(y, p1 > t, pos_label=0)) and op["sensitivity"] > 0.5
    assert youden_threshold(np.ones(5, int), p1[:5]) == 0.5  # one class only: MedMNIST's rule


def test_train_evaluate_and_explain_the_cancer_logit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = train.main(["--dataset", "synthetic", "--epoch-steps", "1", "--synthetic-sizes", "96,48,48", "--task", "tumor", "--epochs", "1",
                      "--batch-size", "32", "--device", "cpu", "--amp", "off", "--out", str(tmp_path / "run")])
    assert "selected checkpoint (--select last: val auc" in capsys.readouterr().out  # --monitor auto: AUC for a binary task
    net, cfg, ckpt = load_checkpoint(run / "best.pt")
    assert cfg["task"] == "tumor" and ckpt["arch"]["task"] == D.BINARY and ckpt["arch"]["num_classes"] == 2
    test = D.load_data("synthetic", 28, splits=("test",), synthetic_sizes=(96, 48, 48), task="tumor").splits["test"]
    scores = predict(net, test.images, 64, "cpu", D.BINARY)
    y, pred = test.labels.numpy(), (scores[:, 1] > 0.5).astype(int)
    m = json.loads((run / "test_metrics.json").read_text())
    m = m.get("metrics", m)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1, zero_division=0))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0, zero_division=0))
    val = D.load_data("synthetic", 28, splits=("val",), synthetic_sizes=(96, 48, 48), task="tumor").splits["val"]
    t = youden_threshold(val.labels.numpy(), predict(net, val.images, 64, "cpu", D.BINARY)[:, 1])
    assert m["operating_point"]["threshold"] == pytest.approx(t)  # chosen on validation, applied to test
    assert m["operating_point"]["sensitivity"] == pytest.approx(float((scores[y == 1, 1] > t).mean()))
    X.main(["--checkpoint", str(run / "best.pt"), "--db", str(tmp_path / "x.db"), "--device", "cpu", "--n", "12",
            "--methods", "gradcam", "--no-figures"])
    with ExplanationDB(tmp_path / "x.db") as d:
        rows = d.maps(method="gradcam")
    assert len(rows["target"]) == 12 and (rows["target"] == 1).all()  # the cancer logit, whatever was predicted
    assert rows["label"].tolist() == y[:12].tolist()
