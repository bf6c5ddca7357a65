"""Image files (tiles.py, explain.py --images): MedMNIST's resize matched on a real tile, every pixel
format converted as documented, bad files named one by one while the others are stored, content
keys (a copy or a rename is the same sample, a rerun adds nothing), the CSV against a plain
forward pass and the stored Grad-CAM against a hand computation on the resized file."""
import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import explain as X
import model as M
import tiles as T
from db import ExplanationDB

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resize_matches_medmnist_on_a_real_tile(shared_data):
    """MUS-TCGA-AESPLIAR (CRC-VAL-HE-7K, JPEG re-encoded) is image 635 of the real 718-image
    PathMNIST test sample: our resize reproduces it to JPEG noise, and the filter matters."""
    path = shared_data / "crc_val_he_7k_tiles" / "MUS-TCGA-AESPLIAR.jpg"
    ref = np.load(shared_data / "pathmnist28_real_test718.npz")["test_images"][635].astype(np.float64)
    tile = T.read_tile(path, 28, 3)
    ours = tile.small.permute(1, 2, 0).numpy().astype(np.float64)
    assert tile.full.shape == (224, 224, 3) and tile.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert np.abs(ours - ref).mean() < 0.6 and np.abs(ours - ref).max() <= 4
    with Image.open(path) as im:
        bicubic = np.asarray(im.convert("RGB").resize((28, 28), Image.BICUBIC)).astype(np.float64)
    assert np.abs(bicubic - ref).mean() > 1.5  # another filter is measurably further from MedMNIST's


def test_pixel_formats_are_converted_as_documented(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3], rgba[4:, :, 3] = 200, 255, 0  # top half opaque red-ish, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    t = T.read_tile(tmp_path / "a.png", 8, 3)
    assert (t.full[:4] == [200, 0, 0]).all() and (t.full[4:] == 255).all()  # laid over white
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    t = T.read_tile(tmp_path / "g.png", 8, 3)
    assert (t.full == gray[..., None]).all() and t.small.shape == (3, 8, 8)  # repeated for an RGB model
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # mode I;16
    np.testing.assert_array_equal(T.read_tile(tmp_path / "g16.png", 8, 1).full[..., 0], gray)  # 16 -> 8 bits
    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "r.tif")
    t = T.read_tile(tmp_path / "r.tif", 28, 1)
    expected = np.asarray(Image.fromarray(rgb).convert("L").resize((28, 28), Image.BILINEAR))
    assert (t.width, t.height) == (10, 6) and t.small.shape == (1, 28, 28)
    np.testing.assert_array_equal(t.small[0].numpy(), expected)  # luminance, whole image stretched


@pytest.mark.parametrize("content, why", [(b"hello, not an image", "not an image PIL can read"),
                                          (None, "damaged image data")])
def test_unreadable_files_name_the_file_and_the_reason(tmp_path, content, why):
    path = tmp_path / "bad.png"
    if content is None:  # a real PNG cut short
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(path)
        content = path.read_bytes()[:80]
    path.write_bytes(content)
    with pytest.raises(T.TileError, match=rf"^{path}: {why}.*; "):
        T.read_tile(path, 28, 3)


def test_find_images_recurses_filters_and_names_missing_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.PNG", "a/b/y.tif", "a/b/z.jpeg", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    files, problems = T.find_images([tmp_path / "a", tmp_path / "a" / "notes.txt", tmp_path / "gone.png",
                                     tmp_path / "a" / "x.PNG"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/b/y.tif", "a/b/z.jpeg", "a/x.PNG", "a/notes.txt"]
    assert problems == [f"{tmp_path / 'gone.png'}: no such file or folder; check the path"]


@pytest.mark.parametrize("name, label", [("TUM-TCGA-AAHIDTWA.jpg", 8), ("CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif", 6),
                                         ("adi_001.png", 0), ("slide 3.png", -1), ("MUS-STR-mix.png", -1)])
def test_label_from_name(name, label):
    assert T.label_from_name(Path(name)) == label


# ----------------------------------------------------------------------------- explain.py --images

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, lightcnn_with_fitted_head):
    net = lightcnn_with_fitted_head(300, 1e-2, 200)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    cfg = {"dataset": "synthetic", "size": 28, "data_dir": "data", "model": "lightcnn", "seed": 0,
           "synthetic_sizes": "10,10,60"}
    arch = {"in_channels": 3, "num_classes": 9, "task": "multi-class", "class_names": list(D.PATHMNIST_CLASSES)}
    M.save_checkpoint(path, {"model": net.state_dict(), "epoch": 1, "config": cfg, "arch": arch})
    return path, net


@pytest.fixture
def folder(tmp_path):
    """Two real-looking tiles at 56 px (one named with its class), a copy under another name, a
    text file with an image's extension and a truncated PNG."""
    rng = np.random.default_rng(1)
    d = tmp_path / "tiles"
    (d / "sub").mkdir(parents=True)
    for name in ("TUM-one.png", "sub/two.tif"):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(d / name)
    shutil.copy(d / "TUM-one.png", d / "sub" / "copy.png")
    (d / "notes.png").write_text("not an image")
    (d / "cut.png").write_bytes((d / "sub" / "copy.png").read_bytes()[:100])
    return d


def run(ckpt_path, db, out, *paths, extra=()):
    """explain.py --images, predicting in float32 (--amp off) like the plain forward pass it is checked
    with, IG and Grad-CAM maps."""
    return X.main(["--checkpoint", str(ckpt_path), "--db", str(db), "--device", "cpu", "--amp", "off", "--methods", "ig,gradcam",
                   "--files-out", str(out), "--images", *map(str, paths), "--labels-from-names", *extra])


def test_images_are_predicted_stored_by_content_and_bad_files_named(ckpt, folder, tmp_path, capsys, hand_gradcam):
    path, net = ckpt
    db, out = tmp_path / "x.db", tmp_path / "out"
    result = run(path, db, out, folder)
    err = capsys.readouterr().err
    assert len(result["problems"]) == 2 and f"{folder / 'notes.png'}: not an image" in err
    assert f"{folder / 'cut.png'}: damaged image data" in err
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(Path(r["path"]).name for r in rows) == ["TUM-one.png", "copy.png", "two.tif"]
    # The CSV against a plain forward pass of the resized file.
    for r in rows:
        with Image.open(r["path"]) as im:
            x = torch.from_numpy(np.asarray(im.convert("RGB").resize((28, 28), Image.BILINEAR)).copy()).permute(2, 0, 1)
        with torch.no_grad():
            p = torch.softmax(net(D.normalize(x[None]).float()), 1)[0].numpy()
        scores = np.array([float(r[f"score_{n}"]) for n in D.PATHMNIST_CLASSES])
        np.testing.assert_allclose(scores, p, atol=1e-5)
        assert r["predicted"] == D.PATHMNIST_CLASSES[p.argmax()] and r["sha256"] == hashlib.sha256(
            Path(r["path"]).read_bytes()).hexdigest()
        assert r["label"] == (D.PATHMNIST_CLASSES[8] if "TUM" in r["path"] else "")
    # Two distinct images: two samples, one IG and one Grad-CAM map each; the copy is the same sample.
    with ExplanationDB(db) as d:
        cams = d.maps(method="gradcam", split="file")
        assert len(cams["sample_id"]) == 2 and len(d.maps(method="ig", split="file")["sample_id"]) == 2
        files = d.files(cams["sample_id"])
        assert {f["width"] for f in files.values()} == {56} and set(cams["label"].tolist()) == {-1, 8}
        summary = d.summary()
    assert sum(s["n_errors"] for s in summary) == sum(int(p != 8) for p, y in zip(cams["predicted"], cams["label"]) if y == 8)
    # The stored Grad-CAM (raw, at the layer's 14x14) against the hand computation on the resized file.
    two = next(r for r in rows if r["path"].endswith("two.tif"))
    with Image.open(two["path"]) as im:
        x = torch.from_numpy(np.asarray(im.resize((28, 28), Image.BILINEAR)).copy()).permute(2, 0, 1)[None]
    i = [files[s]["path"] for s in cams["sample_id"].tolist()].index(two["path"])
    t = torch.tensor([int(cams["target"][i])])
    inference = M.inference_copy(net)
    expected = hand_gradcam(inference, M.gradcam_layer(inference, "lightcnn"), D.normalize(x).float().requires_grad_(), t)
    np.testing.assert_allclose(cams["raw"][i], expected[0, 0].numpy(), rtol=2e-3, atol=2e-3 * float(expected.max()))
    assert (out / "figures").is_dir() and len(list((out / "figures").glob("*.png"))) == 2  # the copy is not drawn again

    # A rerun, a rename and a grid: nothing new is stored, the figure is one grid.
    (folder / "sub" / "two.tif").rename(folder / "renamed.tif")
    again = run(path, db, out, folder, extra=["--figure-grid", str(tmp_path / "grid.png")])
    printed = capsys.readouterr().out
    assert "ig: 0 maps written" in printed and "gradcam: 0 maps written" in printed
    with ExplanationDB(db) as d:
        ids = np.concatenate([d.maps(method=m, split="file")["sample_id"] for m in ("ig", "gradcam")])
        assert len(ids) == 4 and str(folder / "renamed.tif") in {f["path"] for f in d.files(ids).values()}
    assert len(again["files"]) == 3 and (tmp_path / "grid.png").exists()


def test_all_bad_files_exit_non_zero_and_keep_the_database(ckpt, folder, tmp_path):
    path, _ = ckpt
    db = tmp_path / "x.db"
    run(path, db, tmp_path / "out", folder / "TUM-one.png")
    argv = ["explain.py", "--checkpoint", str(path), "--db", str(db), "--device", "cpu", "--methods", "ig,gradcam", "--images",
            str(folder / "notes.png"), str(folder / "cut.png"), "--files-out", str(tmp_path / "out")]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as e:
        mp.setattr("sys.argv", argv)
        X._cli()
    assert e.value.code == 1
    with ExplanationDB(db) as d:
        assert [len(d.maps(method=m, split="file")["sample_id"]) for m in ("ig", "gradcam")] == [1, 1]  # untouched
