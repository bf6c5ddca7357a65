"""The map of the data set (explain.py --audit; the report's mosaic): every audited map placed in two
dimensions by what it points at, and one thumbnail per cell of a grid laid over that plane, as
Slideflow's mosaic map lays tiles over an embedding of features.

    xy = layout(vectors)           # (N, 2) in [0, 1]: maps that point at the same kind of thing lie close
    cells = mosaic(xy, grid=24)    # (24, 24) indices into xy, -1 where a cell is empty
    island(xy, members)            # how much a group of maps keeps to itself on the map (bench/bench.py audit)

The places are a t-SNE (van der Maaten and Hinton, JMLR 2008; scikit-learn's) of the audit's
descriptions of the maps (audit.describe), so a group of images that a model decides by the same
thing (a pen mark on images of every class, say) is an island a person sees among thousands of
images. bench/bench.py audit measures whether the images a planted mark decided form one.
"""
from __future__ import annotations

import numpy as np

FIT = 2000      # at most this many maps are laid out by t-SNE; the others join their nearest ones
NEIGHBOURS = 5  # ... at the mean place of this many nearest laid-out maps
GRID = 24       # cells per side of the report's mosaic


def layout(v: np.ndarray, seed: int = 0, fit: int = FIT) -> np.ndarray:
    """(N, 2) places in [0, 1] of the rows of v (N, D): a t-SNE of a seeded sample of at most `fit`
    rows (perplexity 30, fewer for small N), each other row at the mean place of its NEIGHBOURS
    nearest sampled rows in v. Both axes share one scale, so distances keep their meaning. Fewer
    than 8 rows are placed by their first two principal components."""
    from sklearn.manifold import TSNE
    from sklearn.neighbors import NearestNeighbors
    v = np.asarray(v, np.float64)
    if len(v) < 8:
        xy = np.zeros((len(v), 2))
        if len(v) > 1:
            u, s, _ = np.linalg.svd(v - v.mean(0), full_matrices=False)
            k = min(2, len(s))
            xy[:, :k] = u[:, :k] * s[:k]
        return scaled(xy)
    sample = np.sort(np.random.default_rng(seed).permutation(len(v))[:fit])
    placed = TSNE(2, perplexity=min(30.0, (len(sample) - 1) / 3), init="pca", random_state=seed,
                  n_jobs=1).fit_transform(v[sample])
    xy = np.empty((len(v), 2))
    xy[sample] = placed
    rest = np.setdiff1d(np.arange(len(v)), sample)
    if len(rest):
        near = NearestNeighbors(n_neighbors=min(NEIGHBOURS, len(sample))).fit(v[sample])
        xy[rest] = placed[near.kneighbors(v[rest], return_distance=False)].mean(1)
    return scaled(xy)


def scaled(xy: np.ndarray) -> np.ndarray:
    """xy moved and scaled by one factor into [0, 1] (the longer axis spans it, the other is centred)."""
    if not len(xy):
        return xy
    lo, hi = xy.min(0), xy.max(0)
    span = float((hi - lo).max())
    if span == 0:
        return np.full_like(xy, 0.5)
    return (xy - lo) / span + (1 - (hi - lo) / span) / 2


def mosaic(xy: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(grid, grid) index of the row of xy (in [0, 1]) nearest the centre of each cell among those
    inside it, -1 for an empty cell; row 0 is the top (largest y)."""
    out = np.full((grid, grid), -1, np.int64)
    if not len(xy):
        return out
    col = np.minimum((xy[:, 0] * grid).astype(np.int64), grid - 1)
    row = grid - 1 - np.minimum((xy[:, 1] * grid).astype(np.int64), grid - 1)
    centre = np.stack([(col + 0.5) / grid, 1 - (row + 0.5) / grid], 1)
    dist = np.linalg.norm(xy - centre, axis=1)
    cell = row * grid + col
    order = np.lexsort((np.arange(len(xy)), dist, cell))  # per cell, the nearest first; ties: lowest index
    first = order[np.unique(cell[order], return_index=True)[1]]
    out.flat[cell[first]] = first
    return out


def island(xy: np.ndarray, members: np.ndarray, k: int = 10) -> float:
    """The mean share of each member's k nearest other points (on the map xy) that are members too:
    1 for a group that lies apart, about the group's share of all points for one scattered among
    them. members: bool (N,)."""
    members = np.asarray(members, bool)
    rows = np.flatnonzero(members)
    if not len(rows) or len(xy) < 2:
        return float("nan")
    from sklearn.neighbors import NearestNeighbors
    k = min(k, len(xy) - 1)
    near = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy[rows], return_distance=False)
    others = np.array([[j for j in row if j != i][:k] for i, row in zip(rows, near)])
    return float(members[others].mean())
