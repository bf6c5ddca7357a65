"""Which maps an explanation run computes, and computing them into the database in batches.

    idx = select(labels, pred, cfg)                      # --indices, --classes, --only-errors, --n
    work = work_list(idx, labels, pred, conf, sample_ids, dataset, split, targets="predicted")
    written = compute_maps(run, setting_id, model, layer, split.images, work, "ig", cfg, device)
    maps = stored_maps(run, setting_id, idx, work, split, "ig")   # what the trust metrics read

A map depends only on its image, its target class and the method's settings (SmoothGrad's noise
comes from the map's own seed), so which batch, shard or rerun computes it does not change it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from attribution import METHODS, as_stored, map_seeds
from data import DataError, normalize
from db_run import RunStore
from db_schema import FILE_SPLIT
from runtime import progress
from trust import Maps


@dataclass
class Work:
    """The maps to compute, one entry each: image index, target class, and what is stored with it."""
    index: np.ndarray
    target: np.ndarray
    sample_id: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    seeds: np.ndarray  # per-map noise seeds (SmoothGrad), from the map's natural key

    def __len__(self) -> int:
        return len(self.index)

    def part(self, start: int, stop: int) -> Work:
        return Work(**{k: v[start:stop] for k, v in asdict(self).items()})

    def where(self, keep: np.ndarray) -> Work:
        return Work(**{k: v[keep] for k, v in asdict(self).items()})


def select(labels: np.ndarray, pred: np.ndarray, cfg) -> np.ndarray:
    """Indices of the images to explain, from --indices, --classes, --only-errors and --n."""
    idx = np.arange(len(labels))
    if cfg.indices:
        idx = np.array(_int_list(cfg.indices, "--indices"), dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= len(labels))]
        if len(bad):
            raise DataError(f"--indices {bad.tolist()} outside the split's 0..{len(labels) - 1}")
    if cfg.classes:
        idx = idx[np.isin(labels[idx], _int_list(cfg.classes, "--classes"))]
    if cfg.only_errors:
        idx = idx[pred[idx] != labels[idx]]
    return idx[: cfg.n] if cfg.n else idx


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise DataError(f"{flag} {text!r}: give comma-separated integers, e.g. 3,14,15") from None


def shard_slice(idx: np.ndarray, k: int, n: int) -> np.ndarray:
    """The K-th (1-based) of N contiguous slices of the selection, sizes differing by at most one.

    By image, before targets are paired with images, so both targets of an image land in one shard;
    it depends on the selection alone, so a rerun of a shard gets the same slice and the same chunks."""
    return np.array_split(idx, n)[k - 1]


def work_list(idx, labels, pred, conf, sample_ids, dataset: str, split: str, targets: str) -> Work:
    """One entry per (image, explained class): predicted, true, both (without duplicates) or the
    positive class of a binary task."""
    chosen = {"predicted": [pred[idx]], "true": [labels[idx]], "both": [pred[idx], labels[idx]],
              "positive": [np.ones_like(pred[idx])]}[targets]
    pairs = np.unique(np.stack([np.concatenate([idx] * len(chosen)), np.concatenate(chosen)]), axis=1)
    index, target = pairs[0], pairs[1]
    sid = dict(zip(idx.tolist(), np.asarray(sample_ids).tolist()))
    return Work(index, target, np.array([sid[i] for i in index.tolist()], np.int64), pred[index], conf[index],
                map_seeds(dataset, split, index, target))


def file_work(tiles, new: list[int], sample_ids, pred, conf, rule: str) -> Work:
    """The maps to compute for the files first seen in this run: per file one entry per target
    class, SmoothGrad's seed from the file's content hash."""
    idx = np.array(new, dtype=np.int64)
    labels = np.array([t.label for t in tiles], dtype=np.int64)
    work = work_list(idx, labels, pred, conf, np.asarray(sample_ids)[idx], "files", FILE_SPLIT, rule)
    work = work.where(work.target >= 0)  # --targets true of a file without a label: nothing to explain
    work.seeds = np.array([map_seeds(f"sha256:{tiles[i].sha256}", FILE_SPLIT, [0], [t])[0]
                           for i, t in zip(work.index.tolist(), work.target.tolist())], dtype=np.int64)
    return work


def compute_maps(run: RunStore, setting_id: int, model, layer, x_uint8, work: Work, method: str, cfg,
                 device) -> int:
    """Run `method` over the work list in fixed chunks of --batch-size, one transaction per chunk,
    with a progress display; returns the number of maps written.

    What is stored is asked again before each chunk, and a stored map is never replaced: processes
    that share a database skip what another finished meanwhile, and a map computed elsewhere (a
    shard's, a concurrent writer's) stays the map its metrics describe.
    """
    written = 0

    def chunks():
        nonlocal written
        for start in range(0, len(work), cfg.batch_size):
            part = work.part(start, start + cfg.batch_size)
            if run.missing(setting_id, part.sample_id, part.target).any():
                x = normalize(x_uint8[torch.from_numpy(part.index)].to(device))
                out = METHODS[method].attribute(model, layer, x.contiguous(memory_format=torch.channels_last),
                                                torch.from_numpy(part.target).to(device), cfg, part.seeds)
                written += run.put(
                    setting_id, sample_ids=part.sample_id, targets=part.target, predicted=part.predicted,
                    confidence=part.confidence, maps=as_stored(out.maps, cfg.store_dtype),
                    deltas=None if out.delta is None else out.delta.detach().cpu().numpy(),
                    raw_maps=None if out.raw is None else as_stored(out.raw, cfg.store_dtype), dtype=cfg.store_dtype)
            yield len(part)

    progress(chunks(), len(work), method, "maps")
    return written


def one_per_class(rows: dict, num_classes: int) -> np.ndarray:
    """Row numbers of the first explained image of each true class, correct predictions first."""
    picks = []
    for c in range(num_classes):
        mine = np.flatnonzero(rows["label"] == c)
        right = mine[rows["predicted"][mine] == c]
        if len(mine):
            picks.append((right if len(right) else mine)[0])
    return np.array(picks, dtype=np.int64)


def stored_maps(run: RunStore, setting_id: int, indices, work: Work, split, method: str) -> Maps:
    """The stored maps of these images, restricted to the run's (index, target) pairs."""
    rows = run.maps(setting_id, indices=np.asarray(indices).tolist())
    pairs = dict(zip(zip(work.index.tolist(), work.target.tolist()), work.seeds.tolist()))
    keep = np.array([(i, t) in pairs for i, t in zip(rows["index"].tolist(), rows["target"].tolist())], bool)
    index = rows["index"][keep]
    return Maps(method, rows["attribution_id"][keep], index, rows["label"][keep], rows["target"][keep],
                np.array([pairs[(i, t)] for i, t in zip(index.tolist(), rows["target"][keep].tolist())], np.int64),
                torch.from_numpy(rows["maps"][keep]) if keep.any() else torch.zeros(0),
                torch.from_numpy(rows["delta"][keep]), split.images[torch.from_numpy(index)],
                None if split.masks is None else split.masks[torch.from_numpy(index)])
