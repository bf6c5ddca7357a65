"""Scores against ground truth (groundtruth.py) checked by hand and against Quantus (a test-only
reference), and the planted marks (marks.py): each mask holds exactly what its mark changed."""
import numpy as np
import pytest
import torch

import groundtruth as G
import marks as K


def test_relevance_mass_and_pointing_game_by_hand():
    masks = torch.zeros(4, 10, 10, dtype=torch.bool)
    masks[:, 2:5, 3:9] = True  # 18 of 100 pixels
    scores = torch.stack([masks[0].float(),                        # the mask itself
                          torch.full((10, 10), 0.7),               # uniform
                          torch.zeros(10, 10).index_put_((torch.tensor(3), torch.tensor(4)), torch.tensor(5.0)),
                          -torch.ones(10, 10)])                    # nothing positive
    scores[2, 0, 0] = 4.0  # the peak (5 at row 3, col 4) is inside; a lower bump outside
    out = G.localisation_scores(scores, masks)
    assert out["mass"][0] == 1.0
    assert abs(out["mass"][1] - 0.18) < 1e-6
    assert abs(out["mass"][2] - 5 / 9) < 1e-12
    assert torch.isnan(out["mass"][3])  # undefined, not 0 or 1
    assert out["pointing"][:3].tolist() == [1.0, pytest.approx(0.18), 1.0]
    assert out["pointing"][3] == pytest.approx(0.18)  # all tied: a random pick
    np.testing.assert_allclose(out["area"], 0.18)
    scores[2, 0, 0] = 6.0  # now the peak is outside
    assert G.localisation_scores(scores, masks)["pointing"][2] == 0.0


def test_rank_accuracy_by_hand():
    """K = 4 mask pixels; a map whose 4 largest values hold 3 mask pixels scores 3/4; signed values
    rank by value, so strong negative evidence is not counted as found."""
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    s = torch.zeros(1, 5, 5)
    s[0, 1, 1], s[0, 1, 2], s[0, 2, 1], s[0, 4, 4] = 4.0, 3.0, 2.0, 5.0  # 3 inside, the largest outside
    s[0, 2, 2] = -9.0  # the fourth mask pixel: large but negative
    assert G.rank_accuracy(s, mask).item() == 0.75
    assert G.rank_accuracy(-s, mask).item() == 0.25  # the negated map's top 4: (2,2) and zeros after it
    with pytest.raises(ValueError, match="non-empty mask"):
        G.rank_accuracy(s, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="differ in shape"):
        G.localisation_scores(s, mask[:, :4])


def test_a_random_map_scores_the_masks_share():
    """The control every method must beat: uniform random maps average K / (H W) on all three."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4000, 28, 28, dtype=torch.bool)
    masks[:, 5:12, 9:16] = True  # 49 of 784
    out = G.localisation_scores(torch.rand(4000, 28, 28, generator=g), masks)
    for name in ("rank", "mass", "pointing"):
        assert abs(out[name].mean().item() - 49 / 784) < 0.01, name


def test_scores_equal_quantus():
    """Rank accuracy, relevance mass accuracy and the pointing game against Quantus's own, on
    non-negative maps without ties (where Quantus and we agree by definition) and masks of several
    shapes and sizes."""
    quantus = pytest.importorskip("quantus", reason="pip install -r requirements-test.txt")
    rng = np.random.default_rng(0)
    n = 24
    a = rng.random((n, 1, 12, 12)).astype(np.float32) ** 3
    s = np.zeros((n, 1, 12, 12), np.float32)
    for i in range(n):
        h, w = rng.integers(1, 8, 2)
        top, left = rng.integers(0, 12 - h), rng.integers(0, 12 - w)
        s[i, 0, top:top + h, left:left + w] = 1
        if i % 3 == 0:  # put the peak inside for some, so the pointing game is not all misses
            a[i, 0, top, left] = 2.0
    x = rng.random((n, 1, 12, 12)).astype(np.float32)
    y = np.zeros(n, np.int64)
    kw = dict(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s)
    theirs = {name: np.array(cls(abs=False, normalise=False, disable_warnings=True)(**kw), np.float64)
              for name, cls in (("rank", quantus.RelevanceRankAccuracy), ("mass", quantus.RelevanceMassAccuracy),
                                ("pointing", quantus.PointingGame))}
    ours = G.localisation_scores(torch.from_numpy(a[:, 0]), torch.from_numpy(s[:, 0] > 0))
    for name, v in theirs.items():
        np.testing.assert_allclose(ours[name].numpy(), v, rtol=1e-6, err_msg=name)
    assert 0 < theirs["pointing"].mean() < 1


# ----------------------------------------------------------------------------- planted marks

@pytest.fixture(scope="module")
def tissue(shared_data) -> torch.Tensor:
    x = np.load(shared_data / "pathmnist28_real_test718.npz")["test_images"][:40]
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", sorted(K.MARKS))
def test_each_mark_changes_its_mask_only(tissue, name):
    seeds = np.arange(len(tissue)) * 7 + 1
    marked, masks = K.plant(tissue, name, seeds)
    assert marked.dtype == torch.uint8 and marked.shape == tissue.shape and masks.shape == (40, 28, 28)
    changed = (marked != tissue).any(1)
    assert not (changed & ~masks).any()                       # nothing outside the mask moved
    assert changed.sum() >= 0.5 * masks.sum()                 # and the mask is the mark, not a margin
    assert (masks.flatten(1).sum(1) > 0).all()
    again, again_masks = K.plant(tissue, name, seeds)
    assert torch.equal(again, marked) and torch.equal(again_masks, masks)   # a seed fixes the place
    other = K.plant(tissue, name, seeds + 1)[1]
    assert (other != masks).any(dim=(1, 2)).float().mean() > 0.8           # another seed moves it


@pytest.mark.parametrize("name, area", [("small blue dot", np.pi * 1.5 ** 2), ("wide green blob", np.pi * 3.5 ** 2),
                                        ("tinted square", 81), ("striped patch", 36), ("blurred square", 100),
                                        ("thin black stroke", 12 * 1.2), ("red ring", 2 * np.pi * 4 * 1.2)])
def test_mark_sizes_are_as_documented(tissue, name, area):
    masks = K.plant(tissue, name, np.arange(len(tissue)))[1]
    assert abs(masks.flatten(1).sum(1).float().mean().item() - area) < 0.25 * area + 2


def test_marks_scale_with_the_image_side(tissue):
    big = torch.nn.functional.interpolate(tissue.float(), size=56, mode="nearest").to(torch.uint8)
    small = K.plant(tissue, "tinted square", np.arange(40))[1].flatten(1).sum(1).float().mean()
    large = K.plant(big, "tinted square", np.arange(40))[1].flatten(1).sum(1).float().mean()
    assert large == 4 * small


def test_unknown_mark_is_refused(tissue):
    with pytest.raises(ValueError, match="unknown mark 'pen'"):
        K.plant(tissue, "pen", [0])


# ----------------------------------------------------------------------------- the benchmark's rule

def _bench():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import planted
    return planted


def _job(fold: int, scores: dict, learnt: bool = True) -> dict:
    """One scored (fold, group) of bench/planted.py with the given per-entry rank accuracies."""
    row = {"target": 0, "eligible": 10, "caused": 8 if learnt else 1, "clean_model_caused": 0, "mask_px": 7.0,
           "scores": {e: {"rank": v, "mass": v, "pointing": v} for e, v in scores.items()} if learnt else {}}
    return {"fold": fold, "group": 0, "marks": {"small blue dot": row}, "held_out_acc": 0.9}


def test_the_default_is_the_best_by_the_worse_of_its_two_ranks():
    """A: best ROAD, worst marks; B: best marks, worst ROAD; C: second on both, so C wins; D is better
    than C on both but too slow (3x IG), E has no ROAD row and takes no part; the clean-model
    control and the random map never do."""
    planted = _bench()
    gt = {"A": [0.2, 0.3], "B": [0.9, 0.9], "C": [0.6, 0.7], "D": [0.8, 0.8], "E": [1.0, 1.0],
          "C | clean model": [1.0, 1.0], "random map": [1.0, 1.0]}
    road = {"A": [0.30, 0.30], "B": [0.01, 0.03], "C": [0.20, 0.20], "D": [0.25, 0.25],
            planted.IG: [0.0, 0.0], "random map": [0.0]}
    gt[planted.IG] = [0.1, 0.1]
    out = {"jobs": [_job(f, gt) for f in range(3)],
           "road": [{"fold": 0, "road": road, "ms_per_map": {"A": 1, "B": 1, "C": 1, "D": 30, planted.IG: 10}}]}
    assert planted.choose(out, n=1) == ["C"]
    assert planted.choose(out, n=2, max_cost=float("inf")) == ["D", "C"]
    s = planted.summarise(out)
    assert s["rows"]["C"]["rank"]["tuned"][0] == pytest.approx(0.65)
    # a mark decided on fewer than MIN_FOLDS folds is reported, not averaged
    few = {"jobs": [_job(0, gt), _job(1, gt, learnt=False), _job(2, gt, learnt=False)], "road": out["road"]}
    s = planted.summarise(few)
    assert s["counted"] == [] and "tuned" not in s["rows"]["C"]["rank"]
    assert "1 of 3 (not counted)" in planted.report(few)


def test_the_audit_benchmark_audits_the_maps_explain_py_makes_by_default():
    _bench()
    import shortcuts
    import xai
    from explain import ExplainConfig
    assert xai.ENTRIES[shortcuts.ENTRY] == (ExplainConfig().methods, {})


def test_the_audit_benchmark_marks_its_share_of_every_class_and_another_draw_marks_other_images():
    _bench()
    import shortcuts
    labels = np.repeat(np.arange(9), [80, 80, 80, 80, 80, 80, 80, 80, 78])
    mine = shortcuts.carriers(labels, "tinted square", 0)
    assert [mine[labels == c].sum() for c in range(9)] == [24] * 8 + [23]  # round(0.3 x n) of each class
    rarer = shortcuts.carriers(labels, "tinted square", 0, share=0.15, draw=1)
    assert [rarer[labels == c].sum() for c in range(9)] == [12] * 9
    other = shortcuts.carriers(labels, "tinted square", 0, draw=1)
    assert other.sum() == mine.sum() and (other & mine).sum() < 0.5 * mine.sum()  # other images, about 30% shared
    # the benchmark's own selection keeps the kept maps' file; another selection has its own
    assert shortcuts.maps_cache("m", 0, 1).name == "maps-fold0-group1.pt"
    assert shortcuts.maps_cache("m", 0, 1, 0.15, 1).name == "maps-fold0-group1-share0.15-draw1.pt"


def test_the_audit_benchmarks_oracle_maps_are_the_masks_of_the_marks_drawn_on_the_audited_images():
    _bench()
    import shortcuts
    base = torch.from_numpy(np.random.default_rng(0).integers(60, 200, (12, 3, 28, 28), dtype=np.uint8))
    maps = torch.randn(12, 3, 28, 28)
    carries = np.zeros(12, bool)
    carries[[1, 4, 5, 9]] = True
    rows = np.flatnonzero(carries)
    marked = base.clone()
    marked[rows] = shortcuts.drawn(base, rows, "wide green blob")[0]  # as explained() draws them
    oracle = shortcuts.oracle_maps(base, maps, carries, "wide green blob")
    # an opaque blob changes every pixel it covers: its mask is exactly where the marked image differs
    assert torch.equal(oracle[rows].bool(), (marked[rows] != base[rows]).any(1))
    assert all(20 < oracle[i].sum() < 60 for i in rows)  # a disk 7 px across (38 px)
    assert torch.equal(oracle[~torch.from_numpy(carries)], maps.sum(1)[~torch.from_numpy(carries)])  # others as they were


def test_each_fold_plants_its_marks_on_distinct_classes():
    planted = _bench()
    for f in range(5):
        classes = [planted.target_class(f, g, j) for g in range(len(planted.GROUPS)) for j in range(4)]
        assert len(set(classes)) == len(classes)
    assert len({planted.target_class(f, 0, 0) for f in range(5)}) == 5  # and move from fold to fold
