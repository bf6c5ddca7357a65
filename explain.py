"""Explain a trained model's predictions with Integrated Gradients and Grad-CAM, stored in SQLite.

    python explain.py --checkpoint runs/latest/best.pt                  # whole test split, IG + Grad-CAM
    python explain.py --checkpoint RUN/best.pt --n 200 --only-errors     # the first 200 mistakes
    python explain.py --checkpoint RUN/best.pt --methods smoothgrad --indices 3,14,15
    python explain.py --checkpoint RUN/best.pt --data-dir ../shared/data/pathmnist28_real_test718.npz
    python explain.py --checkpoint RUN/best.pt --trust --trust-n 256    # ... and can the maps be trusted?
    python explain.py --checkpoint RUN/best.pt --shard 2/4               # this process: the 2nd of 4 slices
    python explain.py --db all.db --merge-from shard1.db,shard2.db       # copy shard files into one

Every map goes into the database (--db) keyed by checkpoint hash, method settings, sample and target
class; a rerun skips what is already there, so an interrupted run resumes where it stopped. Figures
of one example per class are drawn from the database into images/ next to the checkpoint.

--shard K/N splits the selected images into N contiguous slices and explains slice K only, so N
processes or machines share the work, writing one database (concurrent writers are safe) or one file
each, joined with --merge-from. Figures and --trust need the whole selection: run once more without
--shard, which finds every map stored and only draws and measures.

--trust then measures whether the stored maps reflect the model: IG completeness (relative deltas,
steps needed), the cascading parameter-randomisation sanity check (Adebayo et al., 2018), deletion
and insertion curves (Petsiuk et al., 2018), localisation against the evidence masks of synthetic
data (relevance mass, pointing game) and IG-vs-Grad-CAM agreement, each against a random or
model-blind baseline. The numbers go into the database next to the maps, a table is printed and
images/sanity_check.png, deletion_insertion.png and localisation.png are drawn.
"""
from __future__ import annotations

import copy
import re
import sys
import textwrap
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel
from tqdm import tqdm

from data import DataError, data_for_run, normalize
from db import DatabaseError, ExplanationDB, check_sources
from evaluate import predict
from model import (GRADCAM_LAYERS, CheckpointError, file_sha256, gradcam_layer, inference_copy, load_checkpoint,
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
    ig_steps: int = field(default=50, metadata={"help": "IG integration steps (Captum's default); fewer leave a larger completeness error: see --trust"})
    ig_method: str = field(default="gausslegendre", metadata={"help": "IG quadrature", "choices": ("gausslegendre", "riemann_trapezoid", "riemann_middle")})
    baseline: str = field(default="black", metadata={"help": "IG reference image", "choices": ("black", "blur", "mean")})
    ig_internal_batch: int = field(default=128, metadata={"help": "images x steps per IG forward/backward: bounds memory; 128 is fastest on CPU, GPUs like more"})
    nt_samples: int = field(default=10, metadata={"help": "SmoothGrad: noisy copies per image"})
    nt_stdev: float = field(default=0.15, metadata={"help": "SmoothGrad: noise std in input units (inputs span [-1, 1])"})
    batch_size: int = field(default=256, metadata={"help": "images per attribution batch and per database transaction"})
    store_dtype: str = field(default="float16", metadata={"help": "blob precision", "choices": ("float16", "float32")})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    figures: bool = field(default=True, metadata={"help": "draw images/ig_examples.png, gradcam_examples.png (and the --trust figures)"})
    trust: bool = field(default=False, metadata={"help": "then test the maps: completeness, sanity, deletion/insertion, localisation, agreement"})
    trust_n: int = field(default=256, metadata={"help": "images used for the expensive checks (sanity, deletion/insertion, completeness vs steps)"})
    trust_tol: float = field(default=0.01, metadata={"help": "completeness: |delta| / |f(x)-f(baseline)| below this counts as converged"})
    trust_steps: str = field(default="4,8,16,32,64,128", metadata={"help": "completeness: IG step counts tried on the --trust-n images"})
    curve_steps: int = field(default=20, metadata={"help": "deletion/insertion: K steps along the fraction of pixels switched"})
    trust_seed: int = field(default=0, metadata={"help": "seeds re-initialisation, random pixel orders and tie breaks"})
    shard: str = field(default="", metadata={"help": "K/N: explain only the K-th of N slices of the selected images (1-based); no figures or --trust"})
    merge_from: str = field(default="", metadata={"help": "comma-separated databases (e.g. shard files) to copy into --db, then stop; nothing is explained"})

    def check(self) -> str | None:
        unknown = set(self.method_list) - set(METHODS)
        if unknown:
            return f"unknown method(s) {sorted(unknown)}; choose from {sorted(METHODS)}"
        if self.shard and self.shard_kn is None:
            return f"--shard must be K/N with 1 <= K <= N, got {self.shard!r}"
        if self.merge_from and (self.shard or not self.merge_list):
            return "--merge-from takes comma-separated database paths and no --shard"
        if min(self.n, self.ig_steps - 1, self.batch_size - 1, self.nt_samples - 1, self.ig_internal_batch - 1) < 0:
            return "--n must be >= 0; --ig-steps, --batch-size, --nt-samples, --ig-internal-batch >= 1"
        if min(self.trust_n, self.curve_steps) < 1 or not self.trust_tol > 0:
            return "--trust-n and --curve-steps must be >= 1, --trust-tol > 0"
        try:
            if not self.trust_step_list or min(self.trust_step_list) < 1:
                raise ValueError
        except ValueError:
            return f"--trust-steps must be comma-separated integers >= 1, got {self.trust_steps!r}"
        return None

    @property
    def trust_step_list(self) -> list[int]:
        return sorted({int(s) for s in self.trust_steps.split(",") if s.strip()})

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def merge_list(self) -> list[str]:
        return [p.strip() for p in self.merge_from.split(",") if p.strip()]

    @property
    def shard_kn(self) -> tuple[int, int] | None:
        """(K, N) from --shard, None if absent or malformed."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", self.shard)
        k, n = (int(m[1]), int(m[2])) if m else (0, 0)
        return (k, n) if 1 <= k <= n else None


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
        idx = np.array(_int_list(cfg.indices, "--indices"), dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= len(labels))]
        if len(bad):
            raise DataError(f"--indices {bad.tolist()} outside the split's 0..{len(labels) - 1}")
    if cfg.classes:
        idx = idx[np.isin(labels[idx], _int_list(cfg.classes, "--classes"))]
    if cfg.only_errors:
        idx = idx[pred[idx] != labels[idx]]
    return idx[: cfg.n] if cfg.n else idx


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise DataError(f"{flag} {text!r}: give comma-separated integers, e.g. 3,14,15") from None


def shard_slice(idx: np.ndarray, k: int, n: int) -> np.ndarray:
    """The K-th (1-based) of N contiguous slices of the selection, sizes differing by at most one.

    By image, before targets are paired with images, so both targets of an image land in one shard;
    it depends on the selection alone, so a rerun of a shard gets the same slice and the same chunks."""
    return np.array_split(idx, n)[k - 1]


def explain(db, model, layer, x_uint8, work, method, cfg, device, ids) -> int:
    """Run `method` over the work list in fixed chunks of --batch-size, one transaction per chunk.

    The chunks do not depend on what is already stored, so a resumed run recomputes a chunk with
    exactly the same batch as the interrupted run would have: the stored maps are identical. What
    is stored is asked again before each chunk, and a stored map is never replaced: processes that
    share a database skip what another finished meanwhile, and a map computed in another chunk (a
    shard's, or a concurrent writer's) stays the map its metrics describe.
    """
    model_id, setting_id = ids
    written = 0
    chunks = range(0, len(work["index"]), cfg.batch_size)
    for start in tqdm(chunks, desc=method, unit="batch", disable=None):
        part = {k: v[start:start + cfg.batch_size] for k, v in work.items()}
        done = db.done_targets(model_id, setting_id, part["sample_id"])
        if all((s, t) in done for s, t in zip(part["sample_id"].tolist(), part["target"].tolist())):
            continue
        x = normalize(x_uint8[torch.from_numpy(part["index"])].to(device))
        target = torch.from_numpy(part["target"]).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(start)  # SmoothGrad's noise: the same for a chunk however often it is rerun
            maps, raw, delta = METHODS[method](model, layer, x.contiguous(memory_format=torch.channels_last),
                                               target, cfg)
        written += db.add_attributions(
            model_id, setting_id, part["sample_id"], part["target"], part["predicted"], part["confidence"],
            as_stored(maps, cfg.store_dtype), None if delta is None else delta.detach().cpu().numpy(),
            None if raw is None else as_stored(raw, cfg.store_dtype), dtype=cfg.store_dtype, replace=False)
    return written


def as_stored(maps: torch.Tensor, dtype: str) -> np.ndarray:
    """Maps in the database's dtype, cast where they were computed: half the bytes to copy for
    float16, and faster than numpy's cast. (A map beyond float16's range becomes inf, which the
    database refuses, naming --store-dtype float32.)"""
    return maps.detach().to(getattr(torch, dtype)).contiguous().cpu().numpy()


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
        ax0.set_title(textwrap.fill(f"true: {label}", 30) + "\n" + textwrap.fill(
            f"pred: {pred} (p={rows['confidence'][r]:.2f})", 30), fontsize=7, color=colour)
        if method == "gradcam":
            lim = max(float(m.max()), 1e-12)
            im = ax1.imshow(m, cmap="gray", vmin=0, vmax=lim, interpolation="bilinear")
            ax1.set_title(textwrap.fill(f"Grad-CAM ({class_names[rows['target'][r]]})", 30), fontsize=7)
            ax2.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax2.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=lim, interpolation="bilinear")
            ax2.set_title("heat-map overlay", fontsize=8)
        else:
            lim = max(float(np.percentile(np.abs(m), 99.5)), 1e-12)
            im = ax1.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax1.set_title(textwrap.fill(f"IG for {class_names[rows['target'][r]]}", 30), fontsize=7)
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


# ------------------------------------------------------------------------------------------------
# Trust: do the stored maps reflect the model? (--trust)
#
# Pixel scores from a map. IG-type maps (N,C,H,W) are summed over the colour channels. The sanity
# check compares that signed sum and its absolute value with the model's own maps, as Adebayo et al.
# report both. Everything that asks "where is the evidence FOR the class" (the deletion/insertion
# order, relevance mass, the pointing game, agreement with Grad-CAM, whose ReLU keeps positive
# evidence only) uses its positive part, as relevance mass does in Arras et al. (2022); deletion and
# insertion also rank signed maps by |map| (stored as *_abs), because that choice can flip the verdict.
# Grad-CAM maps are the stored upsampled maps, non-negative already.

READ_CHUNK = 1024  # images per read of stored maps: bounds memory for large selections at 224x224
TRUST_FRACTION = 0.95  # completeness: "steps needed" = fewest steps with this share under --trust-tol


def pixel_scores(maps: torch.Tensor, kind: str = "positive") -> torch.Tensor:
    """(N,H,W) scores from (N,C,H,W) or (N,H,W) maps: channel sum, then 'positive', 'abs' or 'signed'."""
    s = maps.sum(1) if maps.ndim == 4 else maps
    return s.clamp(min=0) if kind == "positive" else s.abs() if kind == "abs" else s


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..P along the last axis of (N, P); tied values share the average of their ranks."""
    n, p = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, 1)
    pos = np.broadcast_to(np.arange(p), (n, p))
    first = np.ones((n, p), bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    last = np.ones((n, p), bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, pos, p - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((n, p))
    np.put_along_axis(ranks, order, (start + end) / 2 + 1, 1)
    return ranks


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation of each pair of rows of (N, ...) arrays; NaN where a row is constant."""
    ra, rb = (average_ranks(np.asarray(v, np.float64).reshape(len(v), -1)) for v in (a, b))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def input_control(model, layer, x, target, cfg):
    """Sanity-check control that ignores the model: the input image itself."""
    return x, None, None


def edge_control(model, layer, x, target, cfg):
    """Sanity-check control that ignores the model: Sobel gradient magnitude of the grey image."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device)
    grey = F.pad(x.mean(1, keepdim=True), [1] * 4, mode="replicate")
    gx, gy = F.conv2d(grey, k.view(1, 1, 3, 3)), F.conv2d(grey, k.t().reshape(1, 1, 3, 3))
    return (gx * gx + gy * gy).sqrt()[:, 0], None, None


CONTROLS = {"input": input_control, "edge": edge_control}


def attribute(fn, model, layer, images, targets, cfg, device):
    """fn over uint8 images and int64 targets in chunks of --batch-size: (maps, deltas or None) on CPU."""
    maps, deltas = [], []
    for start in range(0, len(images), cfg.batch_size):
        x = normalize(images[start:start + cfg.batch_size].to(device))
        m, _, d = fn(model, layer, x, targets[start:start + cfg.batch_size].to(device), cfg)
        maps.append(m.detach().float().cpu())
        deltas.append(None if d is None else d.detach().double().cpu())
    return torch.cat(maps), (None if deltas[0] is None else torch.cat(deltas))


@torch.no_grad()
def logit_gap(model, images, targets, cfg, device) -> torch.Tensor:
    """f(x)[t] - f(baseline)[t] on logits: what IG's attributions must sum to (completeness)."""
    out = []
    for start in range(0, len(images), cfg.ig_internal_batch):
        x = normalize(images[start:start + cfg.ig_internal_batch].to(device))
        t = targets[start:start + cfg.ig_internal_batch].to(device)[:, None]
        out.append((model(x).gather(1, t) - model(make_baseline(x, cfg.baseline)).gather(1, t))[:, 0].double().cpu())
    return torch.cat(out)


def relative_delta(delta: torch.Tensor, gap: torch.Tensor) -> np.ndarray:
    """|delta| / |f(x)[t] - f(b)[t]|; NaN where the logits do not differ (nothing to be complete about)."""
    rel = (delta.double().abs() / gap.abs()).numpy()
    return np.where(np.isfinite(rel), rel, np.nan)


def steps_needed(model, images, targets, stored_delta, cfg, device) -> dict:
    """Relative IG deltas at each of --trust-steps; the fewest steps with 95% of them under --trust-tol.

    Also how far the deltas recomputed at --ig-steps are from the stored ones (they should agree)."""
    gap = logit_gap(model, images, targets, cfg, device)
    out = {"steps": cfg.trust_step_list, "below_tol": [], "median": [], "tol": cfg.trust_tol}
    for steps in cfg.trust_step_list:
        _, delta = attribute(integrated_gradients, model, None, images, targets, replace(cfg, ig_steps=steps), device)
        rel = relative_delta(delta, gap)
        out["below_tol"].append(float((rel < cfg.trust_tol).mean()))
        out["median"].append(float(np.nanmedian(rel)) if np.isfinite(rel).any() else np.nan)
        if steps == cfg.ig_steps:
            out["recomputed_minus_stored"] = float((delta - stored_delta).abs().max())
    enough = [s for s, f in zip(out["steps"], out["below_tol"]) if f >= TRUST_FRACTION]
    out["needed"] = enough[0] if enough else np.nan
    return out


def randomisation_stages(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """Parametrised layers (Conv2d, Linear, BatchNorm) grouped by block, output first:
    LightCNN's classifier.5, classifier.2, features.4, ...; ResNet-50's fc, layer4.2, ..., conv1."""
    groups = {}
    for name, module in model.named_modules():  # registration order is forward order here
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)):
            groups.setdefault(".".join(name.split(".")[:2]), []).append(name)
    return list(groups.items())[::-1]


def sanity_check(model, layer_name, fn, images, targets, original, cfg, device) -> dict:
    """Cascading model-parameter randomisation (Adebayo et al., 2018).

    Re-initialises the model's blocks one after another from the output towards the input (on a
    copy), recomputes the maps for the same targets and compares them with `original` by Spearman
    rank correlation per image, on |scores| and on signed scores. Stage "none" recomputes the intact
    model's maps: it should give ~1 and so checks the comparison itself. An image whose original
    map is constant (an all-zero Grad-CAM) has no ranking to keep and is left out (NaN per image); a
    recomputed map that became constant counts as 0. A method that reflects the model decorrelates.
    """
    net = copy.deepcopy(model)
    layer = net.get_submodule(layer_name) if layer_name else None
    ref = {kind: pixel_scores(original, kind).flatten(1).numpy() for kind in ("abs", "signed")}
    ranked = {kind: (r != r[:, :1]).any(1) for kind, r in ref.items()}
    out = {"layers": [], "abs": [], "signed": []}
    for k, (stage, names) in enumerate([("none", [])] + randomisation_stages(net)):
        with torch.random.fork_rng():
            torch.manual_seed(cfg.trust_seed + 1 + k)
            for name in names:
                net.get_submodule(name).reset_parameters()
            torch.manual_seed(cfg.trust_seed)  # SmoothGrad: the same noise at every stage
            maps, _ = attribute(fn, net, layer, images, targets, cfg, device)
        out["layers"].append(stage)
        for kind in ("abs", "signed"):
            rho = np.nan_to_num(spearman(pixel_scores(maps, kind).numpy(), ref[kind]), nan=0.0)
            rho[~ranked[kind]] = np.nan
            out[kind].append(float(np.nanmean(rho)) if ranked[kind].any() else np.nan)
            out[f"last_{kind}"] = rho
    return out


@torch.no_grad()
def perturbation_curve(model, start, end, targets, scores, cfg) -> torch.Tensor:
    """Softmax probability of the target while pixels switch from `start` to `end` in decreasing
    order of `scores` (ties in a fixed random order), at fractions 0, 1/K, ..., 1: (N, K+1).

    The K+1 images of each of the N are built as one tensor and run in --ig-internal-batch chunks."""
    n, _, h, w = start.shape
    k, p = cfg.curve_steps, h * w
    tiebreak = torch.randperm(p, generator=torch.Generator().manual_seed(cfg.trust_seed)).to(start.device)
    order = tiebreak[torch.sort(scores.reshape(n, p)[:, tiebreak], dim=1, descending=True, stable=True).indices]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=start.device).expand(n, p))
    count = torch.round(torch.arange(k + 1, device=start.device) * p / k)
    switched = (rank[:, None, :] < count[None, :, None]).view(n, k + 1, 1, h, w)
    xs = torch.where(switched, end[:, None], start[:, None]).flatten(0, 1)
    t = targets.repeat_interleave(k + 1)[:, None]
    b = cfg.ig_internal_batch
    probs = [torch.softmax(model(xs[i:i + b]).float(), 1).gather(1, t[i:i + b]) for i in range(0, len(xs), b)]
    return torch.cat(probs).view(n, k + 1).cpu()


def deletion_insertion(model, images, targets, scores, cfg, device) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves (Petsiuk et al., 2018) in the order of `scores` and in a random
    order: deletion switches pixels to the IG baseline (--baseline, black by default), insertion
    starts from the blurred image and switches pixels back to the original. (N, K+1) each."""
    g = torch.Generator().manual_seed(cfg.trust_seed)
    curves = {key: [] for key in ("deletion", "insertion", "deletion_random", "insertion_random")}
    for start in range(0, len(images), cfg.batch_size):
        x = normalize(images[start:start + cfg.batch_size].to(device))
        t = targets[start:start + cfg.batch_size].to(device)
        own = scores[start:start + cfg.batch_size].to(device)
        rand = torch.rand(own.shape, generator=g).to(device)  # the same orders for every method
        for suffix, order in (("", own), ("_random", rand)):
            deleted, blurred = make_baseline(x, cfg.baseline), make_baseline(x, "blur")
            curves["deletion" + suffix].append(perturbation_curve(model, x, deleted, t, order, cfg))
            curves["insertion" + suffix].append(perturbation_curve(model, blurred, x, t, order, cfg))
    return {key: torch.cat(c) for key, c in curves.items()}


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under (N, K+1) curves over the fraction axis [0, 1], trapezoidal rule."""
    return (curves[:, 1:] + curves[:, :-1]).sum(1).double() / (2 * (curves.shape[1] - 1))


def localisation(scores: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Relevance mass accuracy (share of the positive score inside the mask; NaN for an all-zero map)
    and pointing game (share of the maximal pixels inside the mask, i.e. a random pick among tied
    maxima) per map; the random baseline of both is the mask's area fraction."""
    pos, inside = scores.clamp(min=0).flatten(1).double(), masks.flatten(1).bool()
    total = pos.sum(1)
    mass = torch.where(total > 0, (pos * inside).sum(1) / total, torch.full_like(total, np.nan))
    top = pos == pos.max(1, keepdim=True).values
    return {"relevance_mass": mass, "pointing_game": (top & inside).sum(1) / top.sum(1).double(),
            "area": inside.double().mean(1)}


def stored_rows(db, key, setting_id, indices, pairs: set) -> dict[str, np.ndarray]:
    """Stored maps of these images restricted to the run's (index, target) pairs."""
    model_id, dataset, size, split = key
    rows = db.maps(model_id=model_id, setting_id=setting_id, dataset=dataset, size=size, split=split,
                   indices=np.asarray(indices).tolist())
    keep = np.array([(i, t) in pairs for i, t in zip(rows["index"].tolist(), rows["target"].tolist())], bool)
    return {k: v[keep] for k, v in rows.items() if v is not None}


def by_class(values: np.ndarray, classes: np.ndarray, class_names) -> dict:
    """Mean of the defined values per class name (classes without any are left out)."""
    return {class_names[c]: float(np.nanmean(values[classes == c])) for c in np.unique(classes)
            if np.isfinite(values[classes == c]).any()}


def cheap_metrics(db, model, split, rows: dict, cfg, device) -> dict[str, np.ndarray]:
    """Per-map metrics of one method's stored maps: relative IG delta, relevance mass, pointing game.

    Stored per map (NaN where undefined); returned with the image labels for the aggregates."""
    images, t = split.images[torch.from_numpy(rows["index"])], torch.from_numpy(rows["target"])
    found = {}
    if rows["method"].size and METHODS[rows["method"][0]] is integrated_gradients:
        found["rel_delta"] = relative_delta(torch.from_numpy(rows["delta"]), logit_gap(model, images, t, cfg, device))
    if split.masks is not None:
        own = rows["target"] == rows["label"]  # the mask marks the evidence for the true class only
        loc = localisation(pixel_scores(torch.from_numpy(rows["maps"])), split.masks[torch.from_numpy(rows["index"])])
        found |= {k: np.where(own, v.numpy(), np.nan) for k, v in loc.items()}
    for name, v in found.items():
        if name != "area":
            db.add_sample_metrics(rows["attribution_id"], name, v)
    return found | {"label": rows["label"], "target": rows["target"]}


def agreement(db, ig: dict, cam: dict) -> dict[str, np.ndarray]:
    """Spearman between the positive part of IG and Grad-CAM for the same image and target, stored
    on both maps; NaN where one map is constant."""
    where = {(i, t): n for n, (i, t) in enumerate(zip(cam["index"].tolist(), cam["target"].tolist()))}
    pick = np.array([where.get((i, t), -1) for i, t in zip(ig["index"].tolist(), ig["target"].tolist())], np.int64)
    both = pick >= 0
    rho = spearman(pixel_scores(torch.from_numpy(ig["maps"][both])).numpy(), cam["maps"][pick[both]])
    db.add_sample_metrics(ig["attribution_id"][both], "spearman_gradcam", rho)
    db.add_sample_metrics(cam["attribution_id"][pick[both]], "spearman_ig", rho)
    return {"rho": rho, "target": ig["target"][both]}


def summarise_cheap(found: dict[str, np.ndarray], class_names, tol: float) -> dict[str, tuple]:
    """Aggregates of cheap_metrics() over all explained maps: name -> (value, n, detail)."""
    out = {}
    if "rel_delta" in found:
        rel = found["rel_delta"]
        out["rel_delta"] = (np.nanmedian(rel), len(rel), {
            "median": np.nanmedian(rel), "p90": np.nanpercentile(rel, 90), "max": np.nanmax(rel), "tol": tol,
            "below_tol": float((rel < tol).mean()), "n_undefined": int(np.isnan(rel).sum())})
    for name in ("relevance_mass", "pointing_game"):
        if name in found:
            v, area = found[name], found["area"]
            ok = np.isfinite(v)
            out[name] = (np.mean(v[ok]) if ok.any() else np.nan, int(ok.sum()), {
                "random": np.mean(area[ok]) if ok.any() else np.nan, "class": "label",
                "per_class": by_class(v, found["label"], class_names),
                "random_per_class": by_class(np.where(ok, area, np.nan), found["label"], class_names),
                "n_undefined": int((~ok & np.isfinite(area)).sum())})  # all-zero maps of the true class
    return out


def expensive_checks(db, model, layer_name, rows: dict, cfg, device) -> dict[str, tuple]:
    """Sanity check, deletion/insertion and (IG) deltas vs steps for one method's stored maps of the
    first --trust-n images; per-map values stored, aggregates returned as name -> (value, n, detail)."""
    method = rows["method"][0]
    images, t, maps = rows["images"], torch.from_numpy(rows["target"]), torch.from_numpy(rows["maps"])
    out = {}
    if METHODS[method] is integrated_gradients:
        sweep = steps_needed(model, images, t, torch.from_numpy(rows["delta"]), cfg, device)
        out["steps_for_tol"] = (sweep["needed"], len(images), sweep)
    sanity = sanity_check(model, layer_name, METHODS[method], images, t, maps, cfg, device)
    for kind in ("abs", "signed"):
        db.add_sample_metrics(rows["attribution_id"], f"sanity_spearman_{kind}", sanity.pop(f"last_{kind}"))
    out["sanity_spearman"] = (sanity["abs"][-1], len(images), sanity)
    # Signed maps (IG) are also ranked by |map|: with a black baseline the dark evidence (nuclei,
    # the synthetic ink) gets NEGATIVE IG, so the positive part alone can rank it last.
    for suffix, kind in [("", "positive")] + ([("_abs", "abs")] if maps.ndim == 4 else []):
        curves = deletion_insertion(model, images, t, pixel_scores(maps, kind), cfg, device)
        auc = {k: curve_auc(c).numpy() for k, c in curves.items()}
        for name in ("deletion", "insertion"):
            db.add_sample_metrics(rows["attribution_id"], f"{name}_auc{suffix}", auc[name])
            db.add_sample_metrics(rows["attribution_id"], f"{name}_auc_random", auc[f"{name}_random"])
            out[f"{name}_auc{suffix}"] = (auc[name].mean(), len(images), {
                "random": auc[f"{name}_random"].mean(), "fractions": np.linspace(0, 1, cfg.curve_steps + 1),
                "scores": kind, "from": "image" if name == "deletion" else "blur",
                "to": cfg.baseline if name == "deletion" else "image",
                "curve": curves[name].mean(0).numpy(), "random_curve": curves[f"{name}_random"].mean(0).numpy()})
    return out


def measure_trust(db, model, model_name, split, idx, work, settings: dict, key, class_names, cfg, device) -> None:
    """Compute, per method, every trust metric of the stored maps; store them per map and aggregated.

    Cheap metrics (relative IG deltas, localisation, IG-vs-Grad-CAM agreement) cover every explained
    map, read back in chunks of images; the expensive ones (sanity check, deletion/insertion, deltas
    vs steps) the maps of the first --trust-n selected images."""
    pairs = set(zip(work["index"].tolist(), work["target"].tolist()))
    found = {}  # setting id (0: model-level) -> metric -> list of per-map arrays, one per chunk
    for chunk in np.array_split(idx, max(1, -(-len(idx) // READ_CHUNK))):
        rows = {m: stored_rows(db, key, sid, chunk, pairs) for m, sid in settings.items()}
        for method, r in rows.items():
            for name, v in cheap_metrics(db, model, split, r, cfg, device).items():
                found.setdefault(settings[method], {}).setdefault(name, []).append(v)
        if "ig" in rows and "gradcam" in rows:
            for name, v in agreement(db, rows["ig"], rows["gradcam"]).items():
                found.setdefault(0, {}).setdefault(name, []).append(v)
    found = {sid: {name: np.concatenate(v) for name, v in f.items()} for sid, f in found.items()}

    results = {}  # setting id (0: model-level) -> name -> (value, n, detail)
    if 0 in found:
        rho = found[0]["rho"]
        results[0] = {"agreement_ig_gradcam": (np.nanmean(rho) if np.isfinite(rho).any() else np.nan, len(rho), {
            "per_class": by_class(rho, found[0]["target"], class_names), "class": "target",
            "ig_setting": settings["ig"], "gradcam_setting": settings["gradcam"],
            "n_undefined": int(np.isnan(rho).sum())})}
    for method, sid in settings.items():
        results[sid] = summarise_cheap(found.get(sid, {}), class_names, cfg.trust_tol)
        r = stored_rows(db, key, sid, idx[: cfg.trust_n], pairs)
        if len(r["index"]):
            r["images"] = split.images[torch.from_numpy(r["index"])]
            layer_name = GRADCAM_LAYERS[model_name] if method == "gradcam" else None
            results[sid] |= expensive_checks(db, model, layer_name, r, cfg, device)

    # The control that ignores the model: its line in the sanity figure must stay at 1.
    images = split.images[torch.from_numpy(idx[: cfg.trust_n])]
    t = torch.zeros(len(images), dtype=torch.int64)  # any target: the control does not look at it
    edges, _ = attribute(edge_control, model, None, images, t, cfg, device)
    control = sanity_check(model, None, edge_control, images, t, edges, cfg, device)
    results.setdefault(0, {})["sanity_control_edge"] = (
        control["abs"][-1], len(images), {k: v for k, v in control.items() if not k.startswith("last_")})
    for sid, metrics in results.items():
        for name, (value, n, detail) in metrics.items():
            db.add_summary_metric(key[0], sid or None, *key[1:], name, value, n, detail)


def print_trust(rows: list[dict]) -> None:
    """One line per (model, method) from the stored summary metrics, then agreement per class."""
    def pair(m: dict, name: str) -> str:
        if name not in m:
            return "-"
        rnd = m[name]["detail"].get("random")
        return f"{m[name]['value']:.3f}" + ("" if rnd is None else f"/{rnd:.3f}")

    per_setting = {}
    for r in rows:
        per_setting.setdefault((r["model"], r["sha256"], r["method"] or "", r["setting_id"] or 0), {})[r["name"]] = r
    print("trust (n: images of the expensive checks; relΔ = |IG delta| / |f(x)-f(baseline)|; steps95: IG steps "
          "for 95% under --trust-tol; sanity ρ: Spearman |map| after randomising all layers; m/rnd: map vs random; "
          "maps ranked by their positive part, |map| rows by absolute value)")
    print(f"{'model':9s} {'method':10s} {'n':>5s} {'relΔ med':>8s} {'relΔ p90':>8s} {'steps95':>7s} "
          f"{'sanity ρ':>8s} {'deletion m/rnd':>14s} {'insertion m/rnd':>15s} {'rel.mass m/rnd':>14s} "
          f"{'pointing m/rnd':>14s}")
    for (model, _, method, sid), m in per_setting.items():
        if not sid:
            continue
        d = m.get("rel_delta", {}).get("detail", {})
        steps = m.get("steps_for_tol", {}).get("value", np.nan)
        n = m["sanity_spearman"]["n"] if "sanity_spearman" in m else 0
        rel = f"{d['median']:8.4f} {d['p90']:8.4f}" if d else f"{'-':>8s} {'-':>8s}"
        print(f"{model:9s} {method:10s} {n:5d} {rel} "
              f"{'-' if 'steps_for_tol' not in m else '>max' if np.isnan(steps) else int(steps):>7} "
              f"{pair(m, 'sanity_spearman'):>8s} {pair(m, 'deletion_auc'):>14s} "
              f"{pair(m, 'insertion_auc'):>15s} {pair(m, 'relevance_mass'):>14s} {pair(m, 'pointing_game'):>14s}")
        if "deletion_auc_abs" in m:
            print(f"{'':9s} {'  |map|':10s} {'':5s} {'':8s} {'':8s} {'':7s} {'':8s} {pair(m, 'deletion_auc_abs'):>14s} "
                  f"{pair(m, 'insertion_auc_abs'):>15s}")
    for (model, _, _, sid), m in per_setting.items():
        if sid:
            continue
        if "sanity_control_edge" in m:
            print(f"{model:9s} {'edge (ctl)':10s} sanity ρ after full randomisation "
                  f"{m['sanity_control_edge']['value']:.3f} (a map that ignores the model stays at 1)")
        if "agreement_ig_gradcam" in m:
            a = m["agreement_ig_gradcam"]
            classes = "  ".join(f"{c} {v:+.2f}" for c, v in a["detail"]["per_class"].items())
            print(f"{model:9s} IG vs Grad-CAM Spearman {a['value']:+.3f} (n={a['n']}); by target class: {classes}")


def plot_trust(rows: list[dict], class_names, folder: Path, title: str) -> list[Path]:
    """images/sanity_check.png, deletion_insertion.png and (with masks) localisation.png from the
    stored summary metrics of one model."""
    named = {}
    for r in rows:
        named.setdefault(r["name"], {})[r["method"] or "edge (control)"] = r
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    colours = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in rows if r["method"]}))}
    colours["edge (control)"] = "0.4"

    if "sanity_spearman" in named:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        lines = {**named["sanity_spearman"], **named.get("sanity_control_edge", {})}
        for ax, kind in zip(axes, ("abs", "signed")):
            for method, r in lines.items():
                d = r["detail"]
                ax.plot(range(len(d["layers"])), d[kind], marker="o", ms=3, color=colours[method],
                        ls="--" if method == "edge (control)" else "-", label=f"{method} (n={r['n']})")
            layers = max((r["detail"]["layers"] for r in lines.values()), key=len)
            ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
            ax.axhline(0, color="0.8", lw=0.8)
            ax.set_xlabel("layers randomised, cascading from the output")
            ax.set_title(f"Spearman with the original map ({'|map|' if kind == 'abs' else 'signed map'})", fontsize=9)
        axes[0].set_ylabel("mean rank correlation")
        lowest = np.nanmin([v for r in lines.values() for k in ("abs", "signed") for v in r["detail"][k]] + [-0.1])
        axes[0].set_ylim(float(lowest) - 0.05, 1.05)
        axes[1].legend(fontsize=8)
        paths.append(_save_figure(fig, folder / "sanity_check.png", f"model parameter randomisation: {title}"))

    if "deletion_auc" in named:
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
        paths.append(_save_figure(fig, folder / "deletion_insertion.png", f"deletion / insertion: {title}"))

    if "relevance_mass" in named:
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
        paths.append(_save_figure(fig, folder / "localisation.png", f"localisation: {title}"))
    return paths


def _save_figure(fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def merge(cfg: ExplainConfig) -> dict:
    """--merge-from: copy each database into --db, one transaction each. Every source is checked
    first, before --db is opened or created, so a bad one in the list leaves every file as it was."""
    check_sources(cfg.merge_list, cfg.db)
    merged = {}
    with ExplanationDB(cfg.db) as db:
        for path in cfg.merge_list:
            c = merged[path] = db.merge_from(path)
            print(f"merged {path} into {cfg.db}: {c['maps']} maps added, {c['maps_present']} already there, "
                  f"{c['map_conflicts']} conflicting (--db's kept); {c['models']} models, {c['settings']} "
                  f"settings, {c['samples']} samples, {c['sample_metrics'] + c['summary_metrics']} metrics "
                  f"added, {c['metric_conflicts']} left out")
        summary = db.summary()
    print_summary(summary)
    return {"config": asdict(cfg), "merged": merged, "summary": summary}


def print_summary(summary: list[dict]) -> None:
    for row in summary:
        print(f"{row['model']:9s} {row['sha256']} {row['method']:10s} {row['dataset']:24s} {row['split']:5s} "
              f"maps {row['n_maps']:6d} errors {row['n_errors']:5d} mean|delta| {row['mean_abs_delta']:.2e}")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ExplainConfig, argv, description=__doc__.split("\n")[0])
    if cfg.merge_from:
        return merge(cfg)
    device = resolve_device(cfg.device)

    # The model and its data, both described by the checkpoint alone.
    model, mcfg, ckpt = load_checkpoint(cfg.checkpoint, device)
    data = data_for_run(mcfg, (cfg.split,), cfg.data_dir)
    if data.task.startswith("multi-label"):
        raise DataError(f"{data.source}: explaining multi-label tasks is not supported")
    split = data.splits[cfg.split]
    dataset_id = data.name  # "synthetic-seed0", "pathmnist", the stem of a --data-dir file
    print(f"explaining {cfg.split} split of {data.source} with {mcfg['model']} ({cfg.checkpoint})")

    # Predictions decide the explained class and the selection (--only-errors); a shard takes its
    # slice of the whole selection, so every shard must see the same predictions.
    scores = predict(model, split.images, 128, device, data.task)  # float32: the class IG explains
    pred, conf, labels = scores.argmax(1), scores.max(1), split.labels.numpy()
    idx = select(labels, pred, cfg)
    whole = not cfg.shard  # figures and --trust need the whole selection
    if not whole:
        n_selected, idx = len(idx), shard_slice(idx, *cfg.shard_kn)
        print(f"shard {cfg.shard}: {len(idx)} of {n_selected} selected images")
        if cfg.figures or cfg.trust:
            print(f"shard {cfg.shard}: {' and '.join(['figures'] * cfg.figures + ['--trust'] * cfg.trust)} "
                  "skipped, they need the whole selection: once every shard is done, run explain.py again "
                  "without --shard (it finds every map stored and only draws and measures)")
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
        fast = inference_copy(model)  # BatchNorm folded, channels_last: IG 1.5x faster on CPU
        layer = gradcam_layer(fast, mcfg["model"])
        settings = {}
        for method in cfg.method_list:
            setting_id = settings[method] = db.add_setting(method, method_params(method, cfg, mcfg["model"]))
            n = explain(db, fast, layer, split.images, work, method, cfg, device, (model_id, setting_id))
            print(f"{method}: {n} maps written, {len(work['index']) - n} already in {cfg.db}")
            if whole and cfg.figures and method in ("ig", "gradcam") and len(idx):
                rows = db.maps(model_id=model_id, setting_id=setting_id, dataset=dataset_id, size=data.size,
                               split=cfg.split, indices=idx.tolist())
                pick = one_per_class(rows, data.num_classes)
                path = Path(cfg.checkpoint).parent / "images" / f"{method}_examples.png"
                plot_examples(split.images, {k: v[pick] for k, v in rows.items() if v is not None},
                              data.class_names, method, path,
                              f"{mcfg['model']} on {cfg.split} split of {dataset_id} ({data.size}x{data.size})")
                print(f"wrote {path}")
        trust = []
        if whole and cfg.trust and len(idx):
            key = (model_id, dataset_id, data.size, cfg.split)
            measure_trust(db, model, mcfg["model"], split, idx, work, settings, key, data.class_names, cfg, device)
            trust = [r for r in db.summary_metrics(model_id) if (r["dataset"], r["size"], r["split"]) == key[1:]
                     and r["setting_id"] in (None, *settings.values())]  # this run's settings
        summary = db.summary()
    print_summary(summary)
    if trust:
        print_trust(trust)
        if cfg.figures:
            title = f"{mcfg['model']} on the {cfg.split} split of {dataset_id} ({data.size}x{data.size})"
            for path in plot_trust(trust, data.class_names, Path(cfg.checkpoint).parent / "images", title):
                print(f"wrote {path}")
    return {"config": asdict(cfg), "summary": summary, "trust": trust}


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, DatabaseError) as e:
        sys.exit(f"error: {e}")
