"""Trust metrics: do stored attribution maps reflect the model? (explain.py --trust)

    from trust import METRICS, Context, Maps
    values = METRICS["deletion_insertion"].measure(ctx, maps)   # per-map arrays by name, or None: not applicable
    summary = METRICS["deletion_insertion"].summarise(values, ctx)  # name -> Summary(value, n, detail)

Each metric is a `measure` function (ctx, maps) -> {name: per-map array} plus a `summarise`
(the mean per name unless given). A 1-D array under a plain name is stored per map in the database
(table sample_metrics); arrays under names starting with "_" (curves, per-stage values) only feed
the summary. Cheap metrics run over every explained map. `expensive` ones run on a seeded random
order of the selected images, 32 and then 16 at a time, until the 95% interval of each of their
headlines (`intervals`, `stop_on`) is at most --trust-halfwidth wide on either side, or --trust-n
images are used (trust_run.py). Adding a metric is one function plus one line in METRICS.

No map is computed twice: MPRT's cascade of randomised models gives eMPRT both of its maps and
sMPRT its noise-free ones (Context.stage_maps, per chunk of images); ROAD's random-map and edge-map
controls, which depend on the images, targets and seeds alone, are computed once per chunk.

Pixel scores from a map: IG-type maps (N,C,H,W) are summed over the colour channels. The sanity
check compares that signed sum and its absolute value with the model's own maps, as Adebayo et al.
report both. Everything that asks "where is the evidence FOR the class" (the deletion/insertion
order, relevance mass, the pointing game, agreement with Grad-CAM, whose ReLU keeps positive
evidence only) uses its positive part, as relevance mass does in Arras et al. (2022); deletion and
insertion also rank signed maps by |map| (stored as *_abs), because that choice can flip the verdict.
Grad-CAM maps are the stored upsampled maps, non-negative already.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from attribution import METHODS, Attribution, attribute_batches, pixel_scores
from data import normalize
from groundtruth import localisation_scores
from mprt import (cascade, draw_seed, emprt_scores, mprt_scores, randomisation_stages, randomised, sanity_check,
                  smprt_scores, stage_maps)
from stats import clustered_halfwidth, mean_halfwidth, nanmean, spearman, wilson_halfwidth
from deletion import curve_auc, deletion_insertion
from road import FRACTIONS, bootstrap_interval, road_curves
from road import combined as road_combined

TRUST_FRACTION = 0.95  # completeness: "steps needed" = fewest steps with this share under --trust-tol


@dataclass
class TrustSettings:
    """The knobs of the trust checks (explain.py's config extends this class, so each is a flag)."""
    trust_n: int = field(default=256, metadata={"min": 1, "help": "the most images an expensive check (MPRT, sMPRT, eMPRT, ROAD, deletion/insertion, completeness vs steps) may use"})
    trust_halfwidth: float = field(default=0.05, metadata={"min": 0, "help": "an expensive check takes 32 images, then adds 16 at a time until its headline's 95 percent interval is mean +- this at most (0: always --trust-n images); 0.05 fits the first run in minutes, 0.03 takes about 3 times the images"})
    trust_tol: float = field(default=0.01, metadata={"above": 0, "help": "completeness: |delta| / |f(x)-f(baseline)| below this counts as converged"})
    trust_steps: str = field(default="4,8,16,32,64,128", metadata={"help": "completeness: IG step counts tried on the images of that check"})
    curve_steps: int = field(default=20, metadata={"min": 1, "help": "deletion/insertion: K steps along the fraction of pixels switched"})
    trust_seed: int = field(default=0, metadata={"help": "seeds re-initialisation, random pixel orders and tie breaks"})
    smprt_samples: int = field(default=10, metadata={"min": 1, "help": "sMPRT: noisy copies averaged per map (Quantus uses 50 on ImageNet)"})

    @property
    def trust_step_list(self) -> list[int]:
        return sorted({int(s) for s in self.trust_steps.split(",") if s.strip()})

    def check(self) -> str | None:
        try:
            if not self.trust_step_list or min(self.trust_step_list) < 1:
                raise ValueError
        except ValueError:
            return f"--trust-steps must be comma-separated integers >= 1, got {self.trust_steps!r}"
        return None


@dataclass
class Maps:
    """One method's stored maps of some images, with what the metrics need besides."""
    method: str
    attribution_id: np.ndarray
    index: np.ndarray
    label: np.ndarray
    target: np.ndarray
    seeds: np.ndarray
    maps: torch.Tensor                 # (N, C, H, W) signed or (N, H, W) non-negative, float32
    delta: torch.Tensor | None         # (N,) stored IG deltas
    images: torch.Tensor               # uint8 (N, C, H, W)
    masks: torch.Tensor | None = None  # bool (N, H, W) evidence masks (synthetic data)


@dataclass
class Context:
    model: torch.nn.Module        # the trained model (BatchNorm not folded, so each layer can be re-initialised)
    layer_name: str | None        # the method's layer (Grad-CAM), None for input-space methods
    cfg: object                   # AttributionSettings + TrustSettings + batch_size (ExplainConfig)
    device: torch.device
    class_names: list[str]
    cache: dict = field(default_factory=dict)  # models and maps shared between metrics, for one chunk of images
    draw_of: dict = field(default_factory=dict)  # image index -> the random model it meets (0 where absent)

    def draws(self, m: "Maps") -> np.ndarray:
        """Per map, the random model its image meets (trust_run: DRAW_GROUP images each)."""
        return np.array([self.draw_of.get(i, 0) for i in m.index.tolist()], np.int64)

    def by_draw(self, m: "Maps") -> list[tuple[int, np.ndarray]]:
        """(draw, rows of m) per random model that m's images meet."""
        draws = self.draws(m)
        return [(int(d), np.flatnonzero(draws == d)) for d in np.unique(draws)]

    def stages(self, draw: int) -> list:
        """The cascade of randomised layers of one draw (mprt.cascade), kept until the cache is cleared."""
        if ("cascade", draw) not in self.cache:
            self.cache["cascade", draw] = cascade(self.model, draw_seed(self.cfg.trust_seed, draw))
        return self.cache["cascade", draw]

    def randomised(self, draw: int) -> torch.nn.Module:
        """The fully randomised model of one draw: every stage of its cascade applied."""
        if ("randomised", draw) not in self.cache:
            self.cache["randomised", draw] = randomised(self.model, self.stages(draw))
        return self.cache["randomised", draw]

    def stage_maps(self, m: "Maps", last_only: bool = False) -> list[torch.Tensor]:
        """m's method's maps of m's images, each image under its own draw: the trained model, then
        each stage of the cascade (with `last_only`: the trained and the fully randomised model),
        shared until the cache is cleared."""
        key = ("stages", m.method, m.index.tobytes(), m.target.tobytes())
        if key in self.cache:
            return self.cache[key]
        out = []
        for draw, rows in self.by_draw(m):
            stages = [("all", {k: v for _, s in self.stages(draw) for k, v in s.items()})] if last_only \
                else self.stages(draw)
            r = torch.from_numpy(rows)
            maps = stage_maps(self.model, _layer(self, m), METHODS[m.method].attribute, m.images[r],
                              torch.from_numpy(m.target[rows]), self.cfg, self.device, m.seeds[rows], stages)
            out = out or [torch.empty(len(m.index), *x.shape[1:]) for x in maps]
            for whole, part in zip(out, maps):
                whole[r] = part
        if not last_only:
            self.cache[key] = out
        return out


@dataclass
class Summary:
    value: float
    n: int
    detail: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Building blocks

def by_class(values: np.ndarray, classes: np.ndarray, class_names) -> dict:
    """Mean of the defined values per class name (classes without any are left out)."""
    return {class_names[c]: float(np.nanmean(values[classes == c])) for c in np.unique(classes)
            if np.isfinite(values[classes == c]).any()}


def input_control(model, layer, x, target, cfg, seeds):
    """Sanity-check control that ignores the model: the input image itself."""
    return Attribution(x)


def edge_control(model, layer, x, target, cfg, seeds):
    """Sanity-check control that ignores the model: Sobel gradient magnitude of the grey image."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device)
    grey = F.pad(x.mean(1, keepdim=True), [1] * 4, mode="replicate")
    gx, gy = F.conv2d(grey, k.view(1, 1, 3, 3)), F.conv2d(grey, k.t().reshape(1, 1, 3, 3))
    return Attribution((gx * gx + gy * gy).sqrt()[:, 0])


CONTROLS = {"input": input_control, "edge": edge_control}


@torch.no_grad()
def logit_gap(model, images, targets, cfg, device, method: str = "ig") -> torch.Tensor:
    """f(x)[t] - f(reference)[t] on logits: what the method's maps must sum to (completeness; its
    reference: IG's --baseline, Blur IG's blurred image), or f(x)[t] itself for LRP (conservation)."""
    out, reference = [], METHODS[method].reference
    for start in range(0, len(images), cfg.ig_internal_batch):
        x = normalize(images[start:start + cfg.ig_internal_batch].to(device))
        t = targets[start:start + cfg.ig_internal_batch].to(device)[:, None]
        base = 0 if reference is None else model(reference(x, cfg)).gather(1, t)
        out.append((model(x).gather(1, t) - base)[:, 0].double().cpu())
    return torch.cat(out)


def relative_delta(delta: torch.Tensor, gap: torch.Tensor) -> np.ndarray:
    """|delta| / |f(x)[t] - f(b)[t]|; NaN where the logits do not differ (nothing to be complete about)."""
    rel = (delta.double().abs() / gap.abs()).numpy()
    return np.where(np.isfinite(rel), rel, np.nan)


def steps_needed(model, images, targets, stored_delta, cfg, device, method: str = "ig") -> dict:
    """Relative deltas of an IG-type method at each of --trust-steps, per map ("rel", (N, S)) and as
    the share under --trust-tol and the median per step count; the fewest steps with 95% under
    --trust-tol; how far the deltas recomputed at --ig-steps are from the stored ones (they should agree)."""
    gap = logit_gap(model, images, targets, cfg, device, method)
    rel = []
    out = {"steps": cfg.trust_step_list, "tol": cfg.trust_tol, "recomputed_minus_stored": np.full(len(images), np.nan)}
    for steps in cfg.trust_step_list:
        _, delta = attribute_batches(METHODS[method].attribute, model, None, images, targets,
                                     replace(cfg, ig_steps=steps), device, cfg.batch_size)
        rel.append(relative_delta(delta, gap))
        if steps == cfg.ig_steps:
            out["recomputed_minus_stored"] = (delta - stored_delta).abs().numpy()
    return summarise_steps(np.stack(rel, 1), out)


def summarise_steps(rel: np.ndarray, out: dict) -> dict:
    """steps_needed's shares, medians and verdict from per-map relative deltas (N, S)."""
    out = {**out, "rel": rel, "below_tol": (rel < out["tol"]).mean(0).tolist(),
           "median": [float(np.nanmedian(r)) if np.isfinite(r).any() else np.nan for r in rel.T]}
    enough = [s for s, f in zip(out["steps"], out["below_tol"]) if f >= TRUST_FRACTION]
    out["needed"] = enough[0] if enough else np.nan
    return out


# ------------------------------------------------------------------------------------------------
# The metrics: measure (per-map arrays) and summarise (name -> Summary)

def mean_summary(values: dict[str, np.ndarray], ctx: Context) -> dict[str, Summary]:
    """The default summary: the mean of each stored per-map value over the maps where it is defined."""
    return {name: Summary(float(nanmean(v)), int(np.isfinite(v).sum()))
            for name, v in values.items() if not name.startswith("_") and v.ndim == 1}


def measure_completeness(ctx: Context, m: Maps):
    if METHODS[m.method].reference is None and not METHODS[m.method].conserves_logit:
        return None
    gap = logit_gap(ctx.model, m.images, torch.from_numpy(m.target), ctx.cfg, ctx.device, m.method)
    return {"rel_delta": relative_delta(m.delta, gap)}


def summarise_completeness(values, ctx) -> dict[str, Summary]:
    rel, tol = values["rel_delta"], ctx.cfg.trust_tol
    return {"rel_delta": Summary(float(np.nanmedian(rel)), len(rel), {
        "median": np.nanmedian(rel), "p90": np.nanpercentile(rel, 90), "max": np.nanmax(rel), "tol": tol,
        "below_tol": float((rel < tol).mean()), "n_undefined": int(np.isnan(rel).sum())})}


def measure_localisation(ctx: Context, m: Maps):
    if m.masks is None:
        return None
    own = m.target == m.label  # the mask marks the evidence for the true class only
    loc = localisation_scores(pixel_scores(m.maps), m.masks.bool())
    return {"relevance_mass": np.where(own, loc["mass"].numpy(), np.nan),
            "pointing_game": np.where(own, loc["pointing"].numpy(), np.nan),
            "_area": np.where(own, loc["area"].numpy(), np.nan)}


def summarise_localisation(values, ctx) -> dict[str, Summary]:
    out, area, label = {}, values["_area"], values["_label"]
    for name in ("relevance_mass", "pointing_game"):
        v = values[name]
        ok = np.isfinite(v)
        out[name] = Summary(float(np.mean(v[ok])) if ok.any() else np.nan, int(ok.sum()), {
            "random": np.mean(area[ok]) if ok.any() else np.nan, "class": "label",
            "per_class": by_class(v, label, ctx.class_names),
            "random_per_class": by_class(np.where(ok, area, np.nan), label, ctx.class_names),
            "n_undefined": int((~ok & np.isfinite(area)).sum())})  # all-zero maps of the true class
    return out


def measure_steps(ctx: Context, m: Maps):
    if METHODS[m.method].reference is None:
        return None
    sweep = steps_needed(ctx.model, m.images, torch.from_numpy(m.target), m.delta, ctx.cfg, ctx.device, m.method)
    return {"_rel_by_steps": sweep["rel"], "_recomputed_minus_stored": sweep["recomputed_minus_stored"]}


def summarise_steps_needed(values, ctx) -> dict[str, Summary]:
    s = summarise_steps(values["_rel_by_steps"], {"steps": ctx.cfg.trust_step_list, "tol": ctx.cfg.trust_tol})
    s.pop("rel")
    recomputed = values["_recomputed_minus_stored"]
    if np.isfinite(recomputed).any():  # --ig-steps is one of --trust-steps
        s["recomputed_minus_stored"] = float(np.nanmax(recomputed))
    return {"steps_for_tol": Summary(s["needed"], len(values["_label"]), s)}


def _layer(ctx: Context, m: Maps) -> str | None:
    return ctx.layer_name if METHODS[m.method].needs_layer else None


def measure_sanity(ctx: Context, m: Maps):
    """MPRT (the cascading check, mprt.sanity_check) and eMPRT, from one set of randomised maps."""
    maps = ctx.stage_maps(m)
    rho = mprt_scores(maps, m.maps)
    return {"sanity_spearman_abs": rho["abs"][:, -1], "sanity_spearman_signed": rho["signed"][:, -1],
            "_abs": rho["abs"], "_signed": rho["signed"], "emprt": emprt_scores(maps[0], maps[-1])["emprt"],
            "_draw": ctx.draws(m)}


def summarise_sanity(values, ctx) -> dict[str, Summary]:
    layers = ["none"] + [s for s, _ in randomisation_stages(ctx.model)]
    detail = {"layers": layers, "abs": nanmean(values["_abs"], 0).tolist(),
              "signed": nanmean(values["_signed"], 0).tolist()}
    return {"sanity_spearman": Summary(detail["abs"][-1], len(values["_abs"]), detail),
            **mean_summary({"emprt": values["emprt"]}, ctx)}


def measure_deletion(ctx: Context, m: Maps):
    # Signed maps (IG) are also ranked by |map|: with a black baseline the dark evidence (nuclei,
    # the synthetic ink) gets NEGATIVE IG, so the positive part alone can rank it last.
    out, t = {}, torch.from_numpy(m.target)
    for suffix, kind in [("", "positive")] + ([("_abs", "abs")] if m.maps.ndim == 4 else []):
        curves = deletion_insertion(ctx.model, m.images, t, pixel_scores(m.maps, kind), ctx.cfg, ctx.device)
        for name in ("deletion", "insertion"):
            out[f"{name}_auc{suffix}"] = curve_auc(curves[name]).numpy()
            out[f"{name}_auc_random"] = curve_auc(curves[f"{name}_random"]).numpy()
            out[f"_{name}{suffix}_curve"] = curves[name].numpy()
            out[f"_{name}_random_curve"] = curves[f"{name}_random"].numpy()
    return out


def summarise_deletion(values, ctx) -> dict[str, Summary]:
    out, cfg = {}, ctx.cfg
    for suffix, kind in (("", "positive"), ("_abs", "abs")):
        for name in ("deletion", "insertion"):
            if f"{name}_auc{suffix}" not in values:
                continue
            auc = values[f"{name}_auc{suffix}"]
            out[f"{name}_auc{suffix}"] = Summary(float(auc.mean()), len(auc), {
                "random": float(values[f"{name}_auc_random"].mean()),
                "fractions": np.linspace(0, 1, cfg.curve_steps + 1), "scores": kind,
                "from": "image" if name == "deletion" else "blur", "to": "black" if name == "deletion" else "image",
                "curve": values[f"_{name}{suffix}_curve"].mean(0), "random_curve": values[f"_{name}_random_curve"].mean(0)})
    return out


def measure_road(ctx: Context, m: Maps):
    """ROAD (road.py) of each map, of a random map and of the model-blind edge map of the same image
    and target, all with the map's own seeds (tie order, imputation noise). The two controls depend
    on the images, targets and seeds alone: computed once per chunk for every method."""
    x = normalize(m.images.to(ctx.device))
    t = torch.from_numpy(m.target).to(ctx.device)
    seeds = [int(s) + ctx.cfg.trust_seed for s in m.seeds]
    signed = pixel_scores(m.maps, "signed")
    key = ("road controls", m.index.tobytes(), m.target.tobytes(), m.seeds.tobytes())
    if key not in ctx.cache:
        controls = {"_random": torch.rand(signed.shape, generator=torch.Generator().manual_seed(ctx.cfg.trust_seed)),
                    "_edge": edge_control(None, None, x, t, ctx.cfg, None).maps}
        ctx.cache[key] = {suffix: road_curves(ctx.model, x, t, scores.to(ctx.device), seeds)
                          for suffix, scores in controls.items()}
    curves = {"": road_curves(ctx.model, x, t, signed.to(ctx.device), seeds), **ctx.cache[key]}
    out = {}
    for suffix, c in curves.items():
        out[f"{'_' if suffix else ''}road_combined{suffix}"] = road_combined(c)
        for order in ("morf", "lerf"):
            out[f"_road_{order}{suffix}"] = c[order].cpu().numpy()
    out["road_morf"], out["road_lerf"] = out["_road_morf"].mean(1), out["_road_lerf"].mean(1)
    out["road_vs_random"] = out["road_combined"] - out["_road_combined_random"]
    return out


def summarise_road(values, ctx) -> dict[str, Summary]:
    """ROAD combined of the maps, with the random map's and the edge map's, and the gain over random
    with a bootstrap 95% interval over images: the headline of whether a method beats chance."""
    gain = values["road_vs_random"]
    return {"road_combined": Summary(float(values["road_combined"].mean()), len(gain), {
        "random": float(values["_road_combined_random"].mean()), "edge": float(values["_road_combined_edge"].mean()),
        "minus_random": float(gain.mean()), "ci": bootstrap_interval(gain, seed=ctx.cfg.trust_seed),
        "edge_minus_random": float((values["_road_combined_edge"] - values["_road_combined_random"]).mean()),
        "fractions": list(FRACTIONS), **{f"{o}{s}": values[f"_road_{o}{s}"].mean(0).tolist()
                                         for o in ("morf", "lerf") for s in ("", "_random", "_edge")}})}


def measure_smprt(ctx: Context, m: Maps):
    """sMPRT, its noise-free maps taken from MPRT's cascade (its first and last stage) when MPRT
    measured the same images."""
    maps = ctx.stage_maps(m, last_only=True)
    trained, random = maps[0], maps[-1]
    rho = np.empty(len(m.index))
    for draw, rows in ctx.by_draw(m):
        r = torch.from_numpy(rows)
        rho[rows] = smprt_scores(ctx.model, ctx.randomised(draw), _layer(ctx, m), METHODS[m.method].attribute,
                                 m.images[r], torch.from_numpy(m.target[rows]), ctx.cfg, ctx.device, m.seeds[rows],
                                 trained[r], random[r])
    return {"smprt_spearman": rho, "_draw": ctx.draws(m)}


# ------------------------------------------------------------------------------------------------
# Intervals of the expensive checks' headlines: name -> (estimate, 95% half-width)

def mean_intervals(*names: str) -> Callable[[dict[str, np.ndarray], Context], dict[str, tuple[float, float]]]:
    """The mean of each named per-map value over the maps where it is defined, and its half-width;
    clustered by the random model each image met where the values carry "_draw"."""
    def intervals(values: dict[str, np.ndarray], ctx: Context) -> dict[str, tuple[float, float]]:
        width = (lambda v: clustered_halfwidth(v, values["_draw"])) if "_draw" in values else mean_halfwidth
        return {name: (float(nanmean(values[name])), width(values[name])) for name in names}
    return intervals


def steps_intervals(values: dict[str, np.ndarray], ctx: Context) -> dict[str, tuple[float, float]]:
    """The share of maps under --trust-tol at the verdict's step count (the fewest with 95% under it;
    the most steps tried when none has), with its Wilson half-width."""
    rel, tol, steps = values["_rel_by_steps"], ctx.cfg.trust_tol, ctx.cfg.trust_step_list
    below = (rel < tol).sum(0)
    share = below / len(rel)
    k = next((i for i, f in enumerate(share) if f >= TRUST_FRACTION), len(steps) - 1)
    return {f"share under tol at {steps[k]} steps": (float(share[k]), wilson_halfwidth(int(below[k]), len(rel)))}


@dataclass(frozen=True)
class Metric:
    measure: Callable[[Context, Maps], dict[str, np.ndarray] | None]
    summarise: Callable[[dict[str, np.ndarray], Context], dict[str, Summary]] = mean_summary
    expensive: bool = False  # adds images until the intervals of stop_on are narrow (trust_run.py)
    intervals: Callable[[dict[str, np.ndarray], Context], dict[str, tuple[float, float]]] | None = None
    stop_on: tuple[str, ...] = ()  # the intervals that must be narrow; () for all


METRICS = {
    "completeness": Metric(measure_completeness, summarise_completeness),
    "localisation": Metric(measure_localisation, summarise_localisation),
    "steps_needed": Metric(measure_steps, summarise_steps_needed, True, steps_intervals),
    "sanity": Metric(measure_sanity, summarise_sanity, True,  # MPRT; eMPRT comes with its maps
                     mean_intervals("sanity_spearman_abs", "emprt"), stop_on=("sanity_spearman_abs",)),
    "deletion_insertion": Metric(measure_deletion, summarise_deletion, True,
                                 mean_intervals("deletion_auc", "insertion_auc")),
    "road": Metric(measure_road, summarise_road, True, mean_intervals("road_vs_random")),
    "smprt": Metric(measure_smprt, mean_summary, True, mean_intervals("smprt_spearman")),
}


# ------------------------------------------------------------------------------------------------
# Across methods and the model-free control

def agreement(ig: Maps, cam: Maps) -> dict[str, np.ndarray]:
    """Spearman between the positive part of IG and Grad-CAM for the same image and target, with
    the attribution ids of both maps; NaN where one map is constant."""
    where = {(i, t): n for n, (i, t) in enumerate(zip(cam.index.tolist(), cam.target.tolist()))}
    pick = np.array([where.get((i, t), -1) for i, t in zip(ig.index.tolist(), ig.target.tolist())], np.int64)
    both = pick >= 0
    rho = spearman(pixel_scores(ig.maps[both]).numpy(), cam.maps[pick[both]].numpy())
    return {"rho": rho, "target": ig.target[both], "ig_id": ig.attribution_id[both],
            "gradcam_id": cam.attribution_id[pick[both]]}


def summarise_agreement(rho: np.ndarray, targets: np.ndarray, class_names, settings: dict) -> Summary:
    return Summary(float(nanmean(rho)), len(rho), {
        "per_class": by_class(rho, targets, class_names), "class": "target",
        "ig_setting": settings["ig"], "gradcam_setting": settings["gradcam"], "n_undefined": int(np.isnan(rho).sum())})


def edge_control_sanity(model, images, cfg, device, stages=None) -> Summary:
    """The sanity check of a map that ignores the model (Sobel edges): its line must stay at 1."""
    t = torch.zeros(len(images), dtype=torch.int64)  # any target: the control does not look at it
    edges, _ = attribute_batches(edge_control, model, None, images, t, cfg, device, cfg.batch_size)
    control = sanity_check(model, None, edge_control, images, t, edges, cfg, device, stages=stages)
    return Summary(control["abs"][-1], len(images), {k: v for k, v in control.items() if not k.startswith("per_map")})
