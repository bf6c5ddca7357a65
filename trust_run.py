"""--trust: every metric of trust.METRICS over the stored maps of a run, stored next to them and
printed as a table (the metrics themselves live in trust.py).

    trust = measure_trust(run, model, "lightcnn", split, idx, work, settings, class_names, cfg, device)
    print_trust(trust)
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from db_run import RunStore
from explaining import Work, stored_maps
from model import GRADCAM_LAYERS
from trust import METRICS, Context, Maps, agreement, edge_control_sanity, summarise_agreement

READ_CHUNK = 1024  # images per read of stored maps: bounds memory for large selections at 224x224


def measure_trust(run: RunStore, model, model_name: str, split, idx, work: Work, settings: dict[str, int],
                  class_names, cfg, device) -> list[dict]:
    """Every metric of trust.METRICS per method, stored per map and aggregated; then IG-vs-Grad-CAM
    agreement and the model-free control. Cheap metrics cover every explained map, read back once
    per chunk of images; expensive ones the maps of the first --trust-n selected images. Returns
    the stored aggregates of these settings (RunStore.trust)."""
    ctx = Context(model, GRADCAM_LAYERS[model_name], cfg, device, class_names)
    values = {(sid, name): {} for sid in settings.values() for name in METRICS}  # per-map arrays, per chunk
    agree = []
    for expensive, parts in ((False, np.array_split(idx, max(1, -(-len(idx) // READ_CHUNK)))),
                             (True, [idx[: cfg.trust_n]])):
        for part in parts:
            maps = {m: stored_maps(run, sid, part, work, split, m) for m, sid in settings.items()}
            for method, sid in settings.items():
                for name, metric in METRICS.items():
                    if metric.expensive == expensive:
                        t0 = time.perf_counter()
                        measured = _measure(run, metric, ctx, maps[method], values[sid, name])
                        if expensive and measured:  # minutes on a CPU: a log should not fall silent
                            print(f"--trust: {name} of {method} on {len(part)} images, "
                                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if not expensive and "ig" in maps and "gradcam" in maps:
                a = agreement(maps["ig"], maps["gradcam"])
                run.add_map_metric(a["ig_id"], "spearman_gradcam", a["rho"])
                run.add_map_metric(a["gradcam_id"], "spearman_ig", a["rho"])
                agree.append(a)
    summaries = {sid: {} for sid in [0, *settings.values()]}  # setting id (0: model-level) -> name -> Summary
    for (sid, name), found in values.items():
        if found:
            summaries[sid] |= METRICS[name].summarise({k: np.concatenate(v) for k, v in found.items()}, ctx)
    if agree:
        summaries[0]["agreement_ig_gradcam"] = summarise_agreement(
            np.concatenate([a["rho"] for a in agree]), np.concatenate([a["target"] for a in agree]),
            class_names, settings)
    summaries[0]["sanity_control_edge"] = edge_control_sanity(model, split.images[torch.from_numpy(idx[: cfg.trust_n])],
                                                              cfg, device)
    run.add_trust(summaries)
    return run.trust(settings.values())


def _measure(run: RunStore, metric, ctx: Context, maps: Maps, values: dict) -> bool:
    """One metric on one read of stored maps: its per-map values stored, all of them kept in `values`;
    whether the metric applies to these maps at all."""
    found = metric.measure(ctx, maps) if len(maps.index) else None
    for key, v in (found or {}).items():
        if not key.startswith("_") and v.ndim == 1:
            run.add_map_metric(maps.attribution_id, key, v)
        values.setdefault(key, []).append(v)
    if found:
        values.setdefault("_label", []).append(maps.label)
        values.setdefault("_target", []).append(maps.target)
    return bool(found)


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
    print("trust (n: images of the expensive checks; relΔ = |delta| / |f(x)-f(reference)| of IG and Blur IG, "
          "|sum - f(x)| / |f(x)| of LRP; "
          "steps95: path steps for 95% under --trust-tol; sanity ρ: Spearman |map| after randomising all layers; "
          "m/rnd: map vs random; black-fill deletion/insertion is confounded on tissue, read ROAD; "
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
    for (model, _, method, sid), m in per_setting.items():
        if sid and "road_combined" in m:
            r = m["road_combined"]
            d = r["detail"]
            print(f"{model:9s} {method:10s} ROAD combined {r['value']:+.3f} (random map {d['random']:+.3f}, "
                  f"edges {d['edge']:+.3f}): {d['minus_random']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] over "
                  f"random (n={r['n']}; higher: removing the map's top pixels costs the class more than its bottom)")
        if sid and "smprt_spearman" in m:
            print(f"{model:9s} {method:10s} sMPRT ρ {m['smprt_spearman']['value']:+.3f} (lower: the denoised map changes "
                  f"when the model is randomised), eMPRT {m.get('emprt', {}).get('value', np.nan):+.3f} (higher: "
                  f"randomising makes the map more complex), n={m['smprt_spearman']['n']}")
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
