"""The explanation leaderboard: every attribution method over the real cross-validation folds, ranked
by ROAD, with the randomisation checks, repeatability across training seeds and the time per map.

    python bench/bench.py xai                  # 5 folds x 3 seeds on the 718 real images (hours on 2 cores)
    python bench/bench.py xai --quick          # 2 folds x 2 seeds, 24 images each: a smoke run
    python bench/bench.py xai --json xai.json --figure road.png
    python bench/bench.py xai --entries occlusion,grad-cam   # only these entries (same folds, seeds, models)

Each (fold, seed) trains LightCNN with train.py's defaults (training.Recipe(); bench.py's --train
overrides them, and `--train` + FIRST_RECIPE gives the first leaderboard's recipe) on the other folds
and explains its held-out fold, the predicted class of every image, with every entry of ENTRIES.
The ground-truth yardstick (planted marks) is bench/planted.py. Per entry:
- ROAD combined minus a random map's (road.py; the same per-image seeds for tie order and imputation
  noise, so the difference is paired), per image averaged over the seeds' models, with a 95%
  bootstrap interval over images; MoRF and LeRF separately; the model-blind Sobel-edge control beside.
- Randomisation on the first --rand-n held-out images of each fold (the seed-0 model): MPRT (Spearman
  of |map| after re-initialising every layer; lower: better), sMPRT and eMPRT (mprt.py; no sMPRT for
  SmoothGrad, which is itself the noise-averaged IG).
- Repeatability: Spearman of the maps of one image by the models of different seeds (images every
  seed predicts the same class), mean over seed pairs and images; higher: less training luck.
- Milliseconds per map on this machine (the median over models).
These are cross-validation numbers on 718 images from one centre, not the PathMNIST benchmark.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from attribution import METHODS, AttributionSettings, pixel_scores
from cv import carve_val, fit_ours, stratified_folds
from data import Split, load_data, normalize
from model import GRADCAM_LAYERS, inference_copy, predict
from mprt import cascade, efficient_mprt, randomised, smooth_mprt
from road import FRACTIONS, bootstrap_interval, road_curves
from road import combined as road_combined
from stats import nanmean, spearman
from training import Recipe
from trust import edge_control

# The recipe of the first leaderboard (docs/trust.md), one pass per epoch and no acquisition jitter:
FIRST_RECIPE = "epochs=40 epoch_steps=1 stain_offset=0 colour_jitter=0 sharpness=0 erase=0 jitter_share=1"

# name -> (method, AttributionSettings overrides)
ENTRIES = {
    "IG, black reference": ("ig", {"baseline": "black"}),
    "IG, Gaussian-blur reference": ("ig", {"baseline": "gaussian"}),
    "Blur IG (scale-space path)": ("blur_ig", {}),
    "IG, box-blur reference": ("ig", {"baseline": "blur"}),
    "IG, mean-colour reference": ("ig", {"baseline": "mean"}),
    "SmoothGrad (IG, Gaussian blur)": ("smoothgrad", {"baseline": "gaussian"}),
    "expected gradients": ("expected_gradients", {}),
    "occlusion, black fill": ("occlusion", {"baseline": "black"}),
    "occlusion, Gaussian-blur fill": ("occlusion", {"baseline": "gaussian"}),
    "Grad-CAM": ("gradcam", {}),
    "Grad-CAM++": ("gradcam++", {}),
    "HiResCAM": ("hirescam", {}),
    "LayerCAM": ("layercam", {}),
    "LRP, ε-γ-box rules": ("lrp", {}),
    "LRP, ε-z⁺-flat rules": ("lrp", {"lrp_composite": "epsilon_plus_flat"}),
    "Blur IG × Grad-CAM": ("blur_ig_x_gradcam", {}),
    "LRP × Grad-CAM": ("lrp_x_gradcam", {}),
    "LRP × Grad-CAM (ε-z⁺-flat rules)": ("lrp_x_gradcam", {"lrp_composite": "epsilon_plus_flat"}),
    "(Blur IG + LRP) × Grad-CAM": ("blur_ig_lrp_x_gradcam", {}),
}
EDGES = "Sobel edges (ignores the model)"


class Settings(AttributionSettings):
    """explain.py's knobs for the methods plus those of the randomisation checks."""
    trust_seed = 0
    smprt_samples = 10


def pick(words: str) -> list[str] | None:
    """The ENTRIES whose name contains one of the comma-separated words (None: all of them)."""
    words = [w.strip().lower() for w in words.split(",") if w.strip()]
    if not words:
        return None
    chosen = [e for e in ENTRIES if any(w in e.lower() for w in words)]
    if not chosen:
        raise SystemExit(f"--entries {','.join(words)!r} matches none of: {'; '.join(ENTRIES)}")
    return chosen


def explain(entry: str, net, x_uint8: torch.Tensor, targets: torch.Tensor, seeds, refs: torch.Tensor) -> torch.Tensor:
    """(N, H, W) pixel scores of one entry (signed channel sum for input-space maps)."""
    method, overrides = ENTRIES[entry]
    s = replace(Settings(), **overrides)
    s.references = refs
    layer = net.get_submodule(GRADCAM_LAYERS["lightcnn"]) if METHODS[method].needs_layer else None
    x = normalize(x_uint8).contiguous(memory_format=torch.channels_last)
    maps = METHODS[method].attribute(net, layer, x, targets, s, seeds).maps.detach().float()
    return pixel_scores(maps, "signed")


def settings_for(entry: str, refs) -> Settings:
    s = replace(Settings(), **ENTRIES[entry][1])
    s.references = refs
    return s


def run(real: Path, k: int = 5, seeds: int = 3, recipe: Recipe = Recipe(), rand_n: int = 16, n_per_fold: int = 0,
        entries: list[str] | None = None) -> dict:
    entries = entries or list(ENTRIES)
    data = load_data("pathmnist", 28, real, ("test",))
    images, labels = data.splits["test"].images, data.splits["test"].labels.numpy()
    per_image = {e: [] for e in entries + [EDGES]}           # ROAD - random per image (mean over seeds)
    curves = {e: {"morf": [], "lerf": []} for e in entries + [EDGES, "random map"]}
    repeat = {e: [] for e in entries}
    rand = {e: {"mprt": [], "smprt": [], "emprt": []} for e in entries}
    ms = {e: [] for e in entries}
    accs = []
    for f, test_idx in enumerate(stratified_folds(labels, k, seed=0)):
        test_idx = test_idx[:n_per_fold] if n_per_fold else test_idx
        train_idx, val_idx = carve_val(np.setdiff1d(np.arange(len(labels)), stratified_folds(labels, k, 0)[f]),
                                       labels, 0.2, seed=100)
        part = lambda i: Split(images[i], torch.from_numpy(labels[i]))
        fold = replace(data, splits={"train": part(train_idx), "val": part(val_idx), "test": part(test_idx)})
        x_uint8 = images[test_idx]
        x = normalize(x_uint8)
        # references for expected gradients: the fold's training images (all of them, 28 px)
        refs = normalize(images[train_idx]).contiguous(memory_format=torch.channels_last)
        img_seeds = [int(i) * 1009 + 7 for i in test_idx]
        gains = {e: [] for e in entries + [EDGES]}
        maps_by_seed, preds = {e: [] for e in entries}, []
        for s in range(seeds):
            t0 = time.perf_counter()
            net, _ = fit_ours(fold, recipe, s, 10)
            fast = inference_copy(net)
            pred = torch.from_numpy(predict(net, x_uint8, 256, "cpu", data.task).argmax(1))
            preds.append(pred)
            accs.append(float((pred.numpy() == labels[test_idx]).mean()))
            print(f"fold {f} seed {s}: trained in {time.perf_counter() - t0:.0f} s, held-out acc {accs[-1]:.3f}",
                  flush=True)
            base = road_curves(fast, x, pred, torch.rand(len(x), 28, 28, generator=torch.Generator().manual_seed(s)),
                               img_seeds)
            _collect(curves["random map"], base)
            edges = edge_control(None, None, x, pred, None, None).maps
            for e, scores in [(EDGES, edges)] + [(e, None) for e in entries]:
                if scores is None:
                    t1 = time.perf_counter()
                    scores = explain(e, fast, x_uint8, pred, img_seeds, refs)
                    ms[e].append(1000 * (time.perf_counter() - t1) / len(x))
                    maps_by_seed[e].append(scores)
                c = road_curves(fast, x, pred, scores, img_seeds)
                _collect(curves[e], c)
                gains[e].append(road_combined(c) - road_combined(base))
            if s == 0 and rand_n:
                _randomisation(rand, entries, net, x_uint8[:rand_n], pred[:rand_n], img_seeds[:rand_n], refs)
        for e in gains:
            per_image[e].append(np.mean(gains[e], 0))
        same = torch.stack(preds).eq(preds[0]).all(0).numpy()
        for e in entries:
            rhos = [spearman(a[same].numpy(), b[same].numpy()) for a, b in itertools.combinations(maps_by_seed[e], 2)]
            repeat[e].append(nanmean(np.stack(rhos), 0) if rhos else np.full(int(same.sum()), np.nan))
        print(f"fold {f}: " + ", ".join(f"{e} {np.mean(per_image[e][-1]):+.3f}" for e in entries + [EDGES]), flush=True)
    rows = {}
    for e in entries + [EDGES]:
        g = np.concatenate(per_image[e])
        rows[e] = {"road_minus_random": float(g.mean()), "ci": bootstrap_interval(g), "n": len(g),
                   "morf": np.mean(np.concatenate(curves[e]["morf"]), 0).tolist(),
                   "lerf": np.mean(np.concatenate(curves[e]["lerf"]), 0).tolist(),
                   }
        if e in repeat:
            rows[e] |= {**{m: float(nanmean(np.concatenate(v))) if v else float("nan") for m, v in rand[e].items()},
                        "repeatability": float(nanmean(np.concatenate(repeat[e]))), "ms_per_map": float(np.median(ms[e])),
                        "method": ENTRIES[e][0], **ENTRIES[e][1]}
    rows["random map"] = {"morf": np.mean(np.concatenate(curves["random map"]["morf"]), 0).tolist(),
                          "lerf": np.mean(np.concatenate(curves["random map"]["lerf"]), 0).tolist()}
    return {"rows": rows, "k": k, "seeds": seeds, "recipe": asdict(recipe), "n_images": len(np.concatenate(per_image[entries[0]])),
            "rand_n": rand_n, "held_out_acc": float(np.mean(accs)), "fractions": list(FRACTIONS)}


def _collect(into: dict, c: dict) -> None:
    for order in ("morf", "lerf"):
        into[order].append(c[order].numpy())


def _randomisation(rand: dict, entries, net, x_uint8, pred, img_seeds, refs) -> None:
    """MPRT, sMPRT and eMPRT of every entry on a few images; the trained model `net` (BatchNorm not
    folded, so every layer can be re-initialised) against its fully re-initialised copy."""
    stages = cascade(net, 0)
    full = randomised(net, stages)
    for e in entries:
        method = METHODS[ENTRIES[e][0]]
        s = settings_for(e, refs)
        layer = GRADCAM_LAYERS["lightcnn"] if method.needs_layer else None
        own, other = (explain(e, m, x_uint8, pred, img_seeds, refs) for m in (net, full))
        rand[e]["mprt"].append(np.nan_to_num(spearman(own.abs().numpy(), other.abs().numpy()), nan=0.0))
        if method.attribute is not METHODS["smoothgrad"].attribute:  # SmoothGrad is itself the denoised IG
            rand[e]["smprt"].append(smooth_mprt(net, layer, method.attribute, x_uint8, pred, s, "cpu", img_seeds,
                                                stages))
        rand[e]["emprt"].append(efficient_mprt(net, layer, method.attribute, x_uint8, pred, s, "cpu", img_seeds,
                                               stages)["emprt"])


def report(out: dict) -> str:
    """The leaderboard as a Markdown table, best ROAD first."""
    rows = out["rows"]
    ranked = sorted((e for e in rows if "road_minus_random" in rows[e]), key=lambda e: -rows[e]["road_minus_random"])
    r = out["recipe"]
    lines = [f"{out['k']} folds x {out['seeds']} seeds (LightCNN, {r['epochs']} epochs of at least {r['epoch_steps']} steps), "
             f"{out['n_images']} held-out real images (mean held-out accuracy {out['held_out_acc']:.3f}); "
             f"randomisation checks on {out['rand_n']} images per fold. Cross-validation on 718 images from one "
             "centre, not the PathMNIST benchmark.", "",
             "| method | ROAD − random [95% CI] | MoRF ↓ | LeRF ↑ | MPRT ρ ↓ | sMPRT ρ ↓ | eMPRT ↑ | repeatability ρ ↑ "
             "| ms/map |", "|---|---|---|---|---|---|---|---|---:|"]
    fmt = lambda v, spec: "–" if v is None or not np.isfinite(v) else format(v, spec)
    for e in ranked:
        r = rows[e]
        lines.append(f"| {e} | {r['road_minus_random']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
                     f"{np.mean(r['morf']):.3f} | {np.mean(r['lerf']):.3f} | {fmt(r.get('mprt'), '.2f')} | "
                     f"{fmt(r.get('smprt'), '.2f')} | {fmt(r.get('emprt'), '+.2f')} | "
                     f"{fmt(r.get('repeatability'), '.2f')} | {fmt(r.get('ms_per_map'), '.1f')} |")
    rnd = rows["random map"]
    lines.append(f"| random map (the reference) | 0 | {np.mean(rnd['morf']):.3f} | {np.mean(rnd['lerf']):.3f} | – | – | – | – | – |")
    return "\n".join(lines)


def figure(out: dict, path: Path, show: list[str] | None = None) -> Path:
    """MoRF and LeRF curves (class probability against the fraction removed) of the leading entries,
    the random map and the edge control."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = out["rows"]
    ranked = sorted((e for e in rows if "road_minus_random" in rows[e] and e != EDGES),
                    key=lambda e: -rows[e]["road_minus_random"])
    show = show or ranked[:3] + [e for e in ("Grad-CAM", "IG, black reference") if e in rows and e not in ranked[:3]]
    fr = out["fractions"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, order, title in zip(axes, ("morf", "lerf"), ("MoRF: most relevant removed first (lower: better)",
                                                         "LeRF: least relevant removed first (higher: better)")):
        for e in show + [EDGES, "random map"]:
            style = {"random map": dict(color="black", ls="--"), EDGES: dict(color="grey", ls=":")}.get(e, {})
            ax.plot(fr, rows[e][order], marker="o", ms=3, label=e, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of pixels removed (filled by noisy linear imputation)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probability of the explained class")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"ROAD on {out['n_images']} held-out real PathMNIST images ({out['k']}-fold CV x {out['seeds']} "
                 "seeds, LightCNN)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
