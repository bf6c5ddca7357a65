"""The map of the data set (mosaic.py): the layout keeps who is whose neighbour (checked with
scikit-learn's trustworthiness, an independent yardstick, against a random layout that must fail
it), maps not laid out by t-SNE land with their group, and each mosaic cell shows the image nearest
its centre (checked by brute force)."""
import numpy as np
import pytest
from sklearn.manifold import trustworthiness

import mosaic


def groups(n_per: int = 60, k: int = 4, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated groups of unit vectors (the audit's descriptions are unit vectors)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    v = np.repeat(centres, n_per, 0) + 0.15 * rng.normal(size=(k * n_per, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True), np.repeat(np.arange(k), n_per)


def own_neighbours(xy: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of each point's k nearest points (in xy) that share its label."""
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    near = np.argsort(d, 1)[:, :k]
    return float((labels[near] == labels[:, None]).mean())


@pytest.mark.parametrize("fit", [mosaic.FIT, 80])  # all laid out by t-SNE; most placed by their neighbours
def test_the_layout_keeps_groups_together_and_neighbours_near(fit):
    v, labels = groups()
    xy = mosaic.layout(v, fit=fit)
    assert xy.shape == (240, 2) and own_neighbours(xy, labels) > 0.95
    assert trustworthiness(v, xy, n_neighbors=10) > 0.9
    random = np.random.default_rng(1).random((240, 2))  # the control: a layout that ignores v
    assert own_neighbours(random, labels) < 0.4 and trustworthiness(v, random, n_neighbors=10) < 0.7


def test_the_layout_fills_the_unit_square_on_one_scale_and_is_seeded():
    v, _ = groups(n_per=30, k=3)
    xy = mosaic.layout(v)
    span = xy.max(0) - xy.min(0)
    assert xy.min() >= 0 and xy.max() <= 1 and span.max() == pytest.approx(1)  # the longer axis spans [0, 1]
    assert xy.min(0)[np.argmin(span)] == pytest.approx((1 - span.min()) / 2)  # the shorter one is centred
    np.testing.assert_array_equal(xy, mosaic.layout(v))


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_a_handful_of_maps_still_gets_places(n):
    v, _ = groups(n_per=max(n, 1), k=1)
    xy = mosaic.layout(v[:n])
    assert xy.shape == (n, 2) and np.isfinite(xy).all() and (0 <= xy).all() and (xy <= 1).all()
    if n == 2:
        assert np.linalg.norm(xy[0] - xy[1]) == pytest.approx(1)  # two different maps lie apart


def test_each_cell_shows_the_point_nearest_its_centre():
    xy = np.random.default_rng(2).random((500, 2)) ** 2  # crowded in a corner, empty cells elsewhere
    grid = 7
    cells = mosaic.mosaic(xy, grid)
    for r in range(grid):
        for c in range(grid):
            inside = [i for i in range(len(xy)) if min(int(xy[i, 0] * grid), grid - 1) == c
                      and grid - 1 - min(int(xy[i, 1] * grid), grid - 1) == r]
            if not inside:
                assert cells[r, c] == -1
                continue
            centre = np.array([(c + 0.5) / grid, 1 - (r + 0.5) / grid])
            assert cells[r, c] == min(inside, key=lambda i: np.linalg.norm(xy[i] - centre))
    assert (cells >= 0).sum() < grid * grid  # some cells are empty


def test_the_top_row_is_the_top_of_the_plane_and_ties_keep_the_first():
    xy = np.array([[0.25, 0.75], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    np.testing.assert_array_equal(mosaic.mosaic(xy, 2), [[0, -1], [-1, 1]])


def test_an_island_keeps_to_itself_and_a_scattered_group_does_not():
    rng = np.random.default_rng(3)
    xy = np.concatenate([rng.random((200, 2)), 5 + rng.random((20, 2))])  # 20 points far from the rest
    apart = np.arange(220) >= 200
    assert mosaic.island(xy, apart) == 1.0
    scattered = np.zeros(220, bool)
    scattered[rng.choice(200, 20, replace=False)] = True
    assert abs(mosaic.island(xy, scattered) - 19 / 219) < 0.07  # about the group's share of the others
    line = np.array([[0.0, 0], [1, 0], [3, 0]])  # by hand: each point's nearest other
    assert mosaic.island(line, [True, True, False], k=1) == 1.0 and mosaic.island(line, [True, False, True], k=1) == 0.0


def test_the_page_gets_no_map_for_an_audit_stored_before_places_existed():
    """An audit written by schema 4 has no x, y (NULL, read as NaN): the report shows its strategies
    and no map, instead of placing every image in one cell."""
    from gallery import mosaic_payload
    ids = np.arange(10, 20)
    card_of = {"ig": {int(a): (int(a) - 10, 0) for a in ids}}
    position = {(i, 0): i for i in range(10)}
    members = {"attribution_id": ids, "strategy_id": np.full(10, 3), "x": np.full(10, np.nan), "y": np.full(10, np.nan)}
    assert mosaic_payload({"ig": {"members": members}}, card_of, position) == {}
    members |= {"x": np.linspace(0, 1, 10), "y": np.linspace(0, 1, 10)}  # on a diagonal: one image per cell it crosses
    page = mosaic_payload({"ig": {"members": members}}, card_of, position)["ig"]
    assert page["grid"] == mosaic.GRID and len(page["cells"]) == 10
    assert all(s == 3 for *_, s in page["cells"]) and sorted(a for _, _, a, _ in page["cells"]) == list(range(10))
