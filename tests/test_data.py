"""data.py: real-file loading, clear errors for every way a file can be missing or bad, the synthetic
set's promises (determinism, masks, no colour shortcut), the npz round trip, normalisation and
augmentation."""
import hashlib
import http.client
import io
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from augment import augment
from data import DataError, denormalize, load_data, normalize, save_npz

REAL_COUNTS = [147, 78, 26, 60, 112, 60, 85, 28, 122]  # class counts of the 718 subset (data README)


def _valid_arrays(n=18, size=28, split="test"):
    rng = np.random.default_rng(0)
    return {f"{split}_images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            f"{split}_labels": (np.arange(n) % 9).astype(np.uint8)[:, None]}


def _one_line_naming(err: DataError, path) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# Real PathMNIST files

def test_real_test_subset_loads_exactly(shared_data):
    path = shared_data / "pathmnist28_real_test718.npz"
    d = load_data("pathmnist", 28, path, splits=("test",))
    test = d.splits["test"]
    assert list(d.splits) == ["test"]
    assert test.images.shape == (718, 3, 28, 28) and test.images.dtype == torch.uint8
    assert test.labels.shape == (718,) and test.labels.dtype == torch.int64
    assert torch.bincount(test.labels, minlength=9).tolist() == REAL_COUNTS
    with np.load(path) as f:
        raw_x, raw_y = f["test_images"], f["test_labels"]
    assert np.array_equal(test.images.numpy(), raw_x.transpose(0, 3, 1, 2))
    assert np.array_equal(test.labels.numpy(), raw_y[:, 0].astype(np.int64))
    assert test.masks is None
    assert (d.n_channels, d.num_classes, d.task) == (3, 9, "multi-class")
    assert d.class_names == data.PATHMNIST_CLASSES
    assert d.source == str(path)


def test_real_test_subset_has_no_train_split(shared_data):
    path = shared_data / "pathmnist28_real_test718.npz"
    with pytest.raises(DataError) as e:
        load_data("pathmnist", 28, path, splits=("train",))
    msg = _one_line_naming(e.value, path)
    assert "no 'train' split" in msg and "test_images" in msg  # says what the file does hold


def test_real_64_file_loads_at_64_from_a_data_dir(shared_data, tmp_path):
    with np.load(shared_data / "pathmnist64_real_132.npz") as f:
        x, y = f["images"], f["labels"]
    # MedMNIST's name for size 64 in a data folder: pathmnist_64.npz
    np.savez(tmp_path / "pathmnist_64.npz", test_images=x, test_labels=y)
    d = load_data("pathmnist", 64, tmp_path, splits=("test",), download_missing=False)
    test = d.splits["test"]
    assert test.images.shape == (132, 3, 64, 64)
    assert np.array_equal(test.images.numpy(), x.transpose(0, 3, 1, 2))
    assert np.array_equal(test.labels.numpy(), y[:, 0])
    assert d.size == 64


def test_real_64_file_at_size_28_names_shape_and_flag(shared_data, tmp_path):
    with np.load(shared_data / "pathmnist64_real_132.npz") as f:
        path = tmp_path / "p64.npz"
        np.savez(path, test_images=f["images"], test_labels=f["labels"])
    with pytest.raises(DataError) as e:
        load_data("pathmnist", 28, path, splits=("test",))
    msg = _one_line_naming(e.value, path)
    assert "test_images are 64x64, not 28x28" in msg and "--size" in msg


# ------------------------------------------------------------------------------------------------
# Missing files and downloads (no network is used: urlopen is replaced)

@pytest.mark.parametrize("size,name,url_key", [(28, "pathmnist.npz", "url"), (64, "pathmnist_64.npz", "url_64")])
def test_missing_file_without_download_says_where_and_how(tmp_path, size, name, url_key):
    with pytest.raises(DataError) as e:
        load_data("pathmnist", size, tmp_path, download_missing=False)
    msg = _one_line_naming(e.value, tmp_path / name)
    assert medmnist.INFO["pathmnist"][url_key] in msg
    assert "--data-dir" in msg and "--dataset synthetic" in msg


def test_missing_explicit_npz_file(tmp_path):
    path = tmp_path / "nowhere.npz"
    with pytest.raises(DataError) as e:
        load_data("pathmnist", 28, path)
    assert "not found" in _one_line_naming(e.value, path)


def test_offline_download_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        load_data("pathmnist", 28, tmp_path, splits=("test",))
    msg = _one_line_naming(e.value, tmp_path / "pathmnist.npz")
    assert medmnist.INFO["pathmnist"]["url"] in msg and "offline" in msg
    assert "--data-dir" in msg and "--dataset synthetic" in msg
    assert list(tmp_path.iterdir()) == []


class FakeResponse:
    """What urlopen returns: read(n) in chunks, headers, a context manager; optionally dies mid-way."""

    def __init__(self, payload: bytes, fail_after: int | None = None):
        self.buf, self.fail_after, self.sent = io.BytesIO(payload), fail_after, 0
        self.headers = {"Content-Length": str(len(payload))}

    def read(self, n=-1):
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise http.client.IncompleteRead(b"", 1)
        block = self.buf.read(min(n, 7000) if n > 0 else -1)  # small chunks: several reads
        self.sent += len(block)
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _serve(monkeypatch, payload: bytes, fail_after=None):
    urls = []

    def fake_urlopen(url, *a, **k):
        urls.append(url)
        return FakeResponse(payload, fail_after)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return urls


def test_download_with_wrong_md5_is_rejected_and_not_kept(tmp_path, monkeypatch):
    payload = b"<html>rate limited</html>" * 1000
    urls = _serve(monkeypatch, payload)
    with pytest.raises(DataError) as e:
        load_data("pathmnist", 28, tmp_path, splits=("test",))
    msg = str(e.value)
    assert "\n" not in msg and "MD5" in msg
    assert hashlib.md5(payload).hexdigest() in msg and medmnist.INFO["pathmnist"]["MD5"] in msg
    assert urls == [medmnist.INFO["pathmnist"]["url"]]
    assert list(tmp_path.iterdir()) == []


def test_download_with_right_md5_is_put_in_place_and_loaded(tmp_path, monkeypatch):
    src = tmp_path / "src.npz"
    np.savez(src, **_valid_arrays())
    payload = src.read_bytes()
    monkeypatch.setitem(medmnist.INFO["pathmnist"], "MD5", hashlib.md5(payload).hexdigest())
    _serve(monkeypatch, payload)
    out = tmp_path / "dl"
    d = load_data("pathmnist", 28, out, splits=("test",))
    assert sorted(p.name for p in out.iterdir()) == ["pathmnist.npz"]  # no .part left
    assert (out / "pathmnist.npz").read_bytes() == payload
    assert np.array_equal(d.splits["test"].images.numpy(), _valid_arrays()["test_images"].transpose(0, 3, 1, 2))


def test_download_dropped_mid_way_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    _serve(monkeypatch, b"x" * 50000, fail_after=14000)
    with pytest.raises(DataError) as e:
        load_data("pathmnist", 28, tmp_path, splits=("test",))
    _one_line_naming(e.value, tmp_path / "pathmnist.npz")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Corrupt or malformed files: each is a one-line DataError naming the file

def _replace(**changes):
    def write(path):
        arrays = _valid_arrays()
        arrays.update(changes)
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return write


def _truncated(path):
    np.savez(path, **_valid_arrays())
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def _corrupt_member(path):
    # Bit rot inside a compressed member; the zip directory at the end is intact.
    np.savez_compressed(path, **_valid_arrays())
    b = bytearray(path.read_bytes())
    for i in range(200, 2000):
        b[i] ^= 0x55
    path.write_bytes(bytes(b))


def _npy_named_npz(path):
    with open(path, "wb") as f:
        np.save(f, _valid_arrays()["test_images"])


N = 18
UNREADABLE = ("not a readable .npz file", "truncated or corrupt, delete it and download it again")
SHAPE = "check --size and --dataset"
# name -> (how the file is made bad, the reason the message must give, the remedy it must name)
CORRUPT = {
    "truncated": (_truncated, *UNREADABLE),
    "random_bytes": (_random_bytes, "neither a zip archive nor an .npy array", UNREADABLE[1]),
    "empty_file": (lambda p: p.write_bytes(b""), "neither a zip archive nor an .npy array", UNREADABLE[1]),
    "corrupt_member": (_corrupt_member, "Error -3 while decompressing data", UNREADABLE[1]),
    "npy_named_npz": (_npy_named_npz, "a single .npy array, not an .npz archive", UNREADABLE[1]),
    "object_arrays": (_replace(test_labels=np.array([None] * N, dtype=object)), "holds object (pickled) arrays",
                      "save images and labels as numeric arrays"),
    "float_images": (_replace(test_images=np.zeros((N, 28, 28, 3), np.float32)), "test_images has dtype float32",
                     "save the images as np.uint8"),
    "wrong_size": (_replace(test_images=np.zeros((N, 32, 32, 3), np.uint8)),
                   "test_images are 32x32, not 28x28", SHAPE),
    "wrong_channels": (_replace(test_images=np.zeros((N, 28, 28, 1), np.uint8)),
                       "test_images has shape (18, 28, 28, 1), expected (N, 28, 28, 3)", SHAPE),
    "channels_first": (_replace(test_images=np.zeros((N, 3, 28, 28), np.uint8)),
                       "test_images has shape (18, 3, 28, 28), expected (N, 28, 28, 3)", SHAPE),
    "label_9": (_replace(test_labels=np.full((N, 1), 9, np.uint8)), "test_labels has values in [9, 9], expected [0, 8]",
                "check --dataset"),
    "label_negative": (_replace(test_labels=np.full((N, 1), -1, np.int64)),
                       "test_labels has values in [-1, -1], expected [0, 8]", "check --dataset"),
    "label_fraction": (_replace(test_labels=np.full((N, 1), 0.5, np.float32)), "test_labels has dtype float32",
                       "store whole class indices"),
    "labels_2_columns": (_replace(test_labels=np.zeros((N, 2), np.uint8)), "test_labels has shape (18, 2), expected (18, 1)",
                         "one class index per image"),
    "labels_too_few": (_replace(test_labels=np.zeros((N - 1, 1), np.uint8)),
                       "test_labels has shape (17, 1), expected (18, 1)", "one class index per image"),
    "empty_split": (_replace(test_images=np.zeros((0, 28, 28, 3), np.uint8), test_labels=np.zeros((0, 1), np.uint8)),
                    "the 'test' split is empty (0 images)", "choose another --split or another file"),
    "no_labels": (_replace(test_labels=None), "has no 'test' split (needs test_images and test_labels; keys present: "
                  "test_images)", "choose another --split or another file"),
    "masks_wrong_shape": (_replace(test_masks=np.zeros((N, 14, 14), bool)),
                          "test_masks has shape (18, 14, 14), expected (18, 28, 28)", "one evidence mask per image"),
}


@pytest.mark.parametrize("make, reason, remedy", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_file_is_a_one_line_error_with_its_reason(tmp_path, make, reason, remedy):
    path = tmp_path / "pathmnist.npz"
    make(path)
    before = path.read_bytes()
    with pytest.raises(DataError) as e:
        load_data("pathmnist", 28, path, splits=("test",))
    _one_line_naming(e.value, path)
    assert reason in str(e.value) and remedy in str(e.value), str(e.value)
    assert path.read_bytes() == before  # a bad file is reported, never rewritten or deleted


# ------------------------------------------------------------------------------------------------
# Flags and sizes

def test_grayscale_flag_from_a_data_dir(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)  # OCTMNIST stores (N,28,28)
    y = (np.arange(12) % 4)[:, None].astype(np.uint8)
    np.savez(tmp_path / "octmnist.npz", test_images=x, test_labels=y)
    d = load_data("octmnist", 28, tmp_path, splits=("test",), download_missing=False)
    test = d.splits["test"]
    assert test.images.shape == (12, 1, 28, 28)
    assert np.array_equal(test.images[:, 0].numpy(), x)
    assert test.labels.tolist() == y[:, 0].tolist()
    info = medmnist.INFO["octmnist"]
    assert d.n_channels == 1 and d.num_classes == 4
    assert d.class_names == [info["label"][str(i)] for i in range(4)]
    # 4 classes: label 4 is out of range for this flag although it would be fine for pathmnist
    np.savez(tmp_path / "octmnist.npz", test_images=x, test_labels=np.full_like(y, 4))
    with pytest.raises(DataError, match=r"\[0, 3\]"):
        load_data("octmnist", 28, tmp_path, splits=("test",), download_missing=False)


@pytest.mark.parametrize("flag", ["nosuchmnist", "organmnist3d"])
def test_unknown_flag_lists_choices(tmp_path, flag):
    with pytest.raises(DataError) as e:
        load_data(flag, 28, tmp_path, download_missing=False)
    msg = str(e.value)
    assert flag in msg and "synthetic" in msg and "pathmnist" in msg and "octmnist" in msg
    assert "organmnist3d" not in msg.split(";", 1)[1]  # 3D flags are not offered


def test_unsupported_size_and_split(tmp_path):
    with pytest.raises(DataError, match="32.*28, 64, 128, 224"):
        load_data("pathmnist", 32, tmp_path, download_missing=False)
    with pytest.raises(DataError, match="'training'"):
        load_data("synthetic", 28, splits=("training",))


# ------------------------------------------------------------------------------------------------
# Synthetic data

def _synth(size=28, seed=0, sizes=(45, 18, 27), splits=data.SPLITS):
    return load_data("synthetic", size, splits=splits, seed=seed, synthetic_sizes=sizes)


@pytest.mark.parametrize("size", [28, 64])
def test_synthetic_shapes_counts_balance_masks(size):
    d = _synth(size)
    assert (d.flag, d.n_channels, d.num_classes) == ("synthetic", 3, 9)
    lo, hi = int(0.38 * size), int(0.5 * size) + 1  # box side in pixels, with pixel-centre rounding
    for split, n in zip(data.SPLITS, (45, 18, 27)):
        sp = d.splits[split]
        assert sp.images.shape == (n, 3, size, size) and sp.images.dtype == torch.uint8
        assert sp.labels.dtype == torch.int64
        assert torch.bincount(sp.labels, minlength=9).tolist() == [n // 9] * 9
        m = sp.masks
        assert m.shape == (n, size, size) and m.dtype == torch.bool
        width, height = m.any(1).sum(1), m.any(2).sum(1)
        assert torch.equal(width * height, m.sum((1, 2)))  # a solid axis-aligned box
        assert width.min() >= lo and width.max() <= hi and height.min() >= lo and height.max() <= hi
        area = m.float().mean((1, 2))
        assert 0.14 <= area.mean() <= 0.25
        assert area.min() >= lo * lo / size**2 and area.max() <= hi * hi / size**2


def test_synthetic_is_deterministic_per_seed_and_split():
    a, b, c = _synth(seed=3), _synth(seed=3), _synth(seed=4)
    for s in data.SPLITS:
        assert torch.equal(a.splits[s].images, b.splits[s].images)
        assert torch.equal(a.splits[s].labels, b.splits[s].labels)
        assert torch.equal(a.splits[s].masks, b.splits[s].masks)
        assert not torch.equal(a.splits[s].images, c.splits[s].images)
    assert not torch.equal(a.splits["val"].images[:18], a.splits["test"].images[:18])
    # A split depends only on (seed, split, size): other splits' counts or absence change nothing.
    alone = _synth(seed=3, sizes=(9, 9, 27), splits=("test",))
    assert torch.equal(alone.splits["test"].images, a.splits["test"].images)


@pytest.fixture(scope="module")
def synth_big():
    d = _synth(28, seed=0, sizes=(3000, 0, 1000), splits=("train", "test"))
    return d.splits["train"], d.splits["test"]


def test_synthetic_mean_colour_does_not_predict_class(synth_big):
    train, test = synth_big
    f_tr = train.images.float().mean((2, 3)) / 255
    f_te = test.images.float().mean((2, 3)) / 255
    mu, sd = f_tr.mean(0), f_tr.std(0)
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    torch.manual_seed(0)
    clf = torch.nn.Linear(3, 9)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(f_tr), train.labels)
        loss.backward()
        return loss
    opt.step(closure)
    acc = (clf(f_te).argmax(1) == test.labels).float().mean().item()
    assert acc <= 0.5, f"mean RGB predicts the class with accuracy {acc:.3f}: a colour shortcut"


def test_synthetic_evidence_is_inside_the_mask_only(synth_big):
    train, _ = synth_big
    x = train.images.float() / 255
    m = train.masks.unsqueeze(1)
    outside = (x * ~m).sum((2, 3)) / (~m).sum((2, 3))  # (N, 3) mean colour outside the box
    inside = (x * m).sum((2, 3)) / m.sum((2, 3))
    per_class_out = torch.stack([outside[train.labels == c].mean(0) for c in range(9)])
    per_class_in = torch.stack([inside[train.labels == c].mean(0) for c in range(9)])
    assert (per_class_out - outside.mean(0)).abs().max() < 0.02
    assert (per_class_in[:, None] - per_class_in[None]).abs().max() > 0.02


@pytest.mark.parametrize("size", [28, 64])
def test_save_npz_round_trip(tmp_path, size):
    d = _synth(size, seed=1, sizes=(18, 9, 9))
    path = tmp_path / "synthetic.npz"
    save_npz(path, d)
    back = load_data("pathmnist", size, path)
    for s in data.SPLITS:
        assert torch.equal(back.splits[s].images, d.splits[s].images)
        assert torch.equal(back.splits[s].labels, d.splits[s].labels)
        assert torch.equal(back.splits[s].masks, d.splits[s].masks)


# ------------------------------------------------------------------------------------------------
# Normalisation, augmentation

def test_normalize_denormalize():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = normalize(x)
    assert y.dtype == torch.float32
    assert y.min().item() == -1.0 and y.max().item() == 1.0
    assert y.flatten()[0].item() == -1.0 and y.flatten()[255].item() == 1.0
    assert torch.allclose(denormalize(y), x.float() / 255, atol=1e-6)


def _dihedral(img: torch.Tensor) -> list[torch.Tensor]:
    rots = [torch.rot90(img, k, (-2, -1)) for k in range(4)]
    return rots + [r.flip(-1) for r in rots]


def test_augment_without_rotation_is_a_dihedral_transform():
    x = torch.randn(200, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = augment(x, torch.Generator().manual_seed(1), max_degrees=0)
    assert y.shape == x.shape and y.dtype == x.dtype
    seen = set()
    for xi, yi in zip(x, y):
        hits = [k for k, t in enumerate(_dihedral(xi)) if torch.equal(t, yi)]
        assert len(hits) == 1
        seen.add(hits[0])
        assert torch.equal(xi.flatten().sort().values, yi.flatten().sort().values)
    assert seen == set(range(8))  # flips plus transpose reach the whole group


def test_augment_is_flips_then_rotation_in_one_resampling():
    """The single grid_sample equals the two-step definition: flips and transpose first (exact),
    then the small rotation, with the same random draws."""
    x = torch.rand(64, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    r = torch.rand(64, 4, generator=torch.Generator().manual_seed(9))  # augment's own first draw
    ref = torch.stack([xi.flip(-1) if ri[0] < 0.5 else xi for xi, ri in zip(x, r)])
    ref = torch.stack([xi.flip(-2) if ri[1] < 0.5 else xi for xi, ri in zip(ref, r)])
    ref = torch.stack([xi.transpose(-1, -2) if ri[2] < 0.5 else xi for xi, ri in zip(ref, r)])
    theta = (r[:, 3] * 2 - 1) * math.radians(10)
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin(), 0 * theta], 1),
                       torch.stack([theta.sin(), theta.cos(), 0 * theta], 1)], 1)
    grid = F.affine_grid(rot, list(ref.shape), align_corners=False)
    ref = F.grid_sample(ref, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    out = augment(x, torch.Generator().manual_seed(9))
    assert (out - ref).abs().max().item() < 1e-5


def test_augment_is_deterministic_and_rotation_reflects_borders():
    x = normalize(torch.randint(128, 256, (16, 3, 28, 28), generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8))
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not any(torch.equal(a[i], t) for i in range(16) for t in _dihedral(x[i]))  # it did rotate
    # Reflected borders and bilinear weights: values stay inside the image's own range (zero padding
    # would put 0, below this batch's minimum of 128/255*2-1, into the corners).
    lo, hi = x.amin((1, 2, 3)), x.amax((1, 2, 3))
    assert (a.amin((1, 2, 3)) >= lo - 1e-5).all() and (a.amax((1, 2, 3)) <= hi + 1e-5).all()



def test_medmnist_metadata_without_importing_medmnist():
    """URLs, MD5s and labels come from medmnist's own INFO, read without importing the package
    (which would load pandas and scikit-learn: 100 MiB of peak memory in every training run)."""
    code = ("import sys, json; sys.path.insert(0, '.'); import data; "
            "print(json.dumps([data.medmnist_info('pathmnist'), data.dataset_choices(), "
            "sorted(m for m in ('medmnist', 'pandas', 'sklearn') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(data.__file__).parent, capture_output=True,
                         text=True, check=True).stdout
    info, choices, imported = json.loads(out)
    assert info == medmnist.INFO["pathmnist"] and imported == []
    assert choices == ["synthetic"] + sorted(k for k in medmnist.INFO if not k.endswith("3d"))
