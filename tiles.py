"""Image files a user brings (PNG, JPEG, TIFF of any size): found, hashed, read and resized to the
model's input the way MedMNIST made its images.

    from tiles import find_images, read_tile
    paths, problems = find_images(["slides/", "extra.tif"])   # folders recurse
    tile = read_tile(paths[0], size=28, channels=3)
    tile.sha256, tile.full.shape, tile.small.shape             # '9f2c...', (224, 224, 3), (3, 28, 28)

How MedMNIST resized: PathMNIST's 28x28 images are the 224x224 NCT-CRC-HE / CRC-VAL-HE tiles
downsampled with an antialiased bilinear filter (PIL's Image.BILINEAR). Measured, not assumed: the
real CRC-VAL-HE-7K tile MUS-TCGA-AESPLIAR in ../shared/data is image 635 of the real 718-image test
sample, and PIL's bilinear reproduces it to a mean absolute difference of 0.47 grey levels (max 3,
JPEG noise of the tile's re-encoding), against 1.9 for bicubic, 2.9 for Lanczos, 3.1 for box and 17
for nearest (tests/test_tiles.py). The same filter is used for every input size. A non-square
image is resized whole (stretched), so that its map lands on every one of its pixels.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
RESAMPLE = Image.BILINEAR  # what MedMNIST's images match (module docstring)
# PathMNIST's classes by the codes of Kather et al.'s file names (ADI-..., CRC-VAL-HE-7K-NORM-...).
PATHMNIST_CODES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


class TileError(Exception):
    """A file that cannot be read as an image; the message names it and says why."""


@dataclass
class Tile:
    path: Path
    sha256: str
    full: np.ndarray          # (H, W, C) uint8 at the file's own resolution, C = the model's channels
    small: torch.Tensor       # (C, size, size) uint8: what the model sees
    label: int = -1           # true class, where known (explain.py --labels-from-names)

    @property
    def width(self) -> int:
        return self.full.shape[1]

    @property
    def height(self) -> int:
        return self.full.shape[0]


def find_images(paths) -> tuple[list[Path], list[str]]:
    """Files to read: every file named, and every image file (EXTENSIONS) under each folder named,
    recursively and sorted. Returns (files, one-line problems of paths that do not exist)."""
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS)
            if not found:
                problems.append(f"{p}: no {'/'.join(e[1:].upper() for e in EXTENSIONS[:4])} files in this folder; "
                                "give a folder that holds image files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder; check the path")
    seen = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))], problems


def read_tile(path: Path, size: int, channels: int) -> Tile:
    """The file's image at full resolution and resized to size x size, as `channels` (1 or 3)
    channels: RGBA and LA are laid over white (a slide's background), palettes expanded, 16-bit
    grayscale scaled to 8 bits, grayscale repeated for RGB models and RGB made luminance for
    grayscale ones; a multi-page TIFF gives its first page."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise TileError(f"{path}: cannot be read ({e.strerror or e}); check the path and its permissions") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            image = _as_channels(im, channels)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        why = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e).split(".")[0]
        raise TileError(f"{path}: {why}; give PNG, JPEG or TIFF files") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt image data
        raise TileError(f"{path}: damaged image data ({str(e) or type(e).__name__}); "
                        "re-export the image and try again") from None
    small = image if image.size == (size, size) else image.resize((size, size), RESAMPLE)
    full = np.asarray(image).reshape(image.height, image.width, channels)
    return Tile(Path(path), hashlib.sha256(raw).hexdigest(), full,
                torch.from_numpy(np.asarray(small).reshape(size, size, channels).copy()).permute(2, 0, 1).contiguous())


def _as_channels(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.round(a * 255 / top).clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        raise ValueError("floating-point pixels, not an 8- or 16-bit image")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB" if channels == 3 else "L")


def label_from_name(path: Path, class_codes=PATHMNIST_CODES) -> int:
    """The class whose code is one of the file name's '-'/'_'-separated words (TUM-TCGA-AAHIDTWA.jpg:
    8, CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif: 6); -1 when no code, or more than one, appears."""
    words = set(re.split(r"[-_. ]+", Path(path).stem.upper()))
    found = [i for i, code in enumerate(class_codes) if code in words]
    return found[0] if len(found) == 1 else -1


def file_label(path: Path, binary: bool, positive_class: int) -> int:
    """The true class a file's name gives (label_from_name), in the model's task: for a binary task
    (--task tumor) 1 for the positive class's code (TUM) and 0 for every other code."""
    label = label_from_name(path)
    return label if label < 0 or not binary else int(label == positive_class)
