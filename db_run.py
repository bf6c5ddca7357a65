"""The storage steps of one explanation run, behind a few calls: explain.py reads as the method,
this file keeps the ledger. A run is one model (by checkpoint hash) on one set of images (a data
split, or image files), so every call below is already filtered to it.

    with ExplanationDB("explanations.db") as db:
        run = RunStore.open(db, checkpoint_sha256=sha, model=mcfg["model"], config=mcfg,
                            dataset=data.key, size=28, split="test")
        sample_ids = run.add_samples(indices, labels)
        settings = run.add_settings({"ig": {...}, "gradcam": {...}})        # method -> setting id
        todo = run.missing(settings["ig"], sample_ids, targets)              # bool per (sample, target)
        run.put(settings["ig"], sample_ids=..., targets=..., ..., maps=maps)
        rows = run.maps(settings["ig"], indices=[3, 14])                     # read back, as db.maps
        run.add_trust({settings["ig"]: {"deletion_auc": summary}, 0: {...}}) # 0: model-level rows
        run.add_audit(settings["ig"], params, strategies, members)           # explain.py --audit
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from db import ExplanationDB
from db_schema import FILE_SPLIT


@dataclass(frozen=True)
class RunStore:
    """One model on one set of images, in an open ExplanationDB."""
    db: ExplanationDB
    model_id: int
    dataset: str  # the data file's key, or "files" for image files (each its own sample)
    size: int
    split: str

    @classmethod
    def open(cls, db: ExplanationDB, *, checkpoint_sha256: str, model: str, config: dict, dataset: str,
             size: int, split: str) -> RunStore:
        """Register the checkpoint (its first name and config are kept) and bind the run to its data."""
        return cls(db, db.add_model(checkpoint_sha256, model, config), dataset, size, split)

    @property
    def where(self) -> dict:
        """maps()' filters for this run's images; image files are found by sample id instead."""
        common = {"model_id": self.model_id, "size": self.size, "split": self.split}
        return common if self.split == FILE_SPLIT else {**common, "dataset": self.dataset}

    def add_settings(self, params: dict[str, dict]) -> dict[str, int]:
        """method -> its setting id, one per method with its canonical parameters."""
        return {method: self.db.add_setting(method, p) for method, p in params.items()}

    def add_samples(self, indices, labels) -> np.ndarray:
        """Sample ids of these images of the run's split, in input order."""
        return self.db.add_samples(dataset=self.dataset, size=self.size, split=self.split, indices=indices,
                                   labels=labels)

    def add_file(self, *, sha256: str, path: str, width: int, height: int, label: int) -> int:
        """The sample id of one image file (its content hash is the key; see ExplanationDB.add_files)."""
        return int(self.db.add_files(size=self.size, sha256s=[sha256], paths=[path], widths=[width],
                                     heights=[height], labels=[label])[0])

    def missing(self, setting_id: int, sample_ids, targets) -> np.ndarray:
        """Per (sample, target) pair: True where no map is stored yet for this model and setting."""
        done = self.db.done_targets(self.model_id, setting_id, sample_ids)
        return np.array([(s, t) not in done for s, t in zip(np.asarray(sample_ids).tolist(),
                                                             np.asarray(targets).tolist())], dtype=bool)

    def put(self, setting_id: int, *, sample_ids, targets, predicted, confidence, maps, deltas=None,
            raw_maps=None, dtype: str = "float16") -> int:
        """Store a batch of new maps in one transaction; a map already stored under a key (another
        process's, a shard's) is kept, so its metrics keep describing it. Returns the rows written."""
        return self.db.add_attributions(model_id=self.model_id, setting_id=setting_id, sample_ids=sample_ids,
                                        targets=targets, predicted=predicted, confidence=confidence, maps=maps,
                                        deltas=deltas, raw_maps=raw_maps, dtype=dtype, replace=False)

    def maps(self, setting_id: int, *, indices=None, sample_ids=None) -> dict[str, np.ndarray]:
        """This run's stored maps of one setting (all, or these split indices or sample ids)."""
        return self.db.maps(setting_id=setting_id, indices=indices, sample_ids=sample_ids, **self.where)

    def add_map_metric(self, attribution_ids, name: str, values) -> None:
        """One trust metric per map (NaN: not defined for that map)."""
        self.db.add_sample_metrics(attribution_ids, name, values)

    def add_trust(self, summaries: dict[int, dict]) -> None:
        """Aggregated trust metrics: setting id (0: the model's own rows, such as the agreement
        between methods) -> name -> a Summary (value, n, detail)."""
        for setting_id, named in summaries.items():
            for name, s in named.items():
                self.db.add_summary_metric(model_id=self.model_id, setting_id=setting_id or None,
                                           dataset=self.dataset, size=self.size, split=self.split, name=name,
                                           value=s.value, n=s.n, detail=s.detail)

    def add_audit(self, setting_id: int, params: dict, strategies: list[dict], members: dict) -> int:
        """Store a shortcut audit of this run's maps of one setting (ExplanationDB.add_audit)."""
        return self.db.add_audit(model_id=self.model_id, setting_id=setting_id, dataset=self.dataset, size=self.size,
                                 split=self.split, params=params, strategies=strategies, members=members)

    def audit(self, setting_id: int) -> dict | None:
        """The stored shortcut audit of this run's maps of one setting, or None."""
        return self.db.audit(model_id=self.model_id, setting_id=setting_id, dataset=self.dataset, size=self.size,
                             split=self.split)

    def trust(self, setting_ids) -> list[dict]:
        """The stored aggregated metrics of these settings (and the model-level ones) on this run's data."""
        keep = {None, *setting_ids}
        return [r for r in self.db.summary_metrics(self.model_id)
                if (r["dataset"], r["size"], r["split"]) == (self.dataset, self.size, self.split)
                and r["setting_id"] in keep]
