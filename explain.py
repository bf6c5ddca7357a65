"""Explain a trained model's predictions with Integrated Gradients and Grad-CAM, stored in SQLite.

    python explain.py --checkpoint runs/latest/best.pt                  # whole test split, IG + Grad-CAM
    python explain.py --checkpoint RUN/best.pt --n 200 --only-errors     # the first 200 mistakes
    python explain.py --checkpoint RUN/best.pt --methods smoothgrad --indices 3,14,15
    python explain.py --checkpoint RUN/best.pt --data-dir ../shared/data/pathmnist28_real_test718.npz

Every map goes into the database (--db) keyed by checkpoint hash, method settings, sample and target
class; a rerun skips what is already there, so an interrupted run resumes where it stopped. Figures
of one example per class are drawn from the database into images/ next to the checkpoint.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel
from tqdm import tqdm

from data import DataError, load_data, normalize
from db import DatabaseError, ExplanationDB
from evaluate import predict
from model import (GRADCAM_LAYERS, CheckpointError, file_sha256, gradcam_layer, load_checkpoint,
                   parse_config, resolve_device)


@dataclass
class ExplainConfig:
    checkpoint: str = field(default="runs/latest/best.pt", metadata={"help": "checkpoint written by train.py"})
    db: str = field(default="explanations.db", metadata={"help": "SQLite database the maps are stored in"})
    methods: str = field(default="ig,gradcam", metadata={"help": "comma-separated, from: ig, gradcam, smoothgrad"})
    split: str = field(default="test", metadata={"help": "split to explain", "choices": ("train", "val", "test")})
    data_dir: str = field(default="", metadata={"help": "data folder or .npz file (default: the checkpoint's)"})
    n: int = field(default=0, metadata={"help": "explain the first N selected images (0: all)"})
    indices: str = field(default="", metadata={"help": "comma-separated image indices (default: all)"})
    classes: str = field(default="", metadata={"help": "only images whose TRUE class is in this comma-separated list"})
    only_errors: bool = field(default=False, metadata={"help": "only misclassified images"})
    targets: str = field(default="predicted", metadata={"help": "class to explain", "choices": ("predicted", "true", "both")})
    ig_steps: int = field(default=32, metadata={"help": "IG integration steps; Gauss-Legendre converges in fewer than Riemann sums"})
    ig_method: str = field(default="gausslegendre", metadata={"help": "IG quadrature", "choices": ("gausslegendre", "riemann_trapezoid", "riemann_middle")})
    baseline: str = field(default="black", metadata={"help": "IG reference image", "choices": ("black", "blur", "mean")})
    ig_internal_batch: int = field(default=512, metadata={"help": "images x steps per IG forward/backward: bounds memory"})
    nt_samples: int = field(default=10, metadata={"help": "SmoothGrad: noisy copies per image"})
    nt_stdev: float = field(default=0.15, metadata={"help": "SmoothGrad: noise std in input units (inputs span [-1, 1])"})
    batch_size: int = field(default=64, metadata={"help": "images per attribution batch and per database transaction"})
    store_dtype: str = field(default="float16", metadata={"help": "blob precision", "choices": ("float16", "float32")})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    figures: bool = field(default=True, metadata={"help": "draw images/ig_examples.png and images/gradcam_examples.png"})

    def check(self) -> str | None:
        unknown = set(self.method_list) - set(METHODS)
        if unknown:
            return f"unknown method(s) {sorted(unknown)}; choose from {sorted(METHODS)}"
        if min(self.n, self.ig_steps - 1, self.batch_size - 1, self.nt_samples - 1, self.ig_internal_batch - 1) < 0:
            return "--n must be >= 0; --ig-steps, --batch-size, --nt-samples, --ig-internal-batch >= 1"
        return None

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


# ------------------------------------------------------------------------------------------------
# Methods: each takes a batch of model inputs and target classes, returns (maps, raw maps, deltas)

def make_baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    """IG reference in the model's input space: black pixels, a heavy blur, or the mean colour."""
    if kind == "black":
        return torch.full_like(x, normalize(torch.zeros(1, dtype=torch.uint8)).item())
    if kind == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).contiguous()
    k = x.shape[-1] // 4 * 2 + 1  # a box blur over about half the image removes all structure
    return F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="reflect"), k, stride=1)


def integrated_gradients(model, layer, x, target, cfg):
    ig = IntegratedGradients(model)
    attr, delta = ig.attribute(x, baselines=make_baseline(x, cfg.baseline), target=target, n_steps=cfg.ig_steps,
                               method=cfg.ig_method, internal_batch_size=cfg.ig_internal_batch,
                               return_convergence_delta=True)
    return attr, None, delta


def smoothgrad(model, layer, x, target, cfg):
    """SmoothGrad over IG: the average IG map of noisy copies (Smilkov et al., 2017)."""
    nt = NoiseTunnel(IntegratedGradients(model))
    attr, delta = nt.attribute(x, nt_type="smoothgrad", nt_samples=cfg.nt_samples, stdevs=cfg.nt_stdev,
                               baselines=make_baseline(x, cfg.baseline), target=target,
                               n_steps=cfg.ig_steps, method=cfg.ig_method,
                               internal_batch_size=cfg.ig_internal_batch, return_convergence_delta=True)
    # One delta per noisy copy: keep the one of largest magnitude per image.
    delta = delta.view(len(x), cfg.nt_samples)
    return attr, None, delta.gather(1, delta.abs().argmax(1, keepdim=True))[:, 0]


def gradcam(model, layer, x, target, cfg):
    """Grad-CAM (Selvaraju et al., 2017): ReLU of the gradient-weighted sum of the layer's channels."""
    raw = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    up = LayerAttribution.interpolate(raw, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return up[:, 0], raw[:, 0], None


METHODS = {"ig": integrated_gradients, "gradcam": gradcam, "smoothgrad": smoothgrad}


def method_params(method: str, cfg: ExplainConfig, model_name: str) -> dict:
    """What identifies a method's settings in the database (not speed knobs like batch sizes)."""
    ig = {"steps": cfg.ig_steps, "quadrature": cfg.ig_method, "baseline": cfg.baseline, "output": "logit"}
    return {"ig": ig,
            "smoothgrad": {**ig, "nt_samples": cfg.nt_samples, "stdev": cfg.nt_stdev},
            "gradcam": {"layer": GRADCAM_LAYERS[model_name], "relu": True, "upsample": "bilinear"}}[method]


def select(labels: np.ndarray, pred: np.ndarray, cfg: ExplainConfig) -> np.ndarray:
    """Indices of the images to explain, from --indices, --classes, --only-errors and --n."""
    idx = np.arange(len(labels))
    if cfg.indices:
        idx = np.array([int(i) for i in cfg.indices.split(",")], dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= len(labels))]
        if len(bad):
            raise DataError(f"--indices {bad.tolist()} outside the split's 0..{len(labels) - 1}")
    if cfg.classes:
        idx = idx[np.isin(labels[idx], [int(c) for c in cfg.classes.split(",")])]
    if cfg.only_errors:
        idx = idx[pred[idx] != labels[idx]]
    return idx[: cfg.n] if cfg.n else idx


def explain(db, model, layer, x_uint8, work, method, cfg, device, ids) -> int:
    """Run `method` over the work list in fixed chunks of --batch-size, one transaction per chunk.

    The chunks do not depend on what is already stored, so a resumed run recomputes a chunk with
    exactly the same batch as the interrupted run would have: the stored maps are identical.
    """
    model_id, setting_id = ids
    done = db.done_targets(model_id, setting_id, np.unique(work["sample_id"]))
    written = 0
    chunks = range(0, len(work["index"]), cfg.batch_size)
    for start in tqdm(chunks, desc=method, unit="batch", disable=None):
        part = {k: v[start:start + cfg.batch_size] for k, v in work.items()}
        if all((s, t) in done for s, t in zip(part["sample_id"].tolist(), part["target"].tolist())):
            continue
        x = normalize(x_uint8[torch.from_numpy(part["index"])].to(device))
        target = torch.from_numpy(part["target"]).to(device)
        maps, raw, delta = METHODS[method](model, layer, x, target, cfg)
        written += db.add_attributions(
            model_id, setting_id, part["sample_id"], part["target"], part["predicted"], part["confidence"],
            maps.detach().cpu().numpy(), None if delta is None else delta.detach().cpu().numpy(),
            None if raw is None else raw.detach().cpu().numpy(), dtype=cfg.store_dtype)
    return written


def plot_examples(images, rows, class_names, method, path, title) -> None:
    """One row per example: image in true colours | map with colour bar | overlay on the image.

    IG maps are signed (summed over colour channels, red supports the class, blue opposes it);
    Grad-CAM maps are non-negative and drawn as the second seed did: grayscale, then a jet overlay.
    """
    n = len(rows["index"])
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.3 * n + 0.6), squeeze=False)
    for r in range(n):
        img = images[rows["index"][r]].permute(1, 2, 0).numpy()
        img = img[..., 0] if img.shape[-1] == 1 else img
        m = rows["maps"][r]
        m = m.sum(0) if m.ndim == 3 else m
        ax0, ax1, ax2 = axes[r]
        ax0.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        label, pred = class_names[rows["label"][r]], class_names[rows["predicted"][r]]
        colour = "black" if rows["label"][r] == rows["predicted"][r] else "red"
        ax0.set_title(f"true: {label}\npred: {pred} (p={rows['confidence'][r]:.2f})", fontsize=8, color=colour)
        if method == "gradcam":
            lim = max(float(m.max()), 1e-12)
            im = ax1.imshow(m, cmap="gray", vmin=0, vmax=lim, interpolation="bilinear")
            ax1.set_title(f"Grad-CAM ({class_names[rows['target'][r]]})", fontsize=8)
            ax2.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax2.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=lim, interpolation="bilinear")
            ax2.set_title("heat-map overlay", fontsize=8)
        else:
            lim = max(float(np.percentile(np.abs(m), 99.5)), 1e-12)
            im = ax1.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax1.set_title(f"IG for {class_names[rows['target'][r]]}", fontsize=8)
            ax2.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            pos = np.clip(m / lim, 0, 1)
            ax2.imshow(np.dstack([np.ones_like(pos), np.zeros_like(pos), np.zeros_like(pos), 0.8 * pos]),
                       interpolation="nearest")
            ax2.set_title("positive IG in red", fontsize=8)
        fig.colorbar(im, ax=ax1, fraction=0.046, pad=0.04)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def one_per_class(rows: dict, num_classes: int) -> np.ndarray:
    """Row numbers of the first explained image of each true class, correct predictions first."""
    picks = []
    for c in range(num_classes):
        mine = np.flatnonzero(rows["label"] == c)
        right = mine[rows["predicted"][mine] == c]
        if len(mine):
            picks.append((right if len(right) else mine)[0])
    return np.array(picks, dtype=np.int64)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ExplainConfig, argv, description=__doc__.split("\n")[0])
    device = resolve_device(cfg.device)

    # The model and its data, both described by the checkpoint alone.
    model, mcfg, ckpt = load_checkpoint(cfg.checkpoint, device)
    data_dir = cfg.data_dir or mcfg["data_dir"]
    data = load_data(mcfg["dataset"], mcfg["size"], data_dir, (cfg.split,), seed=mcfg["seed"])
    if data.task.startswith("multi-label"):
        raise DataError(f"{data.source}: explaining multi-label tasks is not supported")
    split = data.splits[cfg.split]
    dataset_id = f"synthetic-seed{mcfg['seed']}" if data.flag == "synthetic" else Path(data.source).stem
    print(f"explaining {cfg.split} split of {data.source} with {mcfg['model']} ({cfg.checkpoint})")

    # Predictions decide the explained class and the selection (--only-errors).
    scores = predict(model, split.images, 512, device, data.task)
    pred, conf, labels = scores.argmax(1), scores.max(1), split.labels.numpy()
    idx = select(labels, pred, cfg)
    targets = {"predicted": [pred[idx]], "true": [labels[idx]], "both": [pred[idx], labels[idx]]}[cfg.targets]
    work_idx = np.concatenate([idx] * len(targets))
    work_target = np.concatenate(targets)
    keep = np.unique(np.stack([work_idx, work_target]), axis=1)  # "both": no duplicate when true == pred
    work_idx, work_target = keep[0], keep[1]

    with ExplanationDB(cfg.db) as db:
        model_id = db.add_model(file_sha256(cfg.checkpoint), mcfg["model"], mcfg)
        sample_ids = db.add_samples(dataset_id, data.size, cfg.split, idx, labels[idx])
        sid = dict(zip(idx.tolist(), sample_ids.tolist()))
        work = {"index": work_idx, "target": work_target, "sample_id": np.array([sid[i] for i in work_idx.tolist()]),
                "predicted": pred[work_idx], "confidence": conf[work_idx]}
        layer = gradcam_layer(model, mcfg["model"])
        for method in cfg.method_list:
            setting_id = db.add_setting(method, method_params(method, cfg, mcfg["model"]))
            n = explain(db, model, layer, split.images, work, method, cfg, device, (model_id, setting_id))
            print(f"{method}: {n} maps written, {len(work['index']) - n} already in {cfg.db}")
            if cfg.figures and method in ("ig", "gradcam"):
                rows = db.maps(model_id=model_id, setting_id=setting_id, dataset=dataset_id, size=data.size,
                               split=cfg.split, indices=idx.tolist())
                pick = one_per_class(rows, data.num_classes)
                path = Path(cfg.checkpoint).parent / "images" / f"{method}_examples.png"
                plot_examples(split.images, {k: v[pick] for k, v in rows.items() if v is not None},
                              data.class_names, method, path,
                              f"{mcfg['model']} on {cfg.split} split of {dataset_id} ({data.size}x{data.size})")
                print(f"wrote {path}")
        summary = db.summary()
    for row in summary:
        print(f"{row['model']:9s} {row['sha256']} {row['method']:10s} {row['dataset']:24s} {row['split']:5s} "
              f"maps {row['n_maps']:6d} errors {row['n_errors']:5d} mean|delta| {row['mean_abs_delta']:.2e}")
    return {"config": asdict(cfg), "summary": summary}


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, DatabaseError) as e:
        sys.exit(f"error: {e}")
