"""evaluate.py: metrics against medmnist/sklearn and hand computations, score files, figures."""

import json
import math
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch
from medmnist import INFO
from medmnist.evaluator import Evaluator, getACC, getAUC
from sklearn.metrics import roc_auc_score

import evaluate as E
import figures as Fg
import metrics as Mx
import scores as S
from model import predict

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATH_NAMES = [INFO["pathmnist"]["label"][str(i)] for i in range(9)]


def reference_csv(split: str) -> Path:
    path = DATA / f"reference_resnet_scores_{split}.csv"
    if not path.exists():
        pytest.skip(f"{path} not found: the shared real-data folder is not mounted")
    return path


# ----------------------------------------------------------------------------- metrics vs medmnist

@pytest.mark.parametrize("split, acc, auc", [("test", 0.8643, 0.9776), ("val", 0.9695, None)])
def test_reference_scores_match_medmnist(split, acc, auc):
    ids, labels, scores = S.read_scores_csv(reference_csv(split))
    assert labels.dtype == np.int64 and labels.ndim == 1 and scores.shape == (len(ids), 9)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    m = Mx.compute_metrics(labels, scores, "multi-class", PATH_NAMES)
    assert m["acc"] == pytest.approx(getACC(labels, scores, "multi-class"), abs=1e-6)
    assert m["auc"] == pytest.approx(getAUC(labels, scores, "multi-class"), abs=1e-6)
    assert round(m["acc"], 4) == acc
    if auc is not None:
        assert round(m["auc"], 4) == auc
    assert m["n"] == len(ids) == sum(c["support"] for c in m["per_class"].values())
    assert np.sum(m["confusion_matrix"]) == m["n"]
    assert np.trace(m["confusion_matrix"]) / m["n"] == pytest.approx(m["acc"])
    json.dumps(m, allow_nan=False)  # plain JSON types only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    score = np.round(rng.normal(y * 0.7, 1.0) * 2) / 2  # few distinct values: many ties
    assert len(np.unique(score)) < 20
    assert Mx.roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert Mx.roc_auc(y, np.zeros(400)) == 0.5  # all tied
    assert math.isnan(Mx.roc_auc(np.ones(5), np.arange(5)))  # one class: undefined, like sklearn


def test_binary_class_matches_medmnist():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (300, 1))  # MedMNIST stores binary labels as (N, 1)
    p1 = np.round(rng.beta(2 + 3 * y[:, 0], 2), 2)
    p1[:10] = 0.5  # exactly at the threshold: MedMNIST predicts 0 (score > 0.5)
    for scores in (np.stack([1 - p1, p1], axis=1), p1):
        m = Mx.compute_metrics(y, scores, "binary-class", ["neg", "pos"])
        assert m["acc"] == pytest.approx(getACC(y, scores, "binary-class"), abs=1e-12)
        assert m["auc"] == pytest.approx(getAUC(y, scores, "binary-class"), abs=1e-12)
        assert m["confusion_matrix"][0][1] + m["confusion_matrix"][1][1] == int((p1 > 0.5).sum())


def test_multi_label_matches_medmnist():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (250, 5))
    scores = np.round(1 / (1 + np.exp(-rng.normal(2 * y - 1, 1.5))), 2)
    names = [f"label{i}" for i in range(5)]
    m = Mx.compute_metrics(y, scores, "multi-label, binary-class", names)
    assert m["acc"] == pytest.approx(getACC(y, scores, "multi-label, binary-class"), abs=1e-12)
    assert m["auc"] == pytest.approx(getAUC(y, scores, "multi-label, binary-class"), abs=1e-12)
    assert m["per_class"]["label3"]["auc"] == pytest.approx(roc_auc_score(y[:, 3], scores[:, 3]))
    assert m["per_class"]["label3"]["support"] == int(y[:, 3].sum())


def test_ordinal_regression_is_scored_as_multi_class():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 200)
    scores = rng.dirichlet(np.ones(5), 200)
    m = Mx.compute_metrics(y[:, None], scores, "ordinal-regression", list("abcde"))
    assert m["acc"] == pytest.approx(getACC(y[:, None], scores, "ordinal-regression"), abs=1e-12)
    assert m["auc"] == pytest.approx(getAUC(y[:, None], scores, "ordinal-regression"), abs=1e-12)


def test_hand_computed_case():
    # rows: probabilities for classes a, b, c; class c never occurs and is never predicted
    probs = np.array([[0.85, 0.15, 0], [0.85, 0.15, 0], [0.15, 0.85, 0], [0.35, 0.65, 0],
                      [0.65, 0.35, 0]])
    y = np.array([0, 1, 1, 1, 1])
    m = Mx.compute_metrics(y, probs, "multi-class", ["a", "b", "c"], n_bins=10)
    assert m["confusion_matrix"] == [[1, 0, 0], [2, 2, 0], [0, 0, 0]]
    assert m["acc"] == pytest.approx(3 / 5)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((1 / 3, 1, 0.5, 1))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((1, 0.5, 2 / 3, 4))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 0)
    assert m["balanced_acc"] == pytest.approx(0.75)  # classes absent from y_true are left out
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((0.5 * 1 + 2 / 3 * 4) / 5)
    # ECE, 10 bins: (0.8,0.9] holds 3 rows with accuracy 2/3 at confidence 0.85,
    # (0.6,0.7] holds 2 rows with accuracy 1/2 at confidence 0.65
    assert m["ece"] == pytest.approx(3 / 5 * abs(2 / 3 - 0.85) + 2 / 5 * abs(0.5 - 0.65))
    assert m["ece"] == pytest.approx(0.17)
    assert m["nll"] == pytest.approx(-np.log([0.85, 0.15, 0.85, 0.65, 0.35]).mean())
    assert math.isnan(c["auc"]) and math.isnan(m["auc"])  # as getAUC: nan when a class is absent


def test_ece_bin_edges():
    # bins are (k/n, (k+1)/n]: 0.5 falls in the lower of 2 bins (gap 0.5), 1.0 in the top one (gap 1)
    assert Mx.expected_calibration_error([0.5, 1.0], [1, 0], n_bins=2) == pytest.approx(0.75)
    assert Mx.expected_calibration_error([0.7, 0.7, 0.7], [1, 1, 0], n_bins=15) == pytest.approx(
        abs(2 / 3 - 0.7))


def test_print_report(capsys):
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    Mx.print_report(Mx.compute_metrics([0, 1, 1], probs, "multi-class", ["x", "y"]), ["x", "y"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("n 3  acc 0.6667  auc 1.0000  ece ")
    assert out[2].split() == ["x", "0.500", "1.000", "0.667", "1.000", "1"]


# ----------------------------------------------------------------------------- score files

def test_write_read_roundtrip_and_medmnist_parses_it(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 9, 60)
    scores = rng.dirichlet(np.ones(9), 60).astype(np.float32)
    m = Mx.compute_metrics(labels, scores, "multi-class", PATH_NAMES)
    for size in (28, 64):
        folder = tmp_path / str(size)
        path = S.write_scores_csv(scores, folder, "pathmnist", size, "test", m["acc"], m["auc"],
                                  run="run.1")
        size_flag = "" if size == 28 else "_64"
        assert path.name == (f"pathmnist{size_flag}_test_[AUC]{m['auc']:.3f}_[ACC]{m['acc']:.3f}"
                             "@run-1.csv")
        # the bytes Evaluator.evaluate writes for these scores
        assert path.read_text() == pd.DataFrame(scores).to_csv(header=None)
        ids, read_labels, read_scores = S.read_scores_csv(path)
        assert read_labels is None
        np.testing.assert_array_equal(ids, np.arange(60))
        np.testing.assert_array_equal(read_scores.astype(np.float32), scores)  # float32 round trip

        # medmnist itself re-scores the file, given a root holding the labels it expects
        np.savez(folder / f"pathmnist{size_flag}.npz", test_labels=labels[:, None])
        original = path.read_bytes()

        class LocalEvaluator(Evaluator):
            def __init__(self, flag, split, size=None):
                super().__init__(flag, split, size, root=str(folder))

        monkeypatch.chdir(tmp_path)
        got = LocalEvaluator.parse_and_evaluate(str(path))
        assert got.ACC == pytest.approx(m["acc"], abs=1e-12)
        assert got.AUC == pytest.approx(m["auc"], abs=1e-12)
        # Evaluator.evaluate rewrote the file under the name it computes itself: same name, same bytes
        assert sorted(p.name for p in folder.glob("*.csv")) == [path.name]
        assert path.read_bytes() == original


def test_read_headered_file_sorts_by_id(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("\ufeffid,true_0,score_0,score_1\n2,1.0,0.2,0.8\n0,0.0,0.9,0.1\n1,1.0,0.4,0.6\n",
                    encoding="utf-8")
    ids, labels, scores = S.read_scores_csv(path)
    np.testing.assert_array_equal(ids, [0, 1, 2])
    np.testing.assert_array_equal(labels, [0, 1, 1])
    np.testing.assert_array_equal(scores, [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])


def test_read_multi_label_file(tmp_path):
    path = tmp_path / "ml.csv"
    path.write_text("id,true_0,true_1,score_0,score_1\n0,1,0,0.7,0.2\n1,1,1,0.6,0.9\n")
    _, labels, scores = S.read_scores_csv(path)
    assert labels.shape == (2, 2) and scores.shape == (2, 2)
    np.testing.assert_array_equal(labels, [[1, 0], [1, 1]])


@pytest.mark.parametrize("name, content, what", [
    ("missing.csv", None, "not found"),
    ("empty.csv", b"", "empty"),
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00", "not a text CSV"),
    ("words.csv", b"0,0.1,abc\n1,0.2,0.8\n", "non-numeric"),
    ("ragged.csv", b"0,0.1,0.9\n1,0.2\n", "ragged"),
    ("nan.csv", b"id,true_0,score_0,score_1\n0,1.0,nan,0.5\n", "NaN"),
    ("header.csv", b"a,b,c\n0,0.1,0.9\n", "header"),
    ("dupes.csv", b"0,0.1,0.9\n0,0.2,0.8\n", "distinct"),
])
def test_read_bad_files(tmp_path, name, content, what):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        S.read_scores_csv(path)
    message = str(err.value)
    assert str(path) in message and what in message and "\n" not in message


# ----------------------------------------------------------------------------- figures

def png_pixels(path: Path) -> np.ndarray:
    assert path.exists() and path.stat().st_size > 5_000
    return mpimg.imread(path)[..., :3]  # RGB floats in [0, 1]


def test_confusion_matrix_and_roc_figures(tmp_path):
    rng = np.random.default_rng(4)
    y = rng.integers(0, 9, 300)
    scores = rng.dirichlet(np.ones(9), 300) + np.eye(9)[y]
    scores /= scores.sum(1, keepdims=True)
    m = Mx.compute_metrics(y, scores, "multi-class", PATH_NAMES)
    cm_png = Fg.plot_confusion_matrix(m["confusion_matrix"], PATH_NAMES, tmp_path / "a" / "cm.png",
                                     "Confusion matrix (synthetic)")
    roc_png = Fg.plot_roc_curves(y, scores, PATH_NAMES, tmp_path / "b" / "roc.png", "ROC (synthetic)")
    for path in (cm_png, roc_png):
        h, w, _ = png_pixels(path).shape
        assert h > 500 and w > 500


def test_plot_samples_keeps_true_colours(tmp_path):
    a, b = np.array([30, 160, 60]), np.array([200, 40, 120])
    checker = np.where((np.add.outer(np.arange(8), np.arange(8)) // 4 % 2)[..., None] == 0, a, b)
    rgb = np.stack([checker.transpose(2, 0, 1)] * 2).astype(np.uint8)  # (2, 3, 8, 8), 4x4 blocks
    path = Fg.plot_samples(torch.from_numpy(rgb), [0, 1], [0, 1], [0.97, 0.6], ["x", "y"],
                          tmp_path / "s.png", "two samples")
    pixels = np.round(png_pixels(path) * 255)

    def count(colour):
        return int((np.abs(pixels - colour).max(axis=-1) <= 1).sum())

    assert count(a) > 2 * 100 * 100 and count(b) > 2 * 100 * 100  # both images, exact colours
    assert count((a + b) // 2) < 0.01 * count(a)  # nearest neighbour: no blended block edges
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() == 0  # all predictions right: no red titles

    gray = np.full((1, 1, 8, 8), 77, dtype=np.uint8)
    path = Fg.plot_samples(gray, [1], [0], [0.6], ["x", "y"], tmp_path / "g.png", "one mistake")
    pixels = np.round(png_pixels(path) * 255)
    assert count(np.array([77, 77, 77])) > 100 * 100  # gray stays 77, not a colour map
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 10  # the wrong prediction's title is red

    with pytest.raises(ValueError, match="uint8"):
        Fg.plot_samples(rgb / 255.0, [0], [0], [1.0], ["x"], tmp_path / "n.png", "normalised")


# ----------------------------------------------------------------------------- main

def test_main_on_reference_predictions(tmp_path):
    csv_path = tmp_path / "reference.csv"
    shutil.copy(reference_csv("test"), csv_path)
    out = tmp_path / "eval"
    metrics = E.main(["--predictions", str(csv_path), "--out", str(out), "--run", "ref"])
    assert round(metrics["acc"], 4) == 0.8643 and round(metrics["auc"], 4) == 0.9776
    record = json.loads((out / "test_metrics.json").read_text())
    assert record["n"] == 7180 and record["acc"] == metrics["acc"] and record["source"] == str(csv_path)
    score_file = out / "pathmnist_test_[AUC]0.978_[ACC]0.864@ref.csv"
    np.testing.assert_array_equal(S.read_scores_csv(score_file)[2], S.read_scores_csv(csv_path)[2])
    for name in ("confusion_matrix.png", "roc_curves.png"):
        assert (out / "images" / name).stat().st_size > 20_000
    assert not (out / "images" / "test_samples.png").exists()  # a score file alone has no images


def real718() -> Path:
    path = DATA / "pathmnist28_real_test718.npz"
    if not path.exists():
        pytest.skip(f"{path} not found: the shared real-data folder is not mounted")
    return path


def test_main_headerless_predictions_take_labels_from_data(tmp_path):
    labels = np.load(real718())["test_labels"][:, 0]
    scores = np.full((718, 9), 0.01)
    scores[np.arange(718), labels] = 0.92
    scores[:100] = np.roll(scores[:100], 1, axis=1)  # the first 100 predictions are wrong
    csv_path = S.write_scores_csv(scores, tmp_path, "pathmnist", 28, "test", 0, 0, run="x")
    out = tmp_path / "eval"
    m = E.main(["--predictions", str(csv_path), "--data-dir", str(real718()), "--out", str(out)])
    assert m["n"] == 718 and m["acc"] == pytest.approx(618 / 718)
    assert m["per_class"]["debris"]["support"] == 26  # the subset's class counts, from the npz
    assert (out / "images" / "test_samples.png").stat().st_size > 50_000

    with pytest.raises(S.ScoresFileError, match="ids go up to 799"):
        bigger = S.write_scores_csv(np.full((800, 9), 1 / 9), tmp_path / "big", "pathmnist", 28,
                                    "test", 0, 0, run="x")
        E.main(["--predictions", str(bigger), "--data-dir", str(real718()), "--out", str(out)])


def test_main_rebuilds_checkpoint_and_writes_next_to_it(tmp_path):
    from model import build_model, save_checkpoint

    real = np.load(real718())
    subset = tmp_path / "pathmnist_test120.npz"  # 120 real test images keep the CPU forward pass short
    np.savez(subset, test_images=real["test_images"][:120], test_labels=real["test_labels"][:120])
    torch.manual_seed(0)
    net = build_model("lightcnn", 3, 9, 28)
    run_dir = tmp_path / "runs" / "toy"
    run_dir.mkdir(parents=True)
    config = {"dataset": "pathmnist", "size": 28, "data_dir": str(subset), "model": "lightcnn",
              "seed": 0, "batch_size": 64}
    save_checkpoint(run_dir / "best.pt", {"model": net.state_dict(), "config": config,
                                          "arch": {"in_channels": 3, "num_classes": 9}})
    m = E.main(["--checkpoint", str(run_dir / "best.pt"), "--device", "cpu", "--batch-size", "50", "--amp", "off"])

    # Independently: the plain network (no inference copy) on the file's images, sklearn's AUC.
    images = torch.from_numpy(real["test_images"][:120]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        probs = torch.softmax(net.eval()((images - 0.5) / 0.5).double(), 1).numpy()
    labels = real["test_labels"][:120, 0]
    top2 = np.sort(probs, 1)[:, -2:]
    ties = int((top2[:, 1] - top2[:, 0] < 1e-4).sum())  # float rounding may flip these, nothing else
    assert m["n"] == 120 and abs(m["acc"] * 120 - (probs.argmax(1) == labels).sum()) <= ties
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-4)
    record = json.loads((run_dir / "test_metrics.json").read_text())
    assert record["source"].endswith("pathmnist_test120.npz") and record["n"] == 120
    assert len(list(run_dir.glob("pathmnist_test_*@toy.csv"))) == 1
    for name in ("confusion_matrix.png", "roc_curves.png", "test_samples.png"):
        assert (run_dir / "images" / name).exists()


def test_predict_is_batched_softmax_or_sigmoid():
    import data

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(data.normalize(images))
    probs = predict(model, images, batch_size=3, device="cpu", task="multi-class")
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
    sig = predict(model, images, batch_size=3, device="cpu", task="multi-label, binary-class")
    np.testing.assert_allclose(sig, torch.sigmoid(logits).numpy(), atol=1e-6)
