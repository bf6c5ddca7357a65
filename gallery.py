"""The static HTML report of one model's stored explanations (explain.py --report report.html).

    from gallery import report_html
    html = report_html(db, model_id, "pathmnist-1a2b3c", 28, "test", split.images, class_names,
                       title="LightCNN on the PathMNIST test split", figures=[Path("images/sanity_check.png")])
    Path("report.html").write_text(html)

One file that works offline, opened from disk: no CDN, every asset inline. First the trust-metric
table and figures, then a gallery of one card per explained (image, class): the image in true
colours, the overlay of each method, true and predicted class, confidence and the per-map trust
metrics. Filters (true class, predicted class, right or wrong, method) and sorting (by class with
errors first, by confidence, by any per-map metric) run in plain JavaScript; the page's address
keeps them (report.html#pred=3&correct=wrong), so a view can be bookmarked and tests can ask for one.

Images and overlays travel as three sprite sheets (one image atlas as lossless PNG, one overlay
atlas per method), so the whole test split (7,180 images x 2 methods) is a few files' worth of
bytes, not 20,000 inline images. Overlays are drawn here as figures.py draws them: Grad-CAM in jet
at 45% over the image, IG's positive part in red.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from attribution import METHODS
from audit import ALARM, HOT, MIN_ALARM, alarmed, evidence
from mosaic import mosaic

ZOOM = 3  # on-screen pixels per image pixel at 28 px (pixelated, so the tissue's texture stays visible)

# Every stored trust metric in words: (short label, which way is better, what it measures). The page
# shows the label and the arrow, the meaning on hover and in the table; a metric missing here is
# shown under its stored name, so adding one to trust.METRICS never breaks the page.
LOWER, HIGHER = "↓ lower is better", "↑ higher is better"
METRIC_TEXT = {
    "deletion_auc": ("deletion", LOWER, "probability of the explained class while the map's most relevant pixels "
                     "are set to black, area under that curve (black fill: a confounded measure on real tissue, "
                     "where scattered black pixels destroy any 28 px image)"),
    "insertion_auc": ("insertion", HIGHER, "probability of the explained class while the map's most relevant "
                      "pixels are put back into a blurred image, area under that curve"),
    "deletion_auc_abs": ("deletion by |map|", LOWER, "deletion with pixels ranked by the map's absolute value"),
    "insertion_auc_abs": ("insertion by |map|", HIGHER, "insertion with pixels ranked by the map's absolute value"),
    "rel_delta": ("completeness gap", LOWER, "|sum of the map − (logit(image) − logit(reference))| relative to the "
                  "logit change (IG: its baseline; Blur IG: the blurred image; LRP: the logit itself, conservation); under 0.01 the map accounts for the model's output"),
    "steps_for_tol": ("steps needed", LOWER, "fewest path steps (--ig-steps) that bring 95% of the maps under the completeness "
                      "tolerance (--trust-tol)"),
    "sanity_spearman": ("same map after randomising", LOWER, "rank correlation of |map| with the map of the model "
                        "whose weights were all re-initialised; near 0: the map depends on what the model learned"),
    "sanity_spearman_abs": ("same map after randomising", LOWER, "rank correlation of |map| with this image's map "
                            "after all weights were re-initialised; near 0: the map depends on the weights"),
    "sanity_spearman_signed": ("same signed map after randomising", LOWER, "as above, on the signed map"),
    "sanity_control_edge": ("edge-detector control", "should stay at 1", "the same randomisation check on a map "
                            "that ignores the model (Sobel edges of the image): it must not move"),
    "agreement_ig_gradcam": ("IG vs Grad-CAM agreement", HIGHER, "rank correlation per image of IG's positive part "
                             "with Grad-CAM; two methods pointing at the same pixels"),
    "spearman_gradcam": ("agreement with Grad-CAM", HIGHER, "rank correlation of this IG map's positive part with "
                         "the image's Grad-CAM"),
    "spearman_ig": ("agreement with IG", HIGHER, "rank correlation of this Grad-CAM map with the positive part of "
                    "the image's IG"),
    "road_combined": ("ROAD", HIGHER, "remove-and-debias (Rong et al., 2022): the class probability kept when the "
                      "map's least relevant pixels are removed minus that when its most relevant are, averaged over "
                      "10-90% removed, the gaps filled from their neighbours so the fill says nothing of the class; "
                      "the table's random column is a random map's, and 'ROAD over random' is the gain"),
    "road_vs_random": ("ROAD over random", HIGHER, "this map's ROAD minus a random map's on the same image; above 0: "
                       "the map ranks the pixels the model needs better than chance"),
    "road_morf": ("ROAD, top pixels removed", LOWER, "mean class probability after removing the map's most relevant "
                  "pixels (10-90%), filled from their neighbours"),
    "road_lerf": ("ROAD, bottom pixels removed", HIGHER, "mean class probability after removing the map's least "
                  "relevant pixels (10-90%), filled from their neighbours"),
    "smprt_spearman": ("sMPRT: same map after randomising, denoised", LOWER, "rank correlation of |map| with the "
                       "randomised model's, each map first averaged over noisy copies of the image (Hedström et al., "
                       "2023); near 0: the map depends on what the model learned, not on gradient noise"),
    "emprt": ("eMPRT: complexity rise after randomising", HIGHER, "relative rise of the entropy of the map's values "
              "when all weights are re-initialised (Hedström et al., 2023); above 0: destroying what the model "
              "learned makes the map noisier"),
    "relevance_mass": ("share inside the evidence", HIGHER, "share of the positive attribution inside the known "
                       "evidence mask (synthetic data)"),
    "pointing_game": ("peak inside the evidence", HIGHER, "whether the map's maximum lies inside the evidence mask "
                      "(synthetic data)"),
}


def metric_text(name: str) -> tuple[str, str, str]:
    """(label, direction, meaning) of a stored metric name; unknown names are shown as stored."""
    return METRIC_TEXT.get(name, (name.replace("_", " "), "", ""))


def atlas(tiles: np.ndarray, columns: int) -> Image.Image:
    """(N, s, s, 3) uint8 -> one image of `columns` tiles per row, row-major."""
    n, s = len(tiles), tiles.shape[1]
    rows = max(1, math.ceil(n / columns))
    sheet = np.full((rows * s, columns * s, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * s:(r + 1) * s, c * s:(c + 1) * s] = t
    return Image.fromarray(sheet)


def overlays(images: np.ndarray, maps: np.ndarray, method: str) -> np.ndarray:
    """(N, s, s, 3) uint8 images and their maps (N, [C,] s, s) -> the overlays, uint8.
    Grad-CAM: jet at 45% opacity, each map scaled to its maximum; gradient maps (IG, ...): the
    positive part of the channel sum in red, at up to 80% where it reaches the map's 99.5th
    percentile of |map| (figures.plot_examples' rules)."""
    img = images.astype(np.float32) / 255
    m = maps.sum(1) if maps.ndim == 4 else maps
    if METHODS[method].cam:
        lim = np.maximum(m.max((1, 2), keepdims=True), 1e-12)
        colour = matplotlib.colormaps["jet"](np.clip(m / lim, 0, 1))[..., :3]
        alpha = np.full(m.shape + (1,), 0.45, np.float32)
    else:
        lim = np.maximum(np.percentile(np.abs(m), 99.5, axis=(1, 2), keepdims=True), 1e-12)
        colour = np.broadcast_to(np.array([1.0, 0, 0], np.float32), m.shape + (3,))
        alpha = 0.8 * np.clip(m / lim, 0, 1)[..., None]
    return np.round(255 * (img * (1 - alpha) + colour * alpha)).astype(np.uint8)


def data_uri(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"optimize": True}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def report_html(db, model_id: int, dataset: str, size: int, split: str, images: torch.Tensor, class_names: list[str],
                title: str, figures: list[Path] = ()) -> str:
    """The page for every map of `model_id` on (dataset, size, split); `images` are that split's
    uint8 (N, C, s, s) images, indexed by the stored sample index."""
    where = {"model_id": model_id, "dataset": dataset, "size": size, "split": split}
    found = db.settings_used(**where)  # (setting id, method); a method with two settings shows both
    counts = {m: sum(1 for _, other in found if other == m) for _, m in found}
    label = {sid: m if counts[m] == 1 else f"{m} ({sid})" for sid, m in found}
    settings = {label[sid]: db.maps(setting_id=sid, **where) for sid, _ in found}  # method label -> rows
    kinds = {label[sid]: m for sid, m in found}
    card_of = {method: dict(zip(r["attribution_id"].tolist(), zip(r["index"].tolist(), r["target"].tolist())))
               for method, r in settings.items()}  # method label -> attribution id -> its card's key
    cards: dict[tuple[int, int], dict] = {}
    for method, r in settings.items():
        for j, (i, t) in enumerate(zip(r["index"].tolist(), r["target"].tolist())):
            card = cards.setdefault((i, t), {"i": i, "t": t, "y": int(r["label"][j]), "p": int(r["predicted"][j]),
                                             "c": round(float(r["confidence"][j]), 4), "m": {}})
            card["m"][method] = {"slot": j}
    metric_names = []
    for sid, _ in found:
        method, ids = label[sid], card_of[label[sid]]
        for name in db.sample_metric_names(setting_id=sid, **where):
            v = db.sample_metrics(name, setting_id=sid, **where)
            metric_names.append(f"{method}:{name}")
            for a, value in zip(v["attribution_id"].tolist(), v["value"].tolist()):
                if a in ids and np.isfinite(value):
                    cards[ids[a]]["m"][method][name] = float(f"{value:.4g}")  # 4 significant digits: the sign of a small value stays
    audits = {}  # method label -> the stored shortcut audit of its maps (explain.py --audit)
    for sid, _ in found:
        a = db.audit(setting_id=sid, **where)
        if a:
            method, ids = label[sid], card_of[label[sid]]
            audits[method] = a
            for aid, strategy in zip(a["members"]["attribution_id"].tolist(), a["members"]["strategy_id"].tolist()):
                if aid in ids:
                    cards[ids[aid]]["m"][method]["s"] = strategy
    order = sorted(cards)  # the atlas position of each card: by image index, then target
    rgb = images.permute(0, 2, 3, 1).numpy()
    rgb = np.repeat(rgb, 3, -1) if rgb.shape[-1] == 1 else rgb
    rgb = rgb[[i for i, _ in order]]  # one tile per card, in atlas order
    columns = max(1, min(64, math.ceil(math.sqrt(len(order)))))
    sheets = {"image": data_uri(atlas(rgb, columns), "PNG")}
    for method, r in settings.items():
        slots = np.array([cards[k]["m"].get(method, {}).get("slot", -1) for k in order])
        maps = np.zeros((len(order),) + r["maps"].shape[1:], np.float32)
        maps[slots >= 0] = r["maps"][slots[slots >= 0]]
        over = overlays(rgb, maps, kinds[method])
        over[slots < 0] = 255
        sheets[method] = data_uri(atlas(over, columns), "JPEG")
    for pos, key in enumerate(order):
        cards[key]["a"] = pos
        for m in cards[key]["m"].values():
            m.pop("slot")
    summary = [r for r in db.summary_metrics(model_id)
               if (r["dataset"], r["size"], r["split"]) == (dataset, size, split)]
    names = {n.split(":", 1)[1] for n in metric_names}
    payload = {"classes": class_names, "size": size, "zoom": ZOOM if size <= 64 else 1, "columns": columns,
               "methods": list(settings), "metrics": metric_names, "cards": [cards[k] for k in order],
               "labels": {n: metric_text(n) for n in names},
               "strategies": audit_payload(audits, card_of, {k: pos for pos, k in enumerate(order)}),
               "mosaics": mosaic_payload(audits, card_of, {k: pos for pos, k in enumerate(order)}),
               "alarm": ALARM, "min_alarm": MIN_ALARM, "hot": HOT}
    figs = "".join(f'<figure><img alt="{html.escape(p.stem)}" src="{data_uri(Image.open(p).convert("RGB"), "PNG")}">'
                   f"<figcaption>{html.escape(FIGURE_TEXT.get(p.stem, p.name))}</figcaption></figure>"
                   for p in figures if Path(p).exists())
    page = (Path(__file__).with_name("report_template.html")).read_text()
    return (page.replace("{{title}}", html.escape(title))
            .replace("{{summary}}", summary_table(summary))
            .replace("{{figures}}", figs or "<p>No trust figures: run explain.py with --trust.</p>")
            .replace("{{sheets}}", json.dumps(sheets))
            .replace("{{data}}", json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")))


def audit_payload(audits: dict[str, dict], card_of: dict[str, dict], position: dict) -> list[dict]:
    """The stored audits' strategies for the page: per strategy its numbers, its verdict and its
    exemplars as atlas positions of their cards; classes whose first strategy has the best evidence of
    a shortcut (audit.evidence) first, each class's strategies in their rank."""
    out = []
    for method, a in audits.items():
        key = card_of[method]
        worst = {}
        for s in a["strategies"]:
            worst[s["class"]] = max(worst.get(s["class"], 0.0), evidence(s["suspicion"], s["n"]))
        for s in sorted(a["strategies"], key=lambda s: (-worst[s["class"]], s["class"], s["rank"])):
            out.append({"id": s["id"], "method": method, "cls": s["class"], "rank": s["rank"], "n": s["n"],
                        "suspicion": round(s["suspicion"], 3), "flip": round(s["flip"], 3),
                        "control": round(s["control_flip"], 3), "atypical": round(s["atypical"], 3),
                        "area": round(s["area"], 4), "concentration": round(s["concentration"], 3),
                        "drop": round(s["prob_drop"], 3), "alarm": alarmed(s["suspicion"], s["n"]),
                        "exemplars": [position[key[e]] for e in s["exemplars"] if e in key]})
    return out


def mosaic_payload(audits: dict[str, dict], card_of: dict[str, dict], position: dict) -> dict[str, dict]:
    """Per audited method, the map of the data set (mosaic.py) for the page: its grid and, per
    occupied cell, [row, column, atlas position of the card shown, its strategy id]. Audits stored
    before the map existed have no places and get none."""
    out = {}
    for method, a in audits.items():
        m, key = a["members"], card_of[method]
        placed = np.isfinite(m["x"]) & np.isfinite(m["y"]) & np.isin(m["attribution_id"], list(key))
        if not placed.any():
            continue
        cells = mosaic(np.stack([m["x"][placed], m["y"][placed]], 1))
        ids, strategy = m["attribution_id"][placed], m["strategy_id"][placed]
        out[method] = {"grid": len(cells), "cells": [[r, c, position[key[int(ids[i])]], int(strategy[i])]
                                                     for (r, c), i in np.ndenumerate(cells) if i >= 0]}
    return out


FIGURE_TEXT = {
    "sanity_check": "Model randomisation: how much each method's maps stay the same as more and more of the "
                    "model's weights are re-initialised, from the output layer down. Falling towards 0 is good: "
                    "the map depends on what the model learned. The edge detector (dashed) ignores the model and "
                    "stays at 1.",
    "deletion_insertion": "Deletion (left, lower is better) and insertion (right, higher is better): the "
                          "probability of the explained class as pixels are removed or put back in the order "
                          "each map ranks them, against a random order (dotted).",
    "localisation": "Localisation (synthetic data only, where the evidence is known): the share of positive "
                    "attribution inside the evidence, and how often the map's peak lies in it, against a "
                    "random map.",
}


def summary_table(rows: list[dict]) -> str:
    """The stored trust metrics (summary_metrics rows) as an HTML table in words: what each
    measures, which way is better, the value next to a random map's (or the control's), n."""
    if not rows:
        return "<p>No trust metrics stored for these maps: run explain.py with --trust.</p>"
    out = [verdicts(rows), "<table><thead><tr><th>method</th><th>measure</th><th>better</th><th>value</th>"
           "<th>random map</th><th title=\"images: the expensive checks add images until their 95% interval is as "
           "narrow as --trust-halfwidth\">n</th><th>what it measures</th></tr></thead><tbody>"]
    for r in rows:
        label, better, meaning = metric_text(r["name"])
        rnd = r["detail"].get("random") if isinstance(r["detail"], dict) else None
        value = "–" if r["value"] is None or not np.isfinite(r["value"]) else f"{r['value']:.3g}"
        widths = (r["detail"].get("intervals") if isinstance(r["detail"], dict) else None) or {}
        width = widths.get(r["name"], widths.get(r["name"] + "_abs"))  # MPRT's headline is its |map| value
        if "ci" in r["detail"]:  # ROAD: the gain over a random map, with its interval
            lo, hi = r["detail"]["ci"]
            value += f"; over random {r['detail']['minus_random']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        elif width and width[1] is not None:  # an expensive check: its 95% interval, the reason for its n
            value += f" ± {width[1]:.3f}"
        out.append(f"<tr><td>{html.escape(r['method'] or 'all methods')}</td><td>{html.escape(label)}</td>"
                   f"<td>{html.escape(better)}</td><td>{value}</td><td>{'' if rnd is None else f'{rnd:.3g}'}</td>"
                   f"<td>{r['n']}</td><td class=\"meaning\">{html.escape(meaning)}</td></tr>")
    return "".join(out) + "</tbody></table>"


def verdicts(rows: list[dict]) -> str:
    """One sentence per method: does it beat a random map on ROAD, by how much, how sure."""
    lines = []
    for r in rows:
        if r["name"] != "road_combined":
            continue
        d = r["detail"]
        lo, hi = d["ci"]
        verdict = ("beats a random map" if lo > 0 else "is worse than a random map" if hi < 0
                   else "is not distinguishable from a random map")
        lines.append(f"<li><b>{html.escape(r['method'])}</b> {verdict} on ROAD: {d['minus_random']:+.3f} "
                     f"(95% interval {lo:+.3f} to {hi:+.3f}, {r['n']} images); a map that ignores the model "
                     f"(edges of the image) scores {d['edge_minus_random']:+.3f}.</li>")
    return f"<ul>{''.join(lines)}</ul>" if lines else ""
