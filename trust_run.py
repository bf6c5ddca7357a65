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
FIRST_SAMPLE = 32  # images an expensive check takes before it may stop ...
TRUST_STEP = 16    # ... and the images it adds at a time after that
DRAW_GROUP = 4     # images that meet one random draw of the model in MPRT, sMPRT and eMPRT


def measure_trust(run: RunStore, model, model_name: str, split, idx, work: Work, settings: dict[str, int],
                  class_names, cfg, device) -> list[dict]:
    """Every metric of trust.METRICS per method, stored per map and aggregated; then IG-vs-Grad-CAM
    agreement and the model-free control. Cheap metrics cover every explained map, read back once
    per chunk of images. Expensive ones take the selected images in a seeded random order, 32 first
    and then 16 at a time, each until the 95% intervals of its headlines are at most
    --trust-halfwidth wide on either side (a fixed-width sequential interval, Chow and Robbins
    1965) or --trust-n images are used; one line per check says how many it used and its
    intervals. The randomisation checks draw a new random model for every DRAW_GROUP images, so
    that their means average over draws and their intervals (clustered by draw) include how much
    the draw matters. Returns the stored aggregates of these settings (RunStore.trust)."""
    ctx = Context(model, GRADCAM_LAYERS[model_name], cfg, device, class_names)
    values = {(sid, name): {} for sid in settings.values() for name in METRICS}  # per-map arrays, per chunk
    agree = []
    for part in np.array_split(idx, max(1, -(-len(idx) // READ_CHUNK))):
        maps = {m: stored_maps(run, sid, part, work, split, m) for m, sid in settings.items()}
        for method, sid in settings.items():
            for name, metric in METRICS.items():
                if not metric.expensive:
                    _measure(run, metric, ctx, maps[method], values[sid, name])
        if "ig" in maps and "gradcam" in maps:
            a = agreement(maps["ig"], maps["gradcam"])
            run.add_map_metric(a["ig_id"], "spearman_gradcam", a["rho"])
            run.add_map_metric(a["gradcam_id"], "spearman_ig", a["rho"])
            agree.append(a)

    order = np.random.default_rng(cfg.trust_seed).permutation(idx)[: cfg.trust_n]
    ctx.draw_of = {int(i): k // DRAW_GROUP for k, i in enumerate(order)}  # a new random model every 4 images
    pending = [(m, name) for m in settings for name, metric in METRICS.items() if metric.expensive]
    seconds, widths = dict.fromkeys(pending, 0.0), {}
    ends = [*range(FIRST_SAMPLE, len(order), TRUST_STEP), len(order)]
    for start, end in zip([0, *ends], ends):
        part, last = order[start:end], end == len(order)
        ctx.cache.clear()  # maps shared between checks of this chunk only
        maps = {m: stored_maps(run, settings[m], part, work, split, m) for m in {m for m, _ in pending}}
        for method, name in list(pending):
            t0, metric, found = time.perf_counter(), METRICS[name], values[settings[method], name]
            if not _measure(run, metric, ctx, maps[method], found):
                pending.remove((method, name))  # does not apply to this method
                continue
            seconds[method, name] += time.perf_counter() - t0
            widths[method, name] = metric.intervals({k: np.concatenate(v) for k, v in found.items()}, ctx)
            governing = [widths[method, name][k][1] for k in metric.stop_on or widths[method, name]]
            narrow = max(governing) <= cfg.trust_halfwidth
            if last or narrow:
                pending.remove((method, name))
                why = ("--trust-halfwidth 0: every image up to --trust-n" if not cfg.trust_halfwidth else
                       f"target ± {cfg.trust_halfwidth:g}"
                       + ("" if narrow else ", not reached: --trust-n or the selection ends first"))
                print(f"--trust: {name} of {method}: {end} images, "
                      + ", ".join(f"{k} {v:.3f} ± {w:.3f}" for k, (v, w) in widths[method, name].items())
                      + f" ({why}), {seconds[method, name]:.0f} s", file=sys.stderr, flush=True)
        if not pending:
            break

    summaries = {sid: {} for sid in [0, *settings.values()]}  # setting id (0: model-level) -> name -> Summary
    method_of = {sid: m for m, sid in settings.items()}
    for (sid, name), found in values.items():
        if found:
            named = METRICS[name].summarise({k: np.concatenate(v) for k, v in found.items()}, ctx)
            for summary in named.values() if (method_of[sid], name) in widths else ():
                summary.detail |= {"intervals": widths[method_of[sid], name], "target_halfwidth": cfg.trust_halfwidth}
            summaries[sid] |= named
    if agree:
        summaries[0]["agreement_ig_gradcam"] = summarise_agreement(
            np.concatenate([a["rho"] for a in agree]), np.concatenate([a["target"] for a in agree]),
            class_names, settings)
    summaries[0]["sanity_control_edge"] = edge_control_sanity(model, split.images[torch.from_numpy(order[:FIRST_SAMPLE])],
                                                              cfg, device, ctx.stages(0))
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
    def pm(m: dict, name: str, key: str) -> str:
        """' ± half-width' of an expensive check's interval of `key`, or ''."""
        w = m.get(name, {}).get("detail", {}).get("intervals", {}).get(key)
        return "" if w is None or w[1] is None else f" ± {w[1]:.3f}"

    print("trust (n: images the MPRT check used, each expensive check adding images until its 95% interval is "
          "± --trust-halfwidth; relΔ = |delta| / |f(x)-f(reference)| of IG and Blur IG, "
          "|sum - f(x)| / |f(x)| of LRP; "
          "steps95: path steps for 95% under --trust-tol; sanity ρ: Spearman |map| after randomising all layers; "
          "m/rnd: map vs random; black-fill deletion/insertion is confounded on tissue, read ROAD; "
          "maps ranked by their positive part, |map| rows by absolute value)")
    print(f"{'model':9s} {'method':10s} {'n':>5s} {'relΔ med':>8s} {'relΔ p90':>8s} {'steps95':>7s} "
          f"{'sanity ρ':>14s} {'deletion m/rnd':>14s} {'insertion m/rnd':>15s} {'rel.mass m/rnd':>14s} "
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
              f"{pair(m, 'sanity_spearman') + pm(m, 'sanity_spearman', 'sanity_spearman_abs'):>14s} {pair(m, 'deletion_auc'):>14s} "
              f"{pair(m, 'insertion_auc'):>15s} {pair(m, 'relevance_mass'):>14s} {pair(m, 'pointing_game'):>14s}")
        if "deletion_auc_abs" in m:
            print(f"{'':9s} {'  |map|':10s} {'':5s} {'':8s} {'':8s} {'':7s} {'':14s} {pair(m, 'deletion_auc_abs'):>14s} "
                  f"{pair(m, 'insertion_auc_abs'):>15s}")
    for (model, _, method, sid), m in per_setting.items():
        if sid and "road_combined" in m:
            r = m["road_combined"]
            d = r["detail"]
            print(f"{model:9s} {method:10s} ROAD combined {r['value']:+.3f} (random map {d['random']:+.3f}, "
                  f"edges {d['edge']:+.3f}): {d['minus_random']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] over "
                  f"random (n={r['n']}; higher: removing the map's top pixels costs the class more than its bottom)")
        if sid and "smprt_spearman" in m:
            e = m.get("emprt", {})
            print(f"{model:9s} {method:10s} sMPRT ρ {m['smprt_spearman']['value']:+.3f}"
                  f"{pm(m, 'smprt_spearman', 'smprt_spearman')} (n={m['smprt_spearman']['n']}; lower: the denoised map "
                  f"changes when the model is randomised), eMPRT {e.get('value', np.nan):+.3f}{pm(m, 'emprt', 'emprt')} "
                  f"(n={e.get('n', 0)}, MPRT's images; higher: randomising makes the map more complex)")
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
