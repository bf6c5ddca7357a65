"""The shortcut audit (audit.py) on hand-built models, images and maps whose answer is known: a model
that calls class 1 whenever a blue ink dot is anywhere in the image (a shortcut) or the whole tissue
is blue (the class's real tissue), maps that point at the dot or spread over the tissue."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import audit
from data import MEAN, STD


class DotModel(nn.Module):
    """Class 1 when some pixel's blueness (B - (R + G) / 2) exceeds 0.3, else class 0. Its
    "Grad-CAM layer" (self.layer) has two channels: blueness and brightness, per pixel."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([[-0.5, -0.5, 1.0], [1 / 3, 1 / 3, 1 / 3]])[:, :, None, None])
            self.layer.bias.zero_()

    def forward(self, x):
        a = self.layer(x * STD + MEAN)  # the model's input is normalised; the layer sees 0-1 colours
        blue = a[:, 0].flatten(1).amax(1)
        return torch.stack([torch.zeros_like(blue), 40 * (blue - 0.3)], 1)


def tissue(n: int, seed: int, blue: bool = False) -> torch.Tensor:
    """uint8 (n, 3, 28, 28): pink (or blue) tissue-like noise."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.tensor([0.45, 0.45, 0.85] if blue else [0.80, 0.50, 0.70])[None, :, None, None]
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, 3, 28, 28, generator=g), 3, 1, 1)
    return ((colour + 0.1 * (smooth - 0.5)).clamp(0, 1) * 255).round().to(torch.uint8)


def with_dots(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A 3x3 dark-blue ink dot at a random place of each image; the dots' centres."""
    rng, out, where = np.random.default_rng(seed), x.clone(), []
    for i in range(len(x)):
        cy, cx = rng.integers(3, 25, 2)
        out[i, :, cy - 1:cy + 2, cx - 1:cx + 2] = torch.tensor([38, 51, 153], dtype=torch.uint8)[:, None, None]
        where.append((int(cy), int(cx)))
    return out, where


def blob(centre, sigma: float = 1.5, side: int = 28) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    return torch.exp(-((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2) / (2 * sigma ** 2))


def diffuse(n: int, seed: int) -> torch.Tensor:
    """Maps spread over the whole image (relevance on the tissue everywhere)."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(n, 28, 28, generator=g)


@pytest.fixture(scope="module")
def case():
    """30 images of class 0 (pink tissue), 24 of class 1 through the dot shortcut (pink tissue with a
    dot; the maps point at it) and 24 of class 1 through real blue tissue (diffuse maps)."""
    pink = tissue(30, 0)
    dotted, centres = with_dots(tissue(24, 1), 2)
    blue = tissue(24, 3, blue=True)
    images = torch.cat([pink, dotted, blue])
    maps = torch.cat([diffuse(30, 4), torch.stack([blob(c) for c in centres]), diffuse(24, 5)])
    model = DotModel().eval()
    classes = model(((images.float() / 255 - MEAN) / STD)).argmax(1)
    assert classes.tolist() == [0] * 30 + [1] * 48  # the hand-built model does what it says
    return model, images, maps, classes, centres


def test_the_hot_spot_is_every_pixel_near_the_peak_s_relevance(monkeypatch):
    monkeypatch.setattr(audit, "HOT", 0.5)
    m = torch.zeros(1, 28, 28)
    m[0, 5:10, 5:10] = 1.0     # the peak's region
    m[0, 20:23, 20:23] = 0.9   # above half the peak, apart from it: part of the spot too (a ring, two strokes)
    m[0, 14, 3] = 0.2          # below half
    m[0, 2, 20] = -5.0         # negative relevance is not relevance for the class
    spot = audit.hot_spots(m)[0]
    expected = torch.zeros(28, 28, dtype=torch.bool)
    expected[5:10, 5:10] = True
    expected[[5, 5, 9, 9], [5, 9, 5, 9]] = False  # 3 px box smoothing: a corner keeps 4/9 of the peak, an edge 6/9
    expected[20:23, 20:23] = True
    expected[[20, 20, 22, 22], [20, 22, 20, 22]] = False  # corners: 4/9 x 0.9 = 0.4 < 0.5
    assert torch.equal(spot, expected)


def test_a_negative_or_empty_map_has_no_hot_spot():
    assert not audit.hot_spots(-torch.ones(2, 28, 28)).any()
    assert not audit.hot_spots(torch.zeros(1, 28, 28)).any()


def test_the_control_region_has_the_same_shape_elsewhere():
    m = torch.zeros(3, 28, 28, dtype=torch.bool)
    m[0, 2:6, 3:8] = True
    m[1, 20:27, 10:12] = True
    m[2, 13, 13] = True
    c = audit.shift(m, audit.shifts(m, [1, 2, 3]))
    for a, b in zip(m, c):
        ya, xa = torch.nonzero(a, as_tuple=True)
        yb, xb = torch.nonzero(b, as_tuple=True)
        assert len(ya) == len(yb)
        dy, dx = int(yb.min() - ya.min()), int(xb.min() - xa.min())
        assert torch.equal(ya + dy, yb) and torch.equal(xa + dx, xb)  # a translation of the same shape
        assert not (a & b).any()  # small shapes always find a place apart


def test_filling_the_dot_changes_the_prediction_and_filling_elsewhere_does_not(case):
    model, images, maps, classes, centres = case
    dotted = slice(30, 54)
    spots = audit.grow(audit.hot_spots(maps[dotted]), 1)
    for s, (cy, cx) in zip(spots, centres):
        assert s[cy - 1:cy + 2, cx - 1:cx + 2].all()  # the grown hot spot covers the whole dot
    seeds = list(range(24))
    before = audit.class_probability(model, images[dotted], classes[dotted])
    flip, drop = audit.causal_test(model, images[dotted], spots, classes[dotted], seeds, before)
    assert flip.all() and (drop > 0.9).all()
    control, _ = audit.causal_test(model, images[dotted], audit.shift(spots, audit.shifts(spots, seeds)),
                                   classes[dotted], seeds, before)
    assert not control.any()


def test_content_flags_ink_and_not_tissue(case):
    model, images, maps, classes, centres = case
    spots = audit.grow(audit.hot_spots(maps), 1)
    elsewhere = audit.shift(spots, audit.shifts(spots, list(range(len(maps)))))
    z = audit.robust_z(audit.content(images, spots), audit.content(images, elsewhere)[:54])
    assert (z[30:54] > audit.ATYPICAL).all()       # the dot: dark blue, unlike the pink tissue
    assert (z[:30] <= audit.ATYPICAL).float().mean() > 0.9  # the tissue's own hot spots: like the tissue


@pytest.mark.parametrize("k", [2, 3])
def test_the_eigengap_finds_the_number_of_separate_groups(k):
    rng = np.random.default_rng(k)
    centres = np.eye(16)[:k] * 3
    v = np.concatenate([c + 0.2 * rng.standard_normal((25, 16)) for c in centres])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = audit.cluster(v)
    truth = np.repeat(np.arange(k), 25)
    assert len(np.unique(labels)) == k
    assert all(len(np.unique(labels[truth == g])) == 1 for g in range(k))  # each group whole, none shared


def test_many_rows_take_their_neighbours_strategy(monkeypatch):
    monkeypatch.setattr(audit, "MAX_EIGEN", 40)  # 40 of 90 rows clustered, 50 assigned by neighbours
    rng = np.random.default_rng(0)
    v = np.concatenate([c + 0.2 * rng.standard_normal((45, 8)) for c in np.eye(8)[:2] * 3])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = audit.cluster(v)
    assert len(np.unique(labels[:45])) == 1 and len(np.unique(labels[45:])) == 1 and labels[0] != labels[-1]


def small_and_large_piece(inside: float, across: float):
    """A hand-made graph: a piece of 5 rows, each joined to the 4 others (weight `inside`) and to 6
    rows of a piece of 30 (weight `across`), the 30 joined in a ring to their 10 nearest (weight 1);
    the two pieces' vectors far apart (their Davies-Bouldin similarity well under 1)."""
    import scipy.sparse as sp
    w = np.zeros((35, 35))
    w[:5, :5] = inside
    for i in range(5):
        w[i, 5 + (6 * i + np.arange(6)) % 30] = across
    for i in range(30):
        w[5 + i, 5 + (i + np.arange(1, 6)) % 30] = 1.0
    w = np.maximum(w, w.T)
    np.fill_diagonal(w, 0)
    v = np.concatenate([np.tile([1.0, 0], (5, 1)), np.tile([0, 1.0], (30, 1))])
    v += 0.01 * np.random.default_rng(0).standard_normal(v.shape)
    return v, sp.csr_matrix(w), np.repeat([0, 1], [5, 30])


def test_a_small_piece_is_not_joined_for_the_edges_the_k_nn_graph_forces_out_of_it():
    # Each of the 5 rows has 10 neighbours and only 4 inside: 6 of 10 edges must leave (floor 0.6).
    # inside 1, across 0.5: conductance 15 / 35 = 0.43 > 0.1, but (0.43 - 0.6) / 0.4 < 0: apart.
    v, g, pieces = small_and_large_piece(inside=1.0, across=0.5)
    assert len(np.unique(audit.merge_overlapping(v, g, pieces, joined=0.1, k=10))) == 2
    # The same graph read as a 4-nearest-neighbour graph has no floor for 5 rows: joined.
    assert len(np.unique(audit.merge_overlapping(v, g, pieces, joined=0.1, k=4))) == 1
    # A piece barely joined inside (0.1) whose rows lean on the large piece (1.0): conductance
    # 30 / 32 = 0.94, (0.94 - 0.6) / 0.4 = 0.84 > 0.1: a fragment of the large piece, joined.
    v, g, pieces = small_and_large_piece(inside=0.1, across=1.0)
    assert len(np.unique(audit.merge_overlapping(v, g, pieces, joined=0.1, k=10))) == 1


def test_an_alarmed_strategy_takes_in_the_maps_its_kind_of_spot_decided_elsewhere():
    # A: alarmed, its spots unlike tissue in direction (1, 0) (say greener than tissue); C: alarmed too,
    # direction (0, 1), weaker evidence. B and D raise no alarm.
    groups = [np.arange(0, 6), np.arange(6, 12), np.arange(12, 18), np.array([18])]
    flip = np.zeros(19, bool)
    atypical = np.zeros(19, bool)
    direction = np.zeros((19, 2))
    flip[:6], atypical[:6], direction[:6] = True, True, [1.0, 0]
    flip[12:18], atypical[12:18], direction[12:18] = True, True, [0, 1.0]
    flip[6], atypical[6], direction[6] = True, True, [1.0, 0.5]    # decided, unlike tissue A's way: to A
    flip[7], atypical[7], direction[7] = True, True, [-1.0, 0]     # unlike tissue the other way: stays
    flip[8], direction[8] = True, [1.0, 0]                         # decided but like tissue: stays
    atypical[9], direction[9] = True, [1.0, 0]                     # unlike tissue but decided nothing: stays
    flip[18], atypical[18], direction[18] = True, True, [1.0, 1.0]  # A's way and C's: the stronger evidence takes it
    out = audit.recruit(groups, [True, False, True, False], [2.0, 0.0, 1.0, 0.0], flip, atypical, direction)
    assert [sorted(g.tolist()) for g in out] == [[0, 1, 2, 3, 4, 5, 6, 18], [7, 8, 9, 10, 11], list(range(12, 18))]
    # no alarm, nothing moves
    same = audit.recruit(groups, [False] * 4, [0.0] * 4, flip, atypical, direction)
    assert [g.tolist() for g in same] == [g.tolist() for g in groups]


def test_the_audit_puts_the_shortcut_first_and_alone(case):
    model, images, maps, classes, centres = case
    found = audit.audit_maps(model, model.layer, images, maps, classes, list(range(len(maps))))
    top = found.strategies[1][0]
    assert set(top.members.tolist()) == set(range(30, 54))  # what the maps point at: ink, wherever the dot is
    assert top.flip == 1 and top.control_flip == 0 and top.atypical == 1 and top.alarm
    assert 0 < top.area < 0.05
    blue = [s for s in found.strategies[1] if set(s.members.tolist()) & set(range(54, 78))]
    assert blue and all(s.flip == 0 and not s.alarm for s in blue)  # real blue tissue: no fill flips it
    assert all(not s.alarm for s in found.strategies[0])
    # every audited map in exactly one strategy, and member_of points at it
    flat = found.flat()
    assert sorted(np.concatenate([s.members for s in flat]).tolist()) == list(range(78))
    assert all((found.member_of[s.members] == j).all() for j, s in enumerate(flat))
    # on the map of the data set (mosaic.layout) the dot maps are an island: their nearest are dot maps
    xy = np.stack([found.per_map["x"], found.per_map["y"]], 1)
    d = np.linalg.norm(xy[30:54, None] - xy[None], axis=2)
    d[np.arange(24), np.arange(30, 54)] = np.inf
    assert np.isin(np.argsort(d, 1)[:, :5], np.arange(30, 54)).mean() > 0.9


def test_spray_groups_maps_by_place_so_dots_anywhere_do_not_form_one_strategy(case):
    """Why the default describes what a map points at: SpRAy's downsampled maps put dots at different
    places in different groups (or with the diffuse maps of real tissue)."""
    model, images, maps, classes, centres = case
    found = audit.audit_maps(model, model.layer, images, maps, classes, list(range(len(maps))), "spray")
    assert all(set(s.members.tolist()) != set(range(30, 54)) for s in found.strategies[1])


def test_mismatched_inputs_are_refused(case):
    model, images, maps, classes, centres = case
    with pytest.raises(ValueError, match="one of each per map"):
        audit.audit_maps(model, model.layer, images, maps[:10], classes, range(78))
    with pytest.raises(ValueError, match="features must be one of"):
        audit.audit_maps(model, model.layer, images, maps, classes, range(78), "pixels")


def test_filling_a_window_round_each_region_equals_road_on_the_whole_image():
    """fill() solves ROAD's imputation on a window round each region; without noise it must give
    road.impute's whole-image solution, for regions in the middle, at edges and corners, and of
    several window sizes in one batch."""
    from road import impute
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 28, 28, generator=g, dtype=torch.float64)
    regions = torch.zeros(6, 28, 28, dtype=torch.bool)
    regions[0, 10:13, 12:14] = True           # small, in the middle
    regions[1, 0:4, 0:5] = True               # at a corner
    regions[2, 20:28, 3:9] = True             # on the bottom edge
    regions[3, 5:19, 7:21] = True             # a large one (another window size)
    regions[4, [3, 9], [4, 15]] = True        # two pieces
    # image 5: no region at all
    ours = audit.fill(x, regions, list(range(6)), tol=1e-12, noise=0)
    assert torch.allclose(ours[:5], impute(x[:5], regions[:5], noise=0, seeds=None, tol=1e-12), atol=1e-9)
    assert torch.equal(ours[5], x[5])
    assert torch.equal(ours[~regions[:, None].expand_as(x)], x[~regions[:, None].expand_as(x)])


def test_the_stored_audit_is_the_audit(case, tmp_path):
    """as_rows + ExplanationDB.add_audit/audit: every map's stored strategy is the one audit_maps put
    it in, ranks run from the most suspicious within each class, exemplars are the strategy's own."""
    from audit_run import as_rows
    from db import ExplanationDB
    model, images, maps, classes, centres = case
    found = audit.audit_maps(model, model.layer, images, maps, classes, list(range(len(maps))))
    with ExplanationDB(tmp_path / "a.db") as db:
        m, s = db.add_model("0" * 64, "dot", {}), db.add_setting("handmade", {})
        ids = db.add_samples(dataset="d", size=28, split="test", indices=np.arange(78), labels=classes.numpy())
        db.add_attributions(model_id=m, setting_id=s, sample_ids=ids, targets=classes.numpy(),
                            predicted=classes.numpy(), confidence=np.ones(78), maps=maps.numpy())
        rows = db.maps(setting_id=s)
        strategies, members = as_rows(found, rows["attribution_id"])
        db.add_audit(model_id=m, setting_id=s, dataset="d", size=28, split="test", params={}, strategies=strategies,
                     members=members)
        got = db.audit(model_id=m, setting_id=s, dataset="d", size=28, split="test")
    by_id = {t["id"]: t for t in got["strategies"]}
    flat = found.flat()
    for index, sid in zip(got["members"]["index"].tolist(), got["members"]["strategy_id"].tolist()):
        t, want = by_id[sid], flat[found.member_of[index]]
        assert (t["class"], t["n"]) == (want.cls, want.n) and index in want.members.tolist()
        assert set(t["exemplars"]) <= set(rows["attribution_id"][want.members].tolist())
    for name in ("x", "y", "flip", "area"):  # the members' rows come back as stored (in attribution-id order)
        np.testing.assert_allclose(got["members"][name], found.per_map[name][got["members"]["index"]])
    for c in (0, 1):
        ranked = [t for t in got["strategies"] if t["class"] == c]
        assert [t["rank"] for t in ranked] == list(range(1, len(ranked) + 1))
        assert all(audit.evidence(a["suspicion"], a["n"]) >= audit.evidence(b["suspicion"], b["n"])
                   for a, b in zip(ranked, ranked[1:]))
    dot = max(got["strategies"], key=lambda t: t["suspicion"])
    assert dot["class"] == 1 and dot["rank"] == 1 and dot["n"] == 24 and dot["suspicion"] >= audit.ALARM


def test_a_map_s_control_place_depends_on_its_seed_alone():
    """The control's move comes from the map's own seed: the same in any batch, and inside the image."""
    g = torch.Generator().manual_seed(3)
    m = audit.grow(audit.hot_spots(torch.rand(40, 28, 28, generator=g) ** 8), 1)
    seeds = list(range(100, 140))
    together = audit.shifts(m, seeds)
    alone = torch.cat([audit.shifts(m[i:i + 1], seeds[i:i + 1]) for i in range(40)])
    assert torch.equal(together, alone)
    moved = audit.shift(m, together)
    assert torch.equal(moved.sum((1, 2)), m.sum((1, 2)))  # nothing pushed out of the image
