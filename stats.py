"""Rank statistics and interval half-widths shared by the trust checks, the randomisation tests
and the benchmarks.

    from stats import spearman
    rho = spearman(maps_a, maps_b)   # (N,) one rank correlation per pair of rows
    mean_halfwidth(rho)              # 95% normal interval of their mean: mean +- this
"""
from __future__ import annotations

import warnings

import numpy as np


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..P along the last axis of (N, P); tied values share the average of their ranks."""
    n, p = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, 1)
    pos = np.broadcast_to(np.arange(p), (n, p))
    first = np.ones((n, p), bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    last = np.ones((n, p), bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, pos, p - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((n, p))
    np.put_along_axis(ranks, order, (start + end) / 2 + 1, 1)
    return ranks


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation of each pair of rows of (N, ...) arrays; NaN where a row is constant."""
    ra, rb = (average_ranks(np.asarray(v, np.float64).reshape(len(v), -1)) for v in (a, b))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def nanmean(a, axis=None):
    """np.nanmean without the warning for an all-NaN slice (which stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def mean_halfwidth(values) -> float:
    """Half-width of the 95% normal interval of the mean of the finite values, z * sd / sqrt(n)
    (inf below 2 values): the width the adaptive trust checks narrow by adding images."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(Z95 * v.std(ddof=1) / np.sqrt(len(v))) if len(v) >= 2 else float("inf")


def clustered_halfwidth(values, clusters) -> float:
    """Half-width of the 95% normal interval of the mean of the finite values when the values of one
    cluster are correlated (here: images that met the same randomly drawn model): the
    cluster-robust variance G/(G-1) * sum over clusters of (sum of residuals)^2 / n^2 (Liang and
    Zeger, 1986; the CR1 factor). One value per cluster gives mean_halfwidth; inf below 2 clusters."""
    v, c = np.asarray(values, np.float64), np.asarray(clusters)
    v, c = v[np.isfinite(v)], c[np.isfinite(v)]
    groups, where = np.unique(c, return_inverse=True)
    if len(groups) < 2:
        return float("inf")
    sums = np.bincount(where, weights=v - v.mean())
    return float(Z95 * np.sqrt(len(groups) / (len(groups) - 1) * (sums ** 2).sum()) / len(v))


def wilson_halfwidth(k: int, n: int) -> float:
    """Half-width of the 95% Wilson score interval of a share k / n (Wilson, 1927), which stays
    wider than 0 at a share of 0 or 1 where the normal interval would collapse; inf for n = 0."""
    if n == 0:
        return float("inf")
    z2 = Z95 * Z95
    return float(Z95 / (1 + z2 / n) * np.sqrt(k * (n - k) / n ** 3 + z2 / (4 * n * n)))
