"""Rank statistics shared by the trust checks, the randomisation tests and the benchmarks.

    from stats import spearman
    rho = spearman(maps_a, maps_b)   # (N,) one rank correlation per pair of rows
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
