"""explain.py: IG completeness, Grad-CAM against a hand computation, the database round trip,
resume after a crash, image selection, bad inputs and figures, on a 60-image synthetic test split."""
import contextlib
import json
import dataclasses
import hashlib
import re
import shutil
import sqlite3
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attribution as A
import data as D
import explain as X
import figures
import model as M
from db import DatabaseError, ExplanationDB
from model import predict

SYNTHETIC_SIZES = (10, 10, 60)
SEEDS = np.arange(1000, 1100)  # per-map noise seeds for direct SmoothGrad calls  # train/val/test: the test split has 60 images, every class present


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split() -> D.Split:
    return D.load_data("synthetic", 28, "data", ("test",), seed=0, synthetic_sizes=SYNTHETIC_SIZES).splits["test"]


def _save(path: Path, name: str, net: torch.nn.Module) -> Path:
    """A checkpoint in the layout train.py writes."""
    cfg = {"dataset": "synthetic", "size": 28, "data_dir": "data", "model": name, "pretrained": False,
           "epochs": 1, "batch_size": 32, "lr": 1e-3, "seed": 0, "device": "cpu",
           "synthetic_sizes": ",".join(map(str, SYNTHETIC_SIZES))}  # explain.main rebuilds this test split
    arch = {"in_channels": 3, "num_classes": 9, "task": "multi-class", "class_names": list(D.SYNTHETIC_CLASSES),
            "flag": "synthetic", "data_source": "synthetic"}
    path.parent.mkdir(parents=True, exist_ok=True)
    M.save_checkpoint(path, {"model": net.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1,
                             "best_metric": 0.0, "config": cfg, "arch": arch})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, lightcnn_with_fitted_head) -> dict[str, tuple[Path, torch.nn.Module]]:
    """A LightCNN whose classifier head is fitted for a moment (predictions vary, some right, some
    wrong) and an untrained ResNet-50; both seeded, so every number below is reproducible."""
    root = tmp_path_factory.mktemp("ckpt")
    net = lightcnn_with_fitted_head(300, 1e-2, 200)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        resnet = M.build_model("resnet50", size=28).eval()
    return {"lightcnn": (_save(root / "lightcnn" / "best.pt", "lightcnn", net), net),
            "resnet50": (_save(root / "resnet50" / "best.pt", "resnet50", resnet), resnet)}


@pytest.fixture(scope="module")
def ckpt(models) -> dict[str, Path]:
    return {name: path for name, (path, _) in models.items()}


@pytest.fixture(scope="module")
def nets(models) -> dict[str, torch.nn.Module]:
    """The checkpoints' networks in eval mode, as load_checkpoint returns them (not reloaded: a
    state_dict round trip is exact, and rebuilding ResNet-50 costs seconds)."""
    return {name: net for name, (_, net) in models.items()}


@pytest.fixture(scope="module")
def light_pred(nets, split) -> np.ndarray:
    """LightCNN's class probabilities on the 60 test images, as explain.main computes them."""
    return predict(nets["lightcnn"], split.images, 512, "cpu", "multi-class")


def cli(checkpoint, db, *args, figures: bool = False) -> dict:
    """explain.py's main; predictions in float32 (--amp off) unless args say otherwise, so that the
    stored predicted classes can be compared with light_pred's exactly on every CPU; IG and Grad-CAM
    (the methods these tests compute by hand) unless args name others."""
    amp = [] if "--amp" in args else ["--amp", "off"]
    methods = [] if "--methods" in args else ["--methods", "ig,gradcam"]
    return X.main(["--checkpoint", str(checkpoint), "--db", str(db), "--device", "cpu", *amp, *methods,
                   *([] if figures else ["--no-figures"]), *map(str, args)])


@contextlib.contextmanager
def crash_on_chunk(monkeypatch, method: str, n: int):
    """Inside the block, the n-th batch `method` computes raises, as a crash would mid-run."""
    real, calls = X.METHODS[method], []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return real.attribute(*a, **k)

    monkeypatch.setitem(X.METHODS, method, dataclasses.replace(real, attribute=crashing))
    try:
        yield
    finally:
        monkeypatch.setitem(X.METHODS, method, real)


def read(db, **filters) -> dict[str, np.ndarray]:
    with ExplanationDB(db) as d:
        return d.maps(**filters)


def raw_rows(db) -> list[tuple]:
    """Every attribution row as stored, read with plain sqlite3 (created_at shows a rewrite)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT id, model_id, setting_id, sample_id, target, predicted, confidence, delta, "
                            "dtype, shape, map, raw_shape, raw, created_at FROM attributions ORDER BY id").fetchall()


def parts(out: A.Attribution) -> tuple:
    return out.maps, out.raw, out.delta


def logit(net, x, t) -> torch.Tensor:
    with torch.no_grad():
        return net(x).gather(1, t[:, None])[:, 0].double()


# ----------------------------------------------------------------------------- baselines

def test_baselines(split):
    x = D.normalize(split.images)
    black = A.make_baseline(x, "black")
    assert black.shape == x.shape and torch.equal(black, torch.full_like(x, -1.0))  # normalize(0) = -1

    mean = A.make_baseline(x, "mean")
    assert mean.shape == x.shape
    assert torch.equal(mean, mean[:, :, :1, :1].expand_as(x))  # constant per image and channel
    torch.testing.assert_close(mean[:, :, 0, 0], x.double().mean((2, 3)).float(), rtol=0, atol=1e-6)

    blur = A.make_baseline(x, "blur")
    assert blur.shape == x.shape
    # A 15x15 box (k = 28 // 4 * 2 + 1): at the centre pixel no padding is involved.
    torch.testing.assert_close(blur[:, :, 14, 14], x[:, :, 7:22, 7:22].mean((2, 3)), rtol=0, atol=1e-6)
    const = torch.full((1, 3, 28, 28), 0.3)
    torch.testing.assert_close(A.make_baseline(const, "blur"), const, rtol=0, atol=1e-6)
    # No structure left: pixel-to-pixel changes all but vanish, and the overall spread shrinks too
    # (what remains is the stain's slow variation across the image).
    step = lambda z: (z[..., 1:] - z[..., :-1]).abs().mean((1, 2, 3))
    assert (step(blur) < 0.15 * step(x)).all()
    assert (blur.std((2, 3)) < 0.7 * x.std((2, 3))).all()
    assert blur.std((2, 3)).mean() < 0.5 * x.std((2, 3)).mean()


# ----------------------------------------------------------------------------- IG completeness

def ig_relative_errors(net, x, t, baseline: str, steps: int) -> np.ndarray:
    """|sum(attr) - (f(x) - f(b))| / |f(x) - f(b)| per image, on logits (method_params: output "logit").

    Also checks the stored delta is Captum's sum(attr) - (f(x) - f(b)), to float32 rounding."""
    cfg = X.ExplainConfig(ig_steps=steps, baseline=baseline)
    attr, raw, delta = parts(A.integrated_gradients(net, None, x, t, cfg, SEEDS[:len(x)]))
    assert raw is None and attr.shape == x.shape and delta.shape == (len(x),)
    both = logit(net, torch.cat([x, A.make_baseline(x, baseline)]), t.repeat(2))  # one pass: ResNet-50 is slow
    diff = both[:len(x)] - both[len(x):]
    err = attr.double().sum((1, 2, 3)) - diff
    scale = attr.double().abs().sum((1, 2, 3)) + diff.abs()  # what float32 sums round against
    assert ((delta.double() - err).abs() <= 1e-5 * scale).all(), (delta, err)
    return (err.abs() / diff.abs()).numpy()


# Why these tolerances: Gauss-Legendre with n nodes is exact for polynomials of degree 2n-1 along the
# straight path, but these networks are piecewise linear in the input (ReLU, max-pool, BatchNorm in
# eval mode), so the integrand grad f(x(a)) . (x - b) is piecewise constant in a. Each kink the path
# crosses costs an error of order jump / n with either sign, so the error falls roughly like 1/n with
# scatter, not geometrically; per image it can even rise a little from 32 to 128 steps (it does for
# three of the six image/baseline pairs here), so the shrinking is asserted on the mean over images
# and baselines. Measured (trained-head LightCNN, test images 0-1), mean relative error 4.2e-2,
# 1.1e-2 and 7.8e-3 at 8, 32 and 128 steps, max 2.8e-2 at 128 steps (black baseline, image 0, whose
# logit difference is only 0.15). A wrong baseline, target or quadrature weight gives errors of order 1.
def test_ig_completeness_lightcnn(nets, split, light_pred):
    net = nets["lightcnn"]
    x, t = D.normalize(split.images[:2]), torch.from_numpy(light_pred[:2].argmax(1))
    rel = {n: np.concatenate([ig_relative_errors(net, x, t, b, n) for b in ("black", "blur", "mean")])
           for n in (8, 32, 128)}
    mean = {n: float(r.mean()) for n, r in rel.items()}
    assert mean[8] > mean[32] > mean[128], mean
    assert mean[128] < mean[8] / 4, mean
    assert mean[128] < 1e-2, mean
    assert rel[128].max() < 5e-2, rel[128]


def test_ig_completeness_resnet50(nets, split):
    """One image, 8 and 32 steps (128 would cost ~10 s per baseline on CPU). Measured relative errors
    for the predicted class at 8 / 32 / 128 steps: black 6.8e-3 / 6.6e-3 / 1.3e-3, blur 1.2e-2 /
    3.5e-3 / 3.2e-3, mean 2.5e-2 / 1.0e-2 / 9.0e-4. As for LightCNN the fall is not smooth (black
    barely moves from 8 to 32 steps), so the shrinking is asserted on the mean over the baselines."""
    net = nets["resnet50"]
    x = D.normalize(split.images[:1])
    with torch.no_grad():
        t = net(x).argmax(1)
    rel = {n: np.array([ig_relative_errors(net, x, t, b, n)[0] for b in ("black", "blur", "mean")]) for n in (8, 32)}
    assert rel[32].mean() < rel[8].mean() / 1.5, rel
    assert rel[8].max() < 5e-2 and rel[32].max() < 2e-2, rel


def test_ig_internal_batches_do_not_change_the_quadrature(nets, split, light_pred):
    """Splitting the 16 Gauss-Legendre nodes over 4 forward/backward passes gives the same map."""
    net = nets["lightcnn"]
    x, t = D.normalize(split.images[4:6]), torch.from_numpy(light_pred[4:6].argmax(1))
    whole, _, d_whole = parts(A.integrated_gradients(net, None, x, t, X.ExplainConfig(ig_steps=16), None))
    cfg = X.ExplainConfig(ig_steps=16, ig_internal_batch=10)
    pieces, _, d_pieces = parts(A.integrated_gradients(net, None, x, t, cfg, None))
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())
    torch.testing.assert_close(d_pieces, d_whole, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- Grad-CAM

@pytest.mark.parametrize("name, hw", [("lightcnn", 14), ("resnet50", 4)])
def test_gradcam_matches_hand_computation(nets, split, name, hw, hand_gradcam):
    net = nets[name]
    layer = M.gradcam_layer(net, name)
    n = 6 if name == "lightcnn" else 2
    x, t = D.normalize(split.images[:n]), torch.arange(n) % 9  # different targets within the batch
    up, raw, delta = parts(A.gradcam(net, layer, x, t, X.ExplainConfig(), None))
    cam = hand_gradcam(net, layer, x, t)
    assert delta is None and raw.shape == (n, hw, hw) and up.shape == (n, 28, 28)
    assert cam.max() > 0 and (cam[:, 0] > 0).any((1, 2)).sum() >= n // 2  # not a trivially zero map
    tol = 1e-6 * cam.max().item() + 1e-12
    torch.testing.assert_close(raw, cam[:, 0], rtol=0, atol=tol)
    expected_up = F.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, expected_up, rtol=0, atol=tol)


# ----------------------------------------------------------------------------- database round trip

def test_bfloat16_inference_agrees_with_float32(nets, split, light_pred):
    """evaluate.py's default on CPUs with AMX/AVX512-BF16: the same decisions and probabilities
    within a fraction of a percent (a wrong fold or cast would move them by far more)."""
    bf16 = predict(nets["lightcnn"], split.images, 128, "cpu", "multi-class", "on")
    assert np.abs(bf16 - light_pred).max() < 5e-3
    assert (bf16.argmax(1) == light_pred.argmax(1)).mean() >= 58 / 60  # near-ties may flip


def test_cli_maps_equal_direct_computation_bit_for_bit(ckpt, nets, split, light_pred, tmp_path):
    db32, db16 = tmp_path / "f32.db", tmp_path / "f16.db"
    # 20 images x 8 steps in internal passes of 64 (3 steps each): the direct call splits them alike.
    opts = ("--n", 20, "--batch-size", 64, "--ig-steps", 8, "--ig-internal-batch", 64)
    cli(ckpt["lightcnn"], db32, *opts, "--store-dtype", "float32")
    net, pred, conf = M.inference_copy(nets["lightcnn"]), light_pred.argmax(1), light_pred.max(1)
    # The CLI's batch: the first 20 test images in index order, one chunk of --batch-size 64, on the
    # inference copy explain.py runs (test_model checks that copy against the model itself).
    x, t = D.normalize(split.images[:20]).contiguous(memory_format=torch.channels_last), torch.from_numpy(pred[:20])
    cfg = X.ExplainConfig(ig_steps=8, ig_internal_batch=64)
    attr, _, delta = parts(A.integrated_gradients(net, None, x, t, cfg, None))
    up, raw, _ = parts(A.gradcam(net, M.gradcam_layer(net, "lightcnn"), x, t, cfg, None))

    ig, cam = read(db32, method="ig"), read(db32, method="gradcam")
    for rows in (ig, cam):
        np.testing.assert_array_equal(rows["index"], np.arange(20))
        np.testing.assert_array_equal(rows["label"], split.labels[:20].numpy())
        np.testing.assert_array_equal(rows["target"], pred[:20])
        np.testing.assert_array_equal(rows["predicted"], pred[:20])
        np.testing.assert_array_equal(rows["confidence"], conf[:20].astype(np.float64))
    assert ig["maps"].shape == (20, 3, 28, 28) and ig["raw"] is None
    np.testing.assert_array_equal(ig["maps"], attr.numpy())
    np.testing.assert_array_equal(ig["delta"], delta.numpy().astype(np.float64))
    assert cam["maps"].shape == (20, 28, 28) and cam["raw"].shape == (20, 14, 14)
    np.testing.assert_array_equal(cam["maps"], up.detach().numpy())
    np.testing.assert_array_equal(cam["raw"], raw.detach().numpy())
    assert np.isnan(cam["delta"]).all()

    cli(ckpt["lightcnn"], db16, *opts)  # float16 is the default
    for method in ("ig", "gradcam"):
        a, b = read(db32, method=method), read(db16, method=method)
        np.testing.assert_array_equal(b["maps"], a["maps"].astype(np.float16).astype(np.float32))
        if a["raw"] is not None:
            np.testing.assert_array_equal(b["raw"], a["raw"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(b["delta"], a["delta"])  # deltas are stored as REAL either way


def test_rerun_adds_nothing_and_new_settings_or_models_add_rows(ckpt, split, light_pred, tmp_path, capsys):
    db = tmp_path / "x.db"
    cli(ckpt["lightcnn"], db, "--n", 6, "--ig-steps", 8)
    before = raw_rows(db)
    assert len(before) == 12  # 6 images x (ig, gradcam)
    capsys.readouterr()

    out = cli(ckpt["lightcnn"], db, "--n", 6, "--ig-steps", 8)
    printed = capsys.readouterr().out
    assert f"ig: 0 maps written, 6 already in {db}" in printed
    assert f"gradcam: 0 maps written, 6 already in {db}" in printed
    assert raw_rows(db) == before  # not even rewritten: created_at unchanged
    errors = int((light_pred[:6].argmax(1) != split.labels[:6].numpy()).sum())
    assert sorted((r["method"], r["n_maps"], r["n_errors"]) for r in out["summary"]) == [
        ("gradcam", 6, errors), ("ig", 6, errors)]

    cli(ckpt["lightcnn"], db, "--n", 6, "--ig-steps", 16, "--methods", "ig")  # another setting
    after = raw_rows(db)
    assert after[:12] == before and len(after) == 18
    assert len({r[2] for r in after[12:]}) == 1 and after[12][2] not in {r[2] for r in before}

    cli(ckpt["resnet50"], db, "--n", 4, "--ig-steps", 8)  # another model
    final = raw_rows(db)
    assert final[:18] == after and len(final) == 26
    assert {r[1] for r in final[18:]} == {2} and {r[1] for r in after} == {1}
    with ExplanationDB(db) as d:
        maps = d.maps(model_id=2, method="gradcam")
    assert maps["raw"].shape == (4, 4, 4) and maps["maps"].shape == (4, 28, 28)


def test_interrupted_run_resumes_to_the_same_database(ckpt, tmp_path, monkeypatch, capsys):
    args = ("--batch-size", 8, "--n", 40, "--ig-steps", 4)
    resumed, clean = tmp_path / "resumed.db", tmp_path / "clean.db"
    with crash_on_chunk(monkeypatch, "ig", 3), pytest.raises(RuntimeError, match="simulated crash"):
        cli(ckpt["lightcnn"], resumed, *args)
    partial = read(resumed)
    assert len(partial["index"]) == 16  # two committed chunks of 8, nothing of the third
    np.testing.assert_array_equal(partial["index"], np.arange(16))

    capsys.readouterr()
    cli(ckpt["lightcnn"], resumed, *args)
    assert f"ig: 24 maps written, 16 already in {resumed}" in capsys.readouterr().out
    cli(ckpt["lightcnn"], clean, *args)
    for method in ("ig", "gradcam"):
        a, b = read(resumed, method=method), read(clean, method=method)
        assert len(a["index"]) == 40
        for key in ("index", "label", "target", "predicted", "confidence", "delta", "maps", "raw"):
            assert (a[key] is None and b[key] is None) or a[key].tobytes() == b[key].tobytes(), (method, key)


# ----------------------------------------------------------------------------- selection

def test_targets_both_true_and_predicted_without_duplicates(ckpt, split, light_pred, tmp_path):
    cli(ckpt["lightcnn"], tmp_path / "x.db", "--methods", "gradcam", "--targets", "both")
    rows = read(tmp_path / "x.db")
    pred, labels = light_pred.argmax(1), split.labels.numpy()
    assert 0 < (pred == labels).sum() < 60  # both cases occur
    assert len(rows["index"]) == 60 + (pred != labels).sum()
    for i in range(60):
        mine = rows["index"] == i
        assert sorted(rows["target"][mine]) == sorted({int(pred[i]), int(labels[i])})
    np.testing.assert_array_equal(rows["predicted"], pred[rows["index"]])


@pytest.mark.parametrize("args, expected", [
    (("--only-errors",), lambda p, y: np.flatnonzero(p != y)),
    (("--only-errors", "--n", 3), lambda p, y: np.flatnonzero(p != y)[:3]),
    (("--classes", "2,5"), lambda p, y: np.flatnonzero(np.isin(y, [2, 5]))),
    (("--indices", "14,3,15"), lambda p, y: np.array([3, 14, 15])),
    (("--indices", ",".join(map(str, range(20))), "--classes", "0,1,2", "--only-errors"),
     lambda p, y: np.flatnonzero((np.arange(60) < 20) & (y <= 2) & (p != y))),
    (("--targets", "true", "--n", 5), lambda p, y: np.arange(5)),
])
def test_selection(ckpt, split, light_pred, tmp_path, args, expected):
    cli(ckpt["lightcnn"], tmp_path / "x.db", "--methods", "gradcam", *args)
    rows = read(tmp_path / "x.db")
    pred, labels = light_pred.argmax(1), split.labels.numpy()
    want = expected(pred, labels)
    assert len(want) > 0
    np.testing.assert_array_equal(rows["index"], want)
    np.testing.assert_array_equal(rows["target"], (labels if "true" in args else pred)[want])


@pytest.mark.parametrize("indices", ["5,60", "-1"])
def test_bad_indices_raise_data_error(ckpt, tmp_path, indices):
    with pytest.raises(D.DataError, match="outside the split's 0..59"):
        cli(ckpt["lightcnn"], tmp_path / "x.db", f"--indices={indices}")
    assert not (tmp_path / "x.db").exists()


def test_unparsable_indices_raise_data_error(ckpt, tmp_path):
    with pytest.raises(D.DataError):
        cli(ckpt["lightcnn"], tmp_path / "x.db", "--indices", "3,x")


def test_empty_selection_with_figures(ckpt, split, light_pred, tmp_path):
    right = int(np.flatnonzero(light_pred.argmax(1) == split.labels.numpy())[0])
    run = tmp_path / "run"
    shutil.copytree(ckpt["lightcnn"].parent, run)
    try:
        cli(run / "best.pt", tmp_path / "x.db", "--indices", right, "--only-errors", "--methods", "gradcam",
            figures=True)
    except D.DataError:
        return
    assert len(read(tmp_path / "x.db")["index"]) == 0


# ----------------------------------------------------------------------------- bad files

def test_damaged_database_is_refused_and_left_untouched(ckpt, tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(np.random.default_rng(0).bytes(8192))
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(DatabaseError) as e:
        cli(ckpt["lightcnn"], bad, "--n", 2, "--methods", "gradcam")
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.db"]  # no -wal/-shm/-journal left behind


def test_missing_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nope" / "best.pt"
    with pytest.raises(M.CheckpointError, match=re.escape(str(missing))):
        cli(missing, tmp_path / "x.db")
    assert not (tmp_path / "x.db").exists()


# ----------------------------------------------------------------------------- figures

def test_figures_are_written_next_to_the_checkpoint(ckpt, split, tmp_path):
    assert len(np.unique(split.labels[:20])) == 9
    run = tmp_path / "run"
    shutil.copytree(ckpt["lightcnn"].parent, run)
    cli(run / "best.pt", tmp_path / "x.db", "--n", 20, "--ig-steps", 4, figures=True)
    for method in ("ig", "gradcam"):
        png = mpimg.imread(run / "images" / f"{method}_examples.png")
        # One row per class (all 9 occur among the first 20 images): a (2.3 * 9 + 0.6) in x 7.5 in
        # figure at 150 dpi, cropped to its contents (a few percent off each side).
        height, width = png.shape[:2]
        assert 0.9 * 3195 < height <= 3195 and 0.9 * 1125 < width <= 1125, (method, png.shape)


def test_plot_examples_true_colours_and_transparent_overlay(tmp_path, monkeypatch):
    """Row 0 pure red, row 1 pure blue; the IG map is positive in the top-left quadrant, negative in
    the bottom-left and zero on the right."""
    images = torch.zeros(2, 3, 28, 28, dtype=torch.uint8)
    images[0, 0] = 255
    images[1, 2] = 255
    m = np.zeros((2, 3, 28, 28), np.float32)
    m[:, :, :14, :14] = 1.0
    m[:, :, 14:, :14] = -1.0
    rows = {"index": np.array([0, 1]), "maps": m, "label": np.array([0, 1]), "predicted": np.array([0, 2]),
            "target": np.array([0, 2]), "confidence": np.array([0.9, 0.6])}
    figs = []
    real_close = figures.plt.close
    monkeypatch.setattr(figures.plt, "close", lambda fig: (figs.append(fig), real_close(fig)))
    path = tmp_path / "images" / "ig.png"
    figures.plot_examples(images, rows, list(D.SYNTHETIC_CLASSES), "ig", path, "test")
    png = mpimg.imread(path)[..., :3]
    height, width = png.shape[:2]

    def pixel(row, col, r, c):
        """PNG colour at image pixel (r, c) of panel (row, col)."""
        box = figs[0].axes[3 * row + col].get_position()
        x = box.x0 + (c + 0.5) / 28 * box.width
        y = box.y1 - (r + 0.5) / 28 * box.height
        return png[int((1 - y) * height), int(x * width)]

    red, blue = np.array([1.0, 0, 0]), np.array([0, 0, 1.0])
    np.testing.assert_allclose(pixel(0, 0, 14, 14), red, atol=2 / 255)
    np.testing.assert_allclose(pixel(1, 0, 14, 14), blue, atol=2 / 255)
    for r, c in ((7, 21), (21, 21), (21, 7)):  # zero and negative attribution: the image shows through
        np.testing.assert_allclose(pixel(1, 2, r, c), blue, atol=2 / 255)
        np.testing.assert_allclose(pixel(0, 2, r, c), red, atol=2 / 255)
    np.testing.assert_allclose(pixel(1, 2, 7, 7), [0.8, 0, 0.2], atol=3 / 255)  # red at alpha 0.8 over blue


# ----------------------------------------------------------------------------- SmoothGrad

def test_smoothgrad(nets, split, light_pred):
    net = nets["lightcnn"]
    x, t = D.normalize(split.images[8:10]), torch.from_numpy(light_pred[8:10].argmax(1))
    cfg = X.ExplainConfig(ig_steps=8, nt_samples=3)
    plain, _, plain_delta = parts(A.integrated_gradients(net, None, x, t, cfg, None))
    smooth, raw, delta = parts(A.smoothgrad(net, None, x, t, cfg, SEEDS[:2]))
    assert raw is None and smooth.shape == x.shape and delta.shape == (2,) and torch.isfinite(delta).all()
    assert (smooth - plain).norm() > 0.05 * plain.norm()  # the noise had an effect

    # Without noise, the 3 copies are the plain IG: the mean is plain IG and each image keeps its own
    # delta (this checks that copies are grouped per image, as NoiseTunnel's repeat_interleave lays out).
    assert abs(plain_delta[0] - plain_delta[1]) > 0.1 * plain_delta.abs().max()
    cfg0 = X.ExplainConfig(ig_steps=8, nt_samples=3, nt_stdev=0.0)
    same, _, same_delta = parts(A.smoothgrad(net, None, x, t, cfg0, SEEDS[:2]))
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-6 * plain.abs().max().item())
    torch.testing.assert_close(same_delta, plain_delta, rtol=1e-3, atol=1e-6)


def test_smoothgrad_resume_is_reproducible(ckpt, tmp_path, monkeypatch):
    args = ("--methods", "smoothgrad", "--batch-size", 2, "--n", 4, "--ig-steps", 4, "--nt-samples", 2)
    with crash_on_chunk(monkeypatch, "smoothgrad", 2), pytest.raises(RuntimeError, match="simulated crash"):
        cli(ckpt["lightcnn"], tmp_path / "resumed.db", *args)
    cli(ckpt["lightcnn"], tmp_path / "resumed.db", *args)
    cli(ckpt["lightcnn"], tmp_path / "clean.db", *args)
    a, b = read(tmp_path / "resumed.db"), read(tmp_path / "clean.db")
    assert a["maps"].tobytes() == b["maps"].tobytes()


@pytest.mark.parametrize("amp", ["auto", "on"])
def test_the_explained_class_is_the_class_evaluate_reported(ckpt, tmp_path, amp):
    """evaluate.py and explain.py predict in the same precision (--amp auto by default, bfloat16 on
    CPUs that have it; "on" forces bfloat16 on any CPU), so the class a map explains is the class the
    score file reports, and the stored setting says which precision chose it."""
    import evaluate as E
    from runtime import amp_dtype, precision_name
    from scores import read_scores_csv
    E.main(["--checkpoint", str(ckpt["lightcnn"]), "--device", "cpu", "--amp", amp, "--out", str(tmp_path / "eval")])
    (score_file,) = (tmp_path / "eval").glob("*.csv")
    _, _, scores = read_scores_csv(score_file)
    cli(ckpt["lightcnn"], tmp_path / "x.db", "--amp", amp, "--methods", "gradcam")
    rows = read(tmp_path / "x.db", method="gradcam")
    assert len(rows["index"]) == len(scores)
    np.testing.assert_array_equal(rows["predicted"], scores.argmax(1)[rows["index"]])
    np.testing.assert_array_equal(rows["target"], rows["predicted"])
    with contextlib.closing(sqlite3.connect(tmp_path / "x.db")) as conn:
        (params,), = conn.execute("SELECT params_json FROM settings WHERE method = 'gradcam'").fetchall()
    assert json.loads(params)["prediction"] == precision_name(amp_dtype(amp, torch.device("cpu")))
