"""Every figure the scripts draw, saved one way (save_figure): evaluation (confusion matrix, ROC
curves, sample predictions), training curves, attribution examples and the trust checks.

    from figures import plot_confusion_matrix
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, "images/confusion_matrix.png", "title")

Images are shown from their uint8 pixels, never from normalised model inputs, so colours are true.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # figures only go to files; never needs a display
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
from PIL import Image

from attribution import METHODS
from metrics import roc_auc

DPI = 150


def save_figure(fig, path, title: str | None = None) -> Path:
    """Title the figure, lay it out (tight, unless it has a layout engine), write it at DPI, close it."""
    path = Path(path)
    if title:
        fig.suptitle(title, fontsize=9)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Evaluation and training

def plot_confusion_matrix(cm, class_names: list[str], path, title: str) -> Path:
    """Row-normalised confusion matrix (each row sums to 100% of that true class)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    pct = 100 * np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * k, 1.0 + 0.65 * k))
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of true class")
    ax.set_xticks(range(k), class_names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k):
        for j in range(k):
            if pct[i, j] >= 0.05 or i == j:
                ax.text(j, i, f"{pct[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if pct[i, j] > 55 else "black")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_roc_curves(y_true, scores, class_names: list[str], path, title: str) -> Path:
    """One-vs-rest ROC curve per class with its AUC; the title adds the macro AUC."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if s.ndim == 1:
        s = np.stack([1 - s, s], axis=1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    aucs = []
    for c, name in enumerate(class_names):
        positive = y[:, c] == 1 if y.ndim == 2 else y == c  # multi-label: one curve per label
        fpr, tpr = _roc_curve(positive, s[:, c])
        aucs.append(roc_auc(positive, s[:, c]))
        ax.plot(fpr, tpr, color=cmap(c % cmap.N), lw=1.4, label=f"{name} ({aucs[-1]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance (0.5)")
    ax.set(xlim=(-0.01, 1.0), ylim=(0.0, 1.01), xlabel="false positive rate",
           ylabel="true positive rate")
    ax.set_title(f"{title}\nmacro AUC {np.mean(aucs):.4f}")
    ax.legend(loc="lower right", fontsize=7, title="class (AUC)", title_fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _roc_curve(positive, score) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, highest score first."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    s, pos = np.asarray(score)[order], np.asarray(positive, dtype=bool)[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(pos)[last_of_tie]
    fp = np.cumsum(~pos)[last_of_tie]
    return np.r_[0, fp] / max(fp[-1], 1), np.r_[0, tp] / max(tp[-1], 1)


def plot_samples(images_uint8, y_true, y_pred, confidence, class_names: list[str], path,
                 title: str, ncols: int = 4) -> Path:
    """Grid of raw uint8 images in their true colours, titled true/pred; mistakes in red."""
    images = images_uint8.cpu().numpy() if torch.is_tensor(images_uint8) else np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"plot_samples shows raw uint8 images, got {images.dtype}; pass the "
                         "dataset images, not normalised model inputs")
    images = images.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.8 * nrows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        img = images[i]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        t, p = int(y_true[i]), int(y_pred[i])
        lines = [f"true: {class_names[t]}", f"pred: {class_names[p]} (p={float(confidence[i]):.2f})"]
        ax.set_title("\n".join(textwrap.fill(line, 30) for line in lines),  # long names wrap
                     fontsize=7.5, color="black" if t == p else "red")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_training_curves(rows: list[dict], path, title: str) -> Path:
    """Loss and accuracy per epoch, training vs validation."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "acc")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label="train (augmented)")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel({"loss": "cross-entropy loss", "acc": "accuracy"}[key])
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path, title)


# ------------------------------------------------------------------------------------------------
# Explanations

def draw_map(fig, ax_map, ax_over, m: np.ndarray, method: str, title: str, note: str, smooth: bool) -> None:
    """One map and its overlay on the image already drawn in ax_over. CAM maps (non-negative): grayscale
    and a jet overlay at 45%, as the second seed drew them; the others signed (red supports the class,
    blue opposes it) and their positive part in red at up to 80% where it reaches the 99.5th
    percentile of |map|. smooth: bilinear display of CAM maps (figures at model resolution)."""
    if METHODS[method].cam:
        lim = max(float(m.max()), 1e-12)
        how = {"interpolation": "bilinear"} if smooth else {}
        im = ax_map.imshow(m, cmap="gray", vmin=0, vmax=lim, **how)
        ax_over.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=lim, **how)
        ax_over.set_title("heat-map overlay", fontsize=7)
    else:
        lim = max(float(np.percentile(np.abs(m), 99.5)), 1e-12)
        im = ax_map.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        pos = np.clip(m / lim, 0, 1)
        ax_over.imshow(np.dstack([np.ones_like(pos), np.zeros_like(pos), np.zeros_like(pos), 0.8 * pos]),
                       interpolation="nearest")
        ax_over.set_title("positive part in red", fontsize=7)
    ax_map.set_title(title + note, fontsize=7)
    colour_scale(fig, im, ax_map)


def plot_examples(images, rows: dict, class_names, method: str, path, title: str) -> Path:
    """One row per example: image in true colours | map with colour bar | overlay (draw_map's rules);
    maps of colour channels are summed."""
    n = len(rows["index"])
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.3 * n + 0.6), squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.1, h_pad=0.1)  # inches: savefig's tight box adds its 0.1 in inside the canvas
    for r in range(n):
        img = images[rows["index"][r]].permute(1, 2, 0).numpy()
        img = img[..., 0] if img.shape[-1] == 1 else img
        m = rows["maps"][r]
        m = m.sum(0) if m.ndim == 3 else m
        ax0, ax1, ax2 = axes[r]
        ax0.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        label, pred = class_names[rows["label"][r]], class_names[rows["predicted"][r]]
        colour = "black" if rows["label"][r] == rows["predicted"][r] else "red"
        ax0.set_title(textwrap.fill(f"true: {label}", 30) + "\n" + textwrap.fill(
            f"pred: {pred} (p={rows['confidence'][r]:.2f})", 30), fontsize=7, color=colour)
        ax2.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        raw = rows["raw"][r] if rows.get("raw") is not None else m
        target = class_names[rows["target"][r]]
        draw_map(fig, ax1, ax2, m, method, textwrap.fill(f"{METHODS[method].title} for {target}", 30),
                 "\n(flat inside: the border is zero padding)" if METHODS[method].cam and padding_frame(raw) else "",
                 smooth=True)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if METHODS[method].cam:
        fig.supxlabel(PADDING_NOTE, fontsize=7)
    return save_figure(fig, path, title)


PADDING_NOTE = ("Grad-CAM near the border: the convolutions pad the image with zeros, so the outer cells of every "
                "map also respond to the image's edge;\na frame along the border shows where the image ends, not "
                "evidence (marked where the inside of the map is flat, as on blank background)")


def colour_scale(fig, im, ax) -> None:
    """A slim colour bar beside a map, its numbers written out (no '1e-2' offset above the bar)."""
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=5)
    bar.ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))


def padding_frame(cam) -> bool:
    """Whether a Grad-CAM map (h, w), e.g. the stored one before upsampling, is flat inside and
    differs only along its border. On blank or uniform input (background, mucus, smooth debris)
    nothing in the image varies, and the convolutions' zero padding alone makes the cells near the
    border differ: the map then draws a square frame that says where the image ends, not where
    the evidence is. Flat: the interior's coefficient of variation under 5%; frame: some border
    cell over 20% away from the interior's mean."""
    m = np.asarray(cam, np.float32).squeeze()
    if m.ndim != 2 or min(m.shape) < 6:
        return False
    b = min(3, (min(m.shape) - 2) // 4)  # LightCNN's padding reaches 3 cells into its 14x14 (or larger) layer
    inner = m[b:-b, b:-b]
    ring = np.concatenate([m[:b].ravel(), m[-b:].ravel(), m[b:-b, :b].ravel(), m[b:-b, -b:].ravel()])
    centre = float(inner.mean())
    return centre > 0 and float(inner.std()) < 0.05 * centre and float(np.abs(ring - centre).max()) > 0.2 * centre


def plot_tiles(rows: list[dict], path, title: str) -> Path:
    """Image files at their own resolution, one row each: the file | what the model saw | then per
    method its map and overlay, the map upsampled to the file's size (Grad-CAM bilinearly from its
    layer's grid; IG by nearest neighbour: each of its values belongs to one model-input pixel, a
    block of the file), drawn by draw_map's rules.

    rows: dicts of full (H, W, C) and small (s, s, C) uint8, title, wrong (bool) and maps
    {method: (stored map (C, h, w) or (h, w), explained class name)}.
    """
    methods = list(dict.fromkeys(m for r in rows for m in r["maps"]))
    ncol = 2 + 2 * len(methods)
    # 1.5 inches at DPI 150: a 224 px tile at its own resolution; one large file up to 1024 px.
    side = 1.5 if len(rows) > 1 else max(1.5, min(max(rows[0]["full"].shape[:2]), 1024) / DPI)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(side * ncol, (side + 0.55) * len(rows) + 0.4), squeeze=False,
                             layout="constrained")  # keeps the title clear of the first row at any height
    for r, row in enumerate(rows):
        full, small = row["full"], row["small"]
        h, w = full.shape[:2]
        show = lambda ax, img: ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img,
                                         cmap="gray" if img.shape[-1] == 1 else None, interpolation="nearest")
        show(axes[r, 0], full)
        # Long class names wrap; not `title`, which is the whole figure's (a row's name is not the grid's).
        name = "\n".join(textwrap.fill(line, 26) for line in row["title"].split("\n"))
        axes[r, 0].set_title(name, fontsize=7, color="red" if row["wrong"] else "black")
        show(axes[r, 1], small)
        axes[r, 1].set_title(f"what the model saw\n({small.shape[0]}x{small.shape[1]})", fontsize=7)
        for j, method in enumerate(methods):
            ax_map, ax_over = axes[r, 2 + 2 * j], axes[r, 3 + 2 * j]
            if method not in row["maps"]:
                ax_map.set_visible(False)
                ax_over.set_visible(False)
                continue
            stored, target = row["maps"][method]
            m = torch.from_numpy(np.asarray(stored, np.float32))
            m = m.sum(0) if m.ndim == 3 else m
            smooth = METHODS[method].cam
            m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="bilinear" if smooth else "nearest",
                                                **({"align_corners": False} if smooth else {}))[0, 0].numpy()
            show(ax_over, full)
            signed = "" if smooth else " (signed)"
            draw_map(fig, ax_map, ax_over, m, method, textwrap.fill(f"{METHODS[method].title} for {target}{signed}", 28),
                     "\n(flat inside: the border is\nzero padding, not evidence)" if smooth and padding_frame(stored)
                     else "", smooth=False)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if any(METHODS[m].cam for m in methods):
        fig.supxlabel(PADDING_NOTE, fontsize=7)
    return save_figure(fig, path, title)


def tile_row(tile, maps: dict, names, pred: int, conf: float) -> dict:
    """What plot_tiles draws of one file; large files are drawn at most 1024 px wide."""
    scale = min(1.0, 1024 / max(tile.width, tile.height))
    full = tile.full if scale == 1 else np.asarray(Image.fromarray(tile.full.squeeze()).resize(
        (round(tile.width * scale), round(tile.height * scale)), Image.BILINEAR)).reshape(
        round(tile.height * scale), round(tile.width * scale), -1)
    title = f"{tile.path.name}\npred: {names[pred]} ({conf:.2f})"
    if tile.label >= 0:
        title += f"\ntrue: {names[tile.label]}"
    return {"full": full, "small": tile.small.permute(1, 2, 0).numpy(), "title": title,
            "wrong": tile.label >= 0 and tile.label != pred,
            "maps": {m: (v, names[t]) for m, (v, t) in maps.items()}}


def plot_trust(rows: list[dict], class_names, folder, title: str) -> list[Path]:
    """images/sanity_check.png, deletion_insertion.png and (with masks) localisation.png from the
    stored summary metrics of one model (rows of ExplanationDB.summary_metrics)."""
    named = {}
    for r in rows:
        named.setdefault(r["name"], {})[r["method"] or "edge (control)"] = r
    colours = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in rows if r["method"]}))}
    colours["edge (control)"] = "0.4"
    folder, paths = Path(folder), []
    if "sanity_spearman" in named:
        paths.append(save_figure(plot_sanity(named, colours), folder / "sanity_check.png",
                                 f"model parameter randomisation: {title}"))
    if "deletion_auc" in named:
        paths.append(save_figure(plot_deletion_insertion(named, colours), folder / "deletion_insertion.png",
                                 f"deletion / insertion: {title}"))
    if "relevance_mass" in named:
        paths.append(save_figure(plot_localisation(named, colours, class_names), folder / "localisation.png",
                                 f"localisation: {title}"))
    return paths


def plot_sanity(named: dict, colours: dict):
    """Mean Spearman with the original map per cascading-randomisation stage, |map| and signed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    lines = {**named["sanity_spearman"], **named.get("sanity_control_edge", {})}
    for ax, kind in zip(axes, ("abs", "signed")):
        for method, r in lines.items():
            d = r["detail"]
            ax.plot(range(len(d["layers"])), d[kind], marker="o", ms=3, color=colours[method],
                    ls="--" if method == "edge (control)" else "-", label=f"{method} (n={r['n']})")
        layers = max((r["detail"]["layers"] for r in lines.values()), key=len)
        ax.set_xticks(range(len(layers)), sanity_stage_labels(len(layers)), fontsize=7)
        ax.axhline(0, color="0.8", lw=0.8)
        ax.set_xlabel(f"blocks of weights randomised, from the output layer towards the input "
                      f"({len(layers) - 1} in all)", fontsize=8)
        ax.set_title(f"Spearman with the original map ({'|map|' if kind == 'abs' else 'signed map'})", fontsize=9)
    axes[0].set_ylabel("mean rank correlation")
    lowest = np.nanmin([v for r in lines.values() for k in ("abs", "signed") for v in r["detail"][k]] + [-0.1])
    axes[0].set_ylim(float(lowest) - 0.05, 1.05)
    axes[1].legend(fontsize=8)
    return fig


def sanity_stage_labels(n_stages: int) -> list[str]:
    """Tick labels of the cascading randomisation: 'none' (the intact model), then how many blocks
    are re-initialised, 'output' for the first and 'all' for the last; at most ~12 numbered ticks."""
    step = max(1, math.ceil((n_stages - 1) / 12))
    labels = ["none"] + [str(k) if k % step == 0 else "" for k in range(1, n_stages)]
    if n_stages > 1:
        labels[1], labels[-1] = "1\n(output)", f"{n_stages - 1}\n(all)"
    return labels


def plot_deletion_insertion(named: dict, colours: dict):
    """Mean deletion and insertion curves per method, against a random pixel order."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("deletion", "insertion")):
        runs = named[f"{name}_auc"]
        randoms = [r["detail"]["random_curve"] for r in runs.values()]
        same = all(np.allclose(c, randoms[0], equal_nan=True) for c in randoms)  # same images: one line
        for method, r in runs.items():
            d = r["detail"]
            ax.plot(d["fractions"], d["curve"], color=colours[method],
                    label=f"{method} (AUC {r['value']:.3f}, n={r['n']})")
            if method in named.get(f"{name}_auc_abs", {}):
                a = named[f"{name}_auc_abs"][method]
                ax.plot(a["detail"]["fractions"], a["detail"]["curve"], color=colours[method], ls="--",
                        label=f"{method}, ranked by |map| (AUC {a['value']:.3f})")
            if not same or method == next(iter(runs)):
                ax.plot(d["fractions"], d["random_curve"], color="0.5" if same else colours[method], ls=":",
                        label=f"{'' if same else method + ', '}random order (AUC {d['random']:.3f})")
        ax.set_xlabel(f"fraction of pixels {'removed' if name == 'deletion' else 'inserted'}")
        ax.set_ylim(0, 1.02)
        d = next(iter(runs.values()))["detail"]
        how = f"pixels set to the {d['to']} baseline" if name == "deletion" else "pixels put back into the blurred image"
        ax.set_title(f"{name}: {how}, most relevant first\n{'lower' if name == 'deletion' else 'higher'} "
                     "area is better", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("probability of the explained class")
    return fig


def plot_localisation(named: dict, colours: dict, class_names):
    """Relevance mass and pointing game per method and class, against a random map."""
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    groups = ["all"] + [c for c in class_names if any(c in r["detail"]["per_class"]
                                                      for r in named["relevance_mass"].values())]
    methods = list(named["relevance_mass"])
    width = 0.8 / (len(methods) + 1)
    for ax, name in zip(axes, ("relevance_mass", "pointing_game")):
        bars = {m: named[name][m] for m in methods}
        first = bars[methods[0]]["detail"]
        series = [(m, [r["value"]] + [r["detail"]["per_class"].get(c, np.nan) for c in groups[1:]], colours[m])
                  for m, r in bars.items()]
        series.append(("random", [first["random"]] + [first["random_per_class"].get(c, np.nan) for c in groups[1:]],
                       "0.7"))
        for j, (label, values, colour) in enumerate(series):
            offset = (j - (len(series) - 1) / 2) * width
            ax.bar(np.arange(len(groups)) + offset, values, width, color=colour, label=label)
        ax.set_ylim(0, 1)
        ax.set_ylabel(name.replace("_", " "))
        ax.grid(axis="y", color="0.9")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1].set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    n = ", ".join(f"{m} n={r['n']}" for m, r in named["relevance_mass"].items())
    axes[0].set_title(f"relevance mass: share of positive attribution inside the evidence mask ({n}; "
                      "maps of the true class)", fontsize=9)
    axes[1].set_title("pointing game: the map's maximum lies inside the evidence mask; random: the mask's "
                      "area fraction", fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------------
# Robustness

def plot_stain_shift(result: dict, path, title: str) -> Path:
    """Accuracy as a table of colours: one row per perturbation family, one column per severity and
    the family's mean over levels 1-5 (robustness.stain_shift's result); the worst family boxed."""
    names = list(result["accuracy"])
    acc = np.array([result["accuracy"][n] + [result["families"][n]] for n in names])
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(names) + 1.3))
    ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (i, j), a in np.ndenumerate(acc):
        ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=7,
                fontweight="bold" if j == acc.shape[1] - 1 else "normal")
    worst = names.index(result["worst"])
    ax.add_patch(plt.Rectangle((-0.5, worst - 0.5), acc.shape[1], 1, fill=False, lw=1.5, ec="black"))
    ax.axvline(acc.shape[1] - 1.5, color="white", lw=3)
    ax.set_xticks(range(acc.shape[1]), [f"level {k}" for k in range(6)] + ["mean 1-5"], fontsize=7)
    note = {"hed": f" (level {result.get('centre_level', 4)}: another centre)",
            **{n: f" (level {result.get('lab_level', 4)}: between laboratories)" for n in ("hed_offset", "hed_uniform")}}
    ax.set_yticks(range(len(names)), [n + note.get(n, "") for n in names], fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(f"mean over families and levels 1-5: {result['summary']:.3f}; worst family: {result['worst']} "
                 f"{result['worst_mean']:.3f} (n={result['n']})", fontsize=8)
    return save_figure(fig, path, title)


def plot_perturbation_examples(images_uint8: torch.Tensor, result: dict, path, title: str) -> Path:
    """One column per perturbation family, one row per tile and severity: what each level does."""
    from stain import perturb
    names = list(result["accuracy"])
    rows = [(k, level) for k in range(len(images_uint8)) for level in range(6)]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(len(names) * 0.8, len(rows) * 0.8 + 0.6), squeeze=False,
                             layout="constrained")
    for c, name in enumerate(names):
        for r, (k, level) in enumerate(rows):
            img = perturb(images_uint8[k:k + 1], name, level, result["seed"])[0].permute(1, 2, 0).numpy()
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name.replace("_", "\n"), fontsize=6)
            if c == 0:
                ax.set_ylabel(f"level {level}", fontsize=6)
    return save_figure(fig, path, title)
