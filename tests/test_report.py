"""explain.py --report in a real headless browser (Debian's chromium, which .ci/run installs): the
page loads without errors, shows one card per stored (image, class), and each filter and sort
shows what the database says, on the synthetic test split of 2,000 images."""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data as D
import explain as X
from audit import alarmed, evidence
import model as M
from db import ExplanationDB
from mosaic import GRID

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZES = "10,10,2000"


@pytest.fixture(scope="module")
def report(tmp_path_factory, lightcnn_with_fitted_head):
    """A fitted-head LightCNN explained on all 2,000 synthetic test images (IG at 8 steps and
    Grad-CAM), the per-map trust metrics of the first 60, and the report of it all."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    root = tmp_path_factory.mktemp("report")
    ckpt = root / "run" / "best.pt"
    ckpt.parent.mkdir()
    cfg = {"dataset": "synthetic", "size": 28, "data_dir": "data", "model": "lightcnn", "seed": 0,
           "synthetic_sizes": SIZES}
    arch = {"in_channels": 3, "num_classes": 9, "task": "multi-class", "class_names": list(D.SYNTHETIC_CLASSES)}
    M.save_checkpoint(ckpt, {"model": lightcnn_with_fitted_head(300, 1e-2, 200).state_dict(), "epoch": 1,
                             "config": cfg, "arch": arch})
    db, page = root / "x.db", root / "report.html"
    common = ["--checkpoint", str(ckpt), "--db", str(db), "--device", "cpu", "--methods", "ig,gradcam", "--ig-steps", "8",
              "--no-figures"]
    X.main([*common, "--n", "60", "--trust", "--trust-n", "60", "--trust-halfwidth", "0"])  # per-map metrics for all 60
    X.main([*common, "--audit", "--report", str(page)])  # all 2,000, the first 60 already stored; audited
    return db, page


def browse(page: Path, hash_: str = "", screenshot: Path | None = None) -> tuple[str, str]:
    """(the DOM after the page's scripts ran, chromium's log with the console's messages)."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--window-size=1400,1600", "--virtual-time-budget=5000"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run([*args, f"{page.as_uri()}{hash_}"], capture_output=True, text=True, timeout=120)
    return out.stdout, out.stderr


def shown(dom: str) -> int:
    return int(re.search(r'<span id="count">(\d+)</span>', dom)[1])


def db_count(db: Path, **filters) -> int:
    with ExplanationDB(db) as d:
        rows = [d.maps(method=m, split="test", **filters) for m in ("ig", "gradcam")]
    return len({(i, t) for r in rows for i, t in zip(r["index"].tolist(), r["target"].tolist())})


def test_page_loads_with_one_card_per_stored_map_pair(report):
    db, page = report
    dom, log = browse(page)
    assert 'data-errors=""' in dom and not re.search(r"CONSOLE.*(Uncaught|Error)", log), log[-2000:]
    n = db_count(db)
    assert n == 2000 and shown(dom) == n and len(re.findall(r'class="card( wrong)?"', dom)) == n
    assert int(re.search(r'<span id="total">(\d+)</span>', dom)[1]) == n
    assert page.stat().st_size < 15e6  # sprite sheets, not 6,000 inline images


@pytest.mark.parametrize("hash_, filters", [
    ("#pred=3", {"predicted": 3}), ("#true=5", {"label": 5}), ("#correct=wrong", {"errors_only": True}),
    ("#true=2&pred=2&method=ig", {"label": 2, "predicted": 2})])
def test_filters_show_the_database_count(report, hash_, filters):
    db, page = report
    dom, _ = browse(page, hash_)
    assert shown(dom) == db_count(db, **filters) > 0


@pytest.mark.parametrize("which", ["above", "below"])
def test_the_road_filter_keeps_the_maps_on_its_side_of_random(report, which):
    db, page = report
    with ExplanationDB(db) as d:
        v = d.sample_metrics("road_vs_random", method="gradcam", split="test")["value"]
    dom, _ = browse(page, f"#method=gradcam&road={which}")
    assert len(v) == 60 and shown(dom) == int(((v > 0) if which == "above" else (v <= 0)).sum()) > 0


def test_sorting_by_a_metric_puts_its_extreme_first(report):
    db, page = report
    with ExplanationDB(db) as d:
        v = d.sample_metrics("deletion_auc", method="ig", split="test")
    dom, _ = browse(page, "#sort=ig%3Adeletion_auc-asc")
    first = int(re.search(r'class="card( wrong)?".*?image (\d+): true', dom, re.S)[2])
    assert len(v["value"]) == 60 and first == int(v["index"][np.nanargmin(v["value"])])
    dom, _ = browse(page, "#sort=confidence-desc&correct=wrong")
    with ExplanationDB(db) as d:
        worst = d.top_errors(k=1, method="gradcam", split="test")
    assert int(re.search(r'class="card( wrong)?".*?image (\d+): true', dom, re.S)[2]) == int(worst["index"][0])


def stored_audits(db: Path) -> list[dict]:
    with ExplanationDB(db) as d:
        return [a for sid in (1, 2) if (a := d.audit(model_id=1, setting_id=sid, dataset=d.maps(limit=1)["dataset"][0],
                                                      size=28, split="test"))]


def test_the_audit_section_shows_every_stored_strategy_the_most_suspicious_class_first(report):
    db, page = report
    audits = stored_audits(db)
    strategies = [s for a in audits for s in a["strategies"]]
    assert len(audits) == 2 and sum(a["n_maps"] for a in audits) == 4000  # both methods, every map
    dom, log = browse(page)
    assert 'data-errors=""' in dom, log[-2000:]
    boxes = re.findall(r'<div class="strategy( alarm| look)?" data-strategy="(\d+)" data-suspicion="([\d.e-]+)" '
                       r'data-n="(\d+)"', dom)
    assert sorted(int(b[1]) for b in boxes) == sorted(s["id"] for s in strategies)
    by_id = {s["id"]: s for s in strategies}
    strength = lambda s: evidence(s["suspicion"], s["n"])
    assert strength(by_id[int(boxes[0][1])]) == pytest.approx(max(map(strength, strategies)))  # the strongest first
    for kind, sid, value, n in boxes:  # each verdict is the one its suspicion and size earn
        assert (kind == " alarm") == alarmed(float(value), int(n))


def test_a_strategy_link_shows_exactly_its_images(report):
    db, page = report
    a = stored_audits(db)[0]
    s = max(a["strategies"], key=lambda s: s["n"])
    dom, _ = browse(page, f"#strategy={s['id']}")
    assert shown(dom) == s["n"] == int((a["members"]["strategy_id"] == s["id"]).sum()) > 0


def test_screenshot_is_written(report, tmp_path):
    _, page = report
    shot = tmp_path / "report.png"
    browse(page, "#correct=wrong", screenshot=shot)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert im.size == (1400, 1600) and len(np.unique(pixels, axis=0)) > 100  # drawn, not blank


def test_the_data_set_map_shows_each_occupied_cell_s_nearest_image_and_its_strategy(report):
    """The mosaic (mosaic.py) against the stored places, cell by cell: one tile per occupied cell of
    the grid, the image whose place is nearest the cell's centre (brute force here), its stored
    strategy, framed red exactly where that strategy raised the alarm."""
    db, page = report
    dom, log = browse(page)
    assert 'data-errors=""' in dom, log[-2000:]
    tags = [dict(re.findall(r'([\w-]+)="([^"]*)"', t)) for t in re.findall(r'<div [^>]*data-cell="[^>]*>', dom)]
    for a, method in zip(stored_audits(db), ("ig", "gradcam")):
        m, grid = a["members"], GRID
        col = np.minimum((m["x"] * grid).astype(int), grid - 1)
        row = grid - 1 - np.minimum((m["y"] * grid).astype(int), grid - 1)
        mine = [t for t in tags if t["data-method"] == method]
        assert {t["data-cell"] for t in mine} == {f"{r},{c}" for r, c in zip(row, col)}  # every occupied cell, once
        assert len(mine) == len({t["data-cell"] for t in mine}) == int(
            re.search(rf"Map of the data set \({method}, (\d+) of its images shown", dom)[1])
        strategy = {s["id"]: s for s in a["strategies"]}
        for t in mine:
            r, c = map(int, t["data-cell"].split(","))
            inside = np.flatnonzero((row == r) & (col == c))
            d = np.hypot(m["x"][inside] - (c + 0.5) / grid, m["y"][inside] - (1 - (r + 0.5) / grid))
            j = inside[np.argmin(d)]
            assert int(t["data-image"]) == m["index"][j] and int(t["data-strategy"]) == m["strategy_id"][j]
            s = strategy[int(t["data-strategy"])]
            assert ("alarm" in t["class"].split()) == alarmed(s["suspicion"], s["n"])
