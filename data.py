"""Data: MedMNIST loading (download, MD5, validation), the synthetic stand-in, augmentation.

    from data import load_data, normalize
    data = load_data("pathmnist", size=28, data_dir="./data", splits=("train", "val"))
    x = normalize(data.splits["train"].images[:64])       # uint8 (N,C,H,W) -> model input

Every split is held in memory as one uint8 tensor (N,C,H,W): batches are index gathers, never a
PIL image per sample. Augmentation works on whole batches, on the device the model runs on.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import importlib.util
import os
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from synthetic import SPLITS, SYNTHETIC_CLASSES, make_synthetic  # SPLITS: MedMNIST's split names

SIZES = (28, 64, 128, 224)
# The first seed's Normalize(0.5, 0.5), as in MedMNIST's own experiments: maps [0,1] to [-1,1].
MEAN, STD = 0.5, 0.5

# MedMNIST's task strings that change how labels and scores are read (INFO[flag]["task"]).
MULTI_LABEL = "multi-label, binary-class"
BINARY = "binary-class"

PATHMNIST_CLASSES = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                     "normal colon mucosa", "cancer-associated stroma",
                     "colorectal adenocarcinoma epithelium"]


# Label tasks derived from a flag's own labels (train.py --task), so every data path works unchanged.
TASKS = ("classes", "tumor")
TUMOR_CLASS = 8  # PathMNIST's colorectal adenocarcinoma epithelium (TUM)
TUMOR_NAMES = ["non-cancer", "cancer"]


class DataError(Exception):
    """A data file is missing or malformed; the message names the file and the remedy."""


@dataclass
class Split:
    images: torch.Tensor               # uint8 (N, C, H, W)
    labels: torch.Tensor               # int64 (N,), or (N, L) 0/1 for multi-label tasks
    masks: torch.Tensor | None = None  # bool (N, H, W): where the class evidence is (synthetic only)
    # training.py's RandStainNA distribution of these images, computed once needed; not an init field, so a
    # Split made by dataclasses.replace (new images: stain normalisation, a fold) never inherits a stale one
    stain_style: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Data:
    flag: str                  # "pathmnist", "bloodmnist", ..., or "synthetic"
    size: int
    task: str                  # MedMNIST's task string, e.g. "multi-class"
    class_names: list[str]
    n_channels: int
    source: str                # the file the data came from, or how it was generated
    splits: dict[str, Split]
    name: str = ""             # for figures: "pathmnist_64", "synthetic-seed0", a file's stem
    stain_norm: dict | None = None  # train.py --stain-norm: the training split's stain reference

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @functools.cached_property
    def key(self) -> str:
        """What identifies this data in a database: the name and a hash of the file's bytes (or of
        the generator's settings), so two files with one stem, or two synthetic sets of other sizes,
        never share keys, while a copied or moved file keeps its key."""
        if self.flag == "synthetic":
            digest = hashlib.sha256(self.source.encode()).hexdigest()
        else:
            digest = file_digest(self.source, "sha256")
        return f"{self.name}-{digest[:12]}"


@functools.cache
def _medmnist_info_table() -> dict:
    """medmnist.INFO, read from medmnist/info.py alone: importing the package would also load
    pandas, scikit-learn and PIL (100 MiB and seconds of start-up) that .npz files never need."""
    if "medmnist" in sys.modules:
        return sys.modules["medmnist"].INFO
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("medmnist is not installed: pip install -r requirements.txt")
    path = Path(spec.submodule_search_locations[0]) / "info.py"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("medmnist_info", path))
    module.__spec__.loader.exec_module(module)
    return module.INFO


def medmnist_info(flag: str) -> dict:
    """MedMNIST's metadata for a 2D flag (URLs, MD5s, labels, task); clear error for others."""
    flags_2d = dataset_choices()[1:]
    if flag not in flags_2d:
        raise DataError(f"unknown dataset {flag!r}; choose one of: synthetic, {', '.join(flags_2d)}")
    return _medmnist_info_table()[flag]


def dataset_choices() -> list[str]:
    return ["synthetic"] + sorted(k for k in _medmnist_info_table() if not k.endswith("3d"))


def npz_path(flag: str, size: int, data_dir: str | os.PathLike) -> Path:
    """Where MedMNIST keeps a file: DIR/pathmnist.npz at 28, DIR/pathmnist_64.npz at 64, ..."""
    suffix = "" if size == 28 else f"_{size}"
    return Path(data_dir) / f"{flag}{suffix}.npz"


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file's bytes ("md5", "sha256"), read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def download(flag: str, size: int, data_dir: str | os.PathLike) -> Path:
    """Download a MedMNIST file with a progress bar and verify its MD5 before it is put in place."""
    from tqdm import tqdm
    info, key = medmnist_info(flag), "" if size == 28 else f"_{size}"
    url, md5 = info[f"url{key}"], info[f"MD5{key}"]
    path = npz_path(flag, size, data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".npz.part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=f"downloading {path.name}") as bar:
            while block := r.read(1 << 20):
                f.write(block)
                bar.update(len(block))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # offline, dropped, disk
        part.unlink(missing_ok=True)
        raise DataError(
            f"{path} not found and downloading {url} failed ({getattr(e, 'reason', e)}); download it "
            f"on a machine with internet into {path.parent}, or pass --data-dir DIR_OR_FILE.npz, "
            f"or use --dataset synthetic") from None
    got = file_digest(part, "md5")
    if got != md5:
        part.unlink()
        raise DataError(f"{url}: MD5 {got} does not match the expected {md5}; the download is "
                        f"corrupt, run again to retry or fetch {path.name} by hand")
    os.replace(part, path)
    return path


def load_data(dataset: str = "pathmnist", size: int = 28, data_dir: str | os.PathLike = "data",
              splits: tuple[str, ...] = SPLITS, seed: int = 0, download_missing: bool = True,
              synthetic_sizes: tuple[int, int, int] = (10000, 2000, 2000), task: str = "classes",
              remedies: Remedies | None = None) -> Data:
    """Load the requested splits of a MedMNIST flag or of the synthetic data set, labelled for
    `task` (TASKS; as_task).

    `data_dir` is a folder (files named as MedMNIST names them) or one .npz file in the same layout,
    such as a subset holding only `test_images`/`test_labels`. `remedies`: what the caller's user
    can do about a missing split or another image size (the defaults name --split and --size).
    """
    return as_task(_load(dataset, size, data_dir, splits, seed, download_missing, synthetic_sizes,
                         remedies or Remedies()), task)


def as_task(data: Data, task: str) -> Data:
    """`data` labelled for `task`: "classes", its own labels; "tumor", the second seed's cancer vs
    non-cancer question: 1 for colorectal adenocarcinoma epithelium (class 8), 0 for the other
    eight classes. Cancer-associated stroma (class 7) counts as non-cancer: it is the tumour's
    connective tissue, not tumour cells, and NCT-CRC-HE labels it apart from TUM. A binary MedMNIST
    task with two softmax outputs; its name and database key get a "-tumor" suffix."""
    if task == "classes":
        return data
    if task != "tumor":
        raise DataError(f"unknown task {task!r}; choose one of {TASKS}")
    if data.flag not in ("pathmnist", "synthetic"):
        raise DataError(f"--task tumor is defined for pathmnist (and synthetic data), not {data.flag}")
    splits = {k: Split(v.images, (v.labels == TUMOR_CLASS).long(), v.masks) for k, v in data.splits.items()}
    return Data(data.flag, data.size, BINARY, list(TUMOR_NAMES), data.n_channels, data.source, splits,
                f"{data.name}-tumor")


@dataclass(frozen=True)
class Remedies:
    """The end of a data error, in the words of the script that met it: each script chooses splits
    and sizes with other flags (train.py has no --split; a checkpoint fixes the size)."""
    split: str = "choose another --split or another file"
    size: str = "check --size and --dataset"


def remedies_for_checkpoint(checkpoint: str, size: int) -> Remedies:
    """A checkpoint's model reads one size only: the remedy is another file, or another model."""
    return Remedies(size=f"the model in {checkpoint} was trained on {size}x{size} images: pass a file of "
                         f"{size}x{size} images, or train a model on this one (train.py --data-dir FILE --size N)")


def _load(dataset, size, data_dir, splits, seed, download_missing, synthetic_sizes, remedies) -> Data:
    if size not in SIZES:
        raise DataError(f"size {size} is not offered; choose one of {SIZES}")
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"unknown split {s!r}; choose one of {SPLITS}")
    if dataset == "synthetic":
        arrays = make_synthetic(size, seed, dict(zip(SPLITS, synthetic_sizes)), splits)
        source = f"synthetic (seed {seed}, {'/'.join(map(str, synthetic_sizes))} train/val/test)"
        return Data("synthetic", size, "multi-class", list(SYNTHETIC_CLASSES), 3, source,
                    _validate(arrays, source, splits, 9, 3, size, "multi-class", remedies), f"synthetic-seed{seed}")
    info = medmnist_info(dataset)
    path = Path(data_dir)
    if path.is_file() and path.suffix != ".npz":
        raise DataError(f"{path}: is a file but not an .npz; --data-dir takes a folder of MedMNIST files "
                        "(e.g. data, where pathmnist.npz is downloaded) or one .npz file")
    if path.suffix != ".npz":
        path = npz_path(dataset, size, path)
        if not path.exists():
            if not download_missing:
                raise DataError(f"{path} not found; download {info['url' + ('' if size == 28 else f'_{size}')]} "
                                f"into {path.parent}, pass --data-dir DIR_OR_FILE.npz, or use --dataset synthetic")
            download(dataset, size, path.parent)
    elif not path.exists():
        raise DataError(f"{path} not found; check the --data-dir path")
    names = info["label"]
    class_names = [names[str(i)] for i in range(len(names))]
    task = info["task"]
    n_labels = len(class_names) if task.startswith("multi-label") else None
    return Data(dataset, size, task, class_names, info["n_channels"], str(path),
                _validate(_read_npz(path, splits), str(path), splits, len(class_names),
                          info["n_channels"], size, task, remedies, n_labels), path.stem)


def parse_split_sizes(text: str) -> tuple[int, int, int] | None:
    """'96,48,48' -> (96, 48, 48); None unless it is three positive integers."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        return None
    return sizes if len(sizes) == 3 and min(sizes) >= 1 else None


def data_for_run(cfg: dict, splits: tuple[str, ...], data_dir: str = "", checkpoint: str = "") -> Data:
    """The data a training config (a checkpoint's "config") describes, from `data_dir` if given:
    evaluate.py and explain.py rebuild the very same synthetic images from the seed and sizes.

    A model trained on synthetic data knows shapes, not tissue: a `data_dir` is refused for it."""
    if cfg["dataset"] == "synthetic" and data_dir:
        raise DataError(f"{checkpoint or 'the checkpoint'} was trained on synthetic data, whose classes are "
                        f"shapes, not tissue: it cannot be scored on {data_dir}; drop --data-dir to use its own "
                        "synthetic split, or pass a checkpoint trained on PathMNIST images")
    recorded = Path(cfg.get("data_dir", ""))
    if not data_dir and recorded.suffix == ".npz" and not recorded.exists():
        raise DataError(f"{recorded} not found: {checkpoint or 'the checkpoint'} records its data file as train.py "
                        "was given it; run from the folder you trained in, or pass --data-dir PATH")
    sizes = parse_split_sizes(cfg.get("synthetic_sizes", "10000,2000,2000")) or (10000, 2000, 2000)
    return load_data(cfg["dataset"], cfg["size"], data_dir or cfg["data_dir"], splits,
                     seed=cfg.get("seed", 0), synthetic_sizes=sizes, task=cfg.get("task", "classes"),
                     remedies=remedies_for_checkpoint(checkpoint or "the checkpoint", cfg["size"]))


def _read_npz(path: Path, splits) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            # A plain `images`/`labels` file (like the real tiles in ../shared/data) is one test split.
            alias = {f"test_{k}": k for k in ("images", "labels", "masks")
                     if k in keys and not any(key.endswith("_images") for key in keys)}
            wanted = [f"{s}_{k}" for s in splits for k in ("images", "labels", "masks")]
            return ({k: f[alias.get(k, k)] for k in wanted if alias.get(k, k) in keys}
                    | {"_keys": np.array(sorted(keys))})
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        if zipfile.is_zipfile(path) and "allow_pickle" in str(e):
            raise DataError(f"{path}: holds object (pickled) arrays, which are never loaded since unpickling "
                            f"can run code; save images and labels as numeric arrays (np.savez)") from None
        with open(path, "rb") as f:
            head = f.read(6)
        reason = ("a single .npy array, not an .npz archive" if head == b"\x93NUMPY" else
                  str(e) if zipfile.is_zipfile(path) else "neither a zip archive nor an .npy array")
        raise DataError(f"{path}: not a readable .npz file ({reason}); the file is truncated or corrupt, "
                        f"delete it and download it again") from None


def _validate(arrays: dict, source: str, splits, num_classes: int, n_channels: int, size: int,
              task: str, remedies: Remedies = Remedies(), n_labels: int | None = None) -> dict[str, Split]:
    """Check keys, dtypes, shapes and label ranges; return tensors in (N,C,H,W) layout."""
    out = {}
    keys = ", ".join(arrays.get("_keys", [])) or "none"
    for s in splits:
        if f"{s}_images" not in arrays or f"{s}_labels" not in arrays:
            raise DataError(f"{source}: has no {s!r} split (needs {s}_images and {s}_labels; "
                            f"keys present: {keys}); {remedies.split}")
        x, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if x.dtype != np.uint8:
            raise DataError(f"{source}: {s}_images has dtype {x.dtype}, expected uint8 images (0-255, as "
                            f"MedMNIST stores them); save the images as np.uint8")
        if x.ndim == 3 and n_channels == 1:
            x = x[..., None]
        if x.ndim == 4 and x.shape[1] == x.shape[2] != size and x.shape[3] == n_channels:
            raise DataError(f"{source}: {s}_images are {x.shape[1]}x{x.shape[2]}, not {size}x{size}; "
                            f"{remedies.size}")
        if x.ndim != 4 or x.shape[1:] != (size, size, n_channels):
            raise DataError(f"{source}: {s}_images has shape {x.shape}, expected "
                            f"(N, {size}, {size}, {n_channels}); {remedies.size}")
        if len(x) == 0:
            raise DataError(f"{source}: the {s!r} split is empty (0 images); {remedies.split}")
        if not np.issubdtype(y.dtype, np.integer) and not (
                np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
            raise DataError(f"{source}: {s}_labels has dtype {y.dtype}, expected integer labels; store "
                            f"whole class indices")
        width = n_labels or 1
        if y.shape != (len(x), width) and not (width == 1 and y.shape == (len(x),)):
            raise DataError(f"{source}: {s}_labels has shape {y.shape}, expected ({len(x)}, {width}): "
                            f"{'one 0/1 column per label' if n_labels else 'one class index'} per image")
        hi = 1 if n_labels else num_classes - 1
        if y.min() < 0 or y.max() > hi:
            raise DataError(f"{source}: {s}_labels has values in [{y.min()}, {y.max()}], "
                            f"expected [0, {hi}]; the labels are not those of this dataset: check --dataset")
        labels = torch.from_numpy(y.astype(np.int64).reshape(len(x), -1))
        masks = arrays.get(f"{s}_masks")
        if masks is not None and masks.shape != (len(x), size, size):
            raise DataError(f"{source}: {s}_masks has shape {masks.shape}, expected ({len(x)}, {size}, {size}): "
                            f"one evidence mask per image, at the images' size")
        out[s] = Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                       labels if n_labels else labels[:, 0],
                       None if masks is None else torch.from_numpy(masks.astype(bool)))
    return out


def save_npz(path: str | os.PathLike, data: Data) -> None:
    """Write splits in MedMNIST's npz layout (images N,H,W,C uint8; labels N,1), plus masks if any."""
    arrays = {}
    for s, sp in data.splits.items():
        arrays[f"{s}_images"] = sp.images.permute(0, 2, 3, 1).numpy()
        arrays[f"{s}_labels"] = sp.labels.reshape(len(sp), -1).numpy().astype(np.uint8)
        if sp.masks is not None:
            arrays[f"{s}_masks"] = sp.masks.numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def split_npz(src: str | os.PathLike, out: str | os.PathLike, flag: str = "pathmnist", size: int = 28,
              fractions: tuple[float, float] = (0.15, 0.15), seed: int = 0) -> dict[str, int]:
    """Split the one split of a file (e.g. a real test subset) into train/val/test, per class.

    For experiments on the few real images at hand: a model trained this way is trained on a few
    hundred images, and its numbers must be reported as such.
    """
    data = load_data(flag, size, src, ("test",))
    sp = data.splits["test"]
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for c in range(data.num_classes):
        idx = torch.nonzero(sp.labels == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val, n_test = (round(f * len(idx)) for f in fractions)
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    splits = {k: Split(sp.images[torch.cat(v).sort().values], sp.labels[torch.cat(v).sort().values])
              for k, v in parts.items()}
    save_npz(out, Data(data.flag, size, data.task, data.class_names, data.n_channels, str(src), splits))
    return {k: len(v) for k, v in splits.items()}


# ------------------------------------------------------------------------------------------------
# Normalisation and batch augmentation

def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (N,C,H,W) in [0,255] -> float model input."""
    return (x.float() / 255.0 - MEAN) / STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Model input -> float images in [0,1], for figures in true colours."""
    return (x * STD + MEAN).clamp(0, 1)


def split_parser():
    """The command line of `python data.py SRC OUT` (its own, as data.py is a module first)."""
    import argparse
    p = argparse.ArgumentParser(allow_abbrev=False, description="Split a one-split .npz (e.g. the real test "
                                "subset) into train/val/test per class, for experiments on real images.")
    p.add_argument("src", help="an .npz with one split (e.g. ../shared/data/pathmnist28_real_test718.npz)")
    p.add_argument("out", help="the .npz to write, with train, val and test splits")
    for flag, default in (("--dataset", "pathmnist"), ("--size", 28), ("--seed", 0)):
        p.add_argument(flag, type=type(default), default=default)
    return p


def _cli() -> None:
    a = split_parser().parse_args()
    n = split_npz(a.src, a.out, a.dataset, a.size, seed=a.seed)
    print(f"wrote {a.out}: {n['train']} train / {n['val']} val / {n['test']} test images, each class split alike")


if __name__ == "__main__":
    from runtime import exit_with_one_line
    exit_with_one_line(_cli, (DataError,))
