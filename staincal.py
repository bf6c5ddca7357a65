"""How much H&E stain varies between laboratories, measured on real tiles, and the level of the
stain benchmark that covers it (docs/robustness.md, "Calibration").

    python staincal.py ../shared/data

Per image, the mean haematoxylin and eosin concentration of its tissue pixels (Ruifrok & Johnston's
unmixing, stain.to_hed) and its Macenko stain vectors (stainnorm, as torchstain computes them), on
both centres' real tiles: NCT-CRC-HE-100K (PathMNIST's train/val centre) and CRC-VAL-HE-7K (its
test centre). Between the centres, per class, the ratio of the test centre's tile to the training
centre's tile of the class: every one is below 1 (the test centre stains less). The calibrated
level of `hed_uniform` is the smallest level whose strongest draw takes a typical image's stain
at least as far as 90% of those ratios (the COVER quantile) in the direction they go, and as far
as the literature's spread between laboratories (Gray et al., 2015) in both directions. The
scale-and-offset change is not symmetric in ln: the level that makes a typical image's stain
twice as strong removes nearly all of it in the other direction (stain.LEVELS["hed_uniform"]
level 5 is that level).

Units. Concentrations here are in natural-log optical density, OD = -ln(I / I0), as stain.py
computes them. scikit-image's rgb2hed (>= 0.19) divides by ln(10^6) = 13.8: SKIMAGE_UNIT. A
scale factor means the same in both conventions; an additive offset does not: an offset of 0.05 in
scikit-image's units is 0.69 here, more than twice a typical image's whole haematoxylin.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from runtime import exit_with_one_line
from stain import OD_FLOOR, RGB_FROM_HED, to_hed
from stainnorm import macenko_stains

SKIMAGE_UNIT = math.log(1e6)  # our concentration = scikit-image's rgb2hed x this
COVER = 0.9                   # the share of the measured between-centre changes the calibrated level reaches
CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
# Gray et al. (J Clin Pathol 68:192, 2015): the H:E ratio of the same control tissue (appendix)
# stained by six regional laboratories ranged from 0.57 to 0.89.
LITERATURE_HE_RATIO = (0.57, 0.89)


def tissue_concentrations(x: torch.Tensor, min_od: float = 0.3) -> torch.Tensor:
    """Mean H and E concentration of each image's tissue pixels (optical density summed over RGB
    above min_od; the whole image where there is too little tissue): (N, 2)."""
    c = to_hed(x)[:, :2]
    tissue = (-x.clamp(min=OD_FLOOR).log()).sum(1, keepdim=True) > min_od
    tissue = torch.where(tissue.flatten(1).sum(1).view(-1, 1, 1, 1) < 100, torch.ones_like(tissue), tissue)
    return (c * tissue).sum((2, 3)) / tissue.sum((2, 3))


def stain_vector_angles(x: torch.Tensor) -> torch.Tensor:
    """Per image, the angle in degrees between its Macenko H and E vectors and Ruifrok & Johnston's
    (N, 2); NaN where an image has too little tissue to estimate them."""
    he, _, _, ok = macenko_stains((x * 255).round())
    ref = RGB_FROM_HED[:2].double().T  # (3, 2)
    cos = (torch.nn.functional.normalize(he, dim=1) * ref).sum(1).clamp(-1, 1)
    return torch.where(ok[:, None], torch.rad2deg(torch.acos(cos)), torch.nan)


def covering_level(change: float, c: float, sign: int) -> float:
    """The smallest hed_uniform level whose strongest draw in direction `sign` (+1 more stain, -1
    less) changes an image of mean concentration c by at least `change` in |ln ratio|."""
    return (math.exp(change) - 1 if sign > 0 else 1 - math.exp(-change)) / (1 + 1 / c)


def _load_tiles(folder: Path):
    from PIL import Image
    for name in ("nct_crc_he_224_real_9.npz", "crc_val_he_7k_tiles", "pathmnist28_real_test718.npz"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} not found: give the folder of the shared real data "
                                    "(python staincal.py ../shared/data)")
    as_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    nct = np.load(folder / "nct_crc_he_224_real_9.npz")
    tiles = {}  # one entry per tile: the .tif original where both a .tif and a .jpg exist
    for path in sorted((folder / "crc_val_he_7k_tiles").iterdir(), key=lambda p: p.suffix != ".tif"):
        tiles.setdefault(path.stem.removeprefix("CRC-VAL-HE-7K-"), path)
    val = [(CLASSES.index(s.split("-")[0]), np.array(Image.open(p).convert("RGB"))) for s, p in tiles.items()]
    small = np.load(folder / "pathmnist28_real_test718.npz")
    return {"NCT-CRC-HE-100K, 224 px": (as_float(nct["images"]), nct["labels"][:, 0]),
            "CRC-VAL-HE-7K, 224 px": (as_float(np.stack([v for _, v in val])), np.array([y for y, _ in val])),
            "CRC-VAL-HE-7K, PathMNIST 28 px": (as_float(small["test_images"]), small["test_labels"][:, 0])}


def calibrate(folder: Path) -> dict:
    """Per-image stain statistics of both centres, the between-centre ratios per class, and the
    calibrated hed_uniform level."""
    sets = _load_tiles(folder)
    stats = {}
    for name, (x, y) in sets.items():
        tissue = y != CLASSES.index("BACK")
        c, angles = tissue_concentrations(x)[tissue], stain_vector_angles(x)[tissue]
        stats[name] = {"n": int(tissue.sum()), "H": c[:, 0].numpy(), "E": c[:, 1].numpy(),
                       "angle_H": angles[:, 0].numpy(), "angle_E": angles[:, 1].numpy(), "labels": y[tissue]}
    train, test = stats["NCT-CRC-HE-100K, 224 px"], stats["CRC-VAL-HE-7K, 224 px"]
    reference = {int(y): (h, e) for y, h, e in zip(train["labels"], train["H"], train["E"])}
    ratios = np.array([(h / reference[int(y)][0], e / reference[int(y)][1])
                       for y, h, e in zip(test["labels"], test["H"], test["E"])])
    change = np.abs(np.log(ratios))  # (tiles, 2)
    typical = stats["CRC-VAL-HE-7K, PathMNIST 28 px"]
    c = {"H": float(np.median(typical["H"])), "E": float(np.median(typical["E"]))}
    cover = {s: float(np.quantile(change[:, i], COVER)) for i, s in enumerate("HE")}
    literature = math.log(LITERATURE_HE_RATIO[1] / LITERATURE_HE_RATIO[0]) / 2  # either side of the middle lab
    went = [d for d in (-1, 1) if ((ratios < 1) if d < 0 else (ratios > 1)).any()]  # the directions the tiles changed in
    level = max([covering_level(cover[s], c[s], d) for s in "HE" for d in went] +
                [covering_level(literature, c[s], d) for s in "HE" for d in (-1, 1)])
    both = max(covering_level(cover[s], c[s], d) for s in "HE" for d in (-1, 1))
    return {"stats": stats, "ratios": ratios, "tile_classes": [CLASSES[int(y)] for y in test["labels"]],
            "median_change": {s: float(np.median(change[:, i])) for i, s in enumerate("HE")},
            "cover_change": cover, "typical_concentration": c, "level": level, "level_both_ways": both,
            "directions": went, "literature_change": literature}


def print_calibration(out: dict) -> None:
    print("per image, tissue pixels: mean H and E concentration (natural-log OD; scikit-image's rgb2hed: / "
          f"{SKIMAGE_UNIT:.1f}) and the Macenko stain vectors' angle to Ruifrok & Johnston's (median [range])")
    q = lambda v: f"{np.nanmedian(v):.3f} [{np.nanmin(v):.3f}, {np.nanmax(v):.3f}]"
    d = lambda v: f"{np.nanmedian(v):4.1f} [{np.nanmin(v):4.1f}, {np.nanmax(v):4.1f}] deg"
    for name, s in out["stats"].items():
        print(f"  {name:32s} {s['n']:4d} images: H {q(s['H'])}  E {q(s['E'])}  angle H {d(s['angle_H'])}  E {d(s['angle_E'])}")
    print("between the centres, per class (CRC-VAL-HE-7K tile / NCT-CRC-HE-100K tile of the class):")
    for cls, (h, e) in zip(out["tile_classes"], out["ratios"]):
        print(f"  {cls:5s} H x{h:.2f}  E x{e:.2f}")
    m, cov, c = out["median_change"], out["cover_change"], out["typical_concentration"]
    print(f"median |ln ratio|: H {m['H']:.2f}, E {m['E']:.2f} (a factor of {math.exp(m['H']):.2f} and {math.exp(m['E']):.2f}); "
          f"{COVER:.0%} of the tiles within H {cov['H']:.2f}, E {cov['E']:.2f} (x{math.exp(cov['H']):.2f}, x{math.exp(cov['E']):.2f})")
    print(f"literature: six laboratories' H:E ratio on one tissue, {LITERATURE_HE_RATIO[0]}-{LITERATURE_HE_RATIO[1]} "
          f"(Gray et al. 2015): |ln ratio| {out['literature_change']:.2f} either side of the middle")
    lv, way = out["level"], " or ".join("less" if d < 0 else "more" for d in out["directions"])
    print(f"calibrated hed_uniform level: {lv:.3f} natural-log OD ({lv / SKIMAGE_UNIT:.4f} in scikit-image's units): its "
          f"strongest draw gives a typical image (H {c['H']:.2f}, E {c['E']:.2f}) {way} stain by H {cov['H']:.2f} / E {cov['E']:.2f} "
          f"and either way by the literature's spread; {out['level_both_ways']:.3f} ({out['level_both_ways'] / SKIMAGE_UNIT:.4f}) "
          "reaches the tiles' change in both directions")


if __name__ == "__main__":
    exit_with_one_line(lambda: print_calibration(calibrate(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))),
                       (FileNotFoundError,))
