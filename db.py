"""Attribution maps (Integrated Gradients, Grad-CAM, ...) for many images in one SQLite file.

With db_schema.py (the file format), db_merge.py (--merge-from) and db_audit.py (the shortcut
audit's tables), the only modules that import sqlite3. Models are keyed by checkpoint hash,
settings by method and canonical params, samples by (dataset, size, split, index); one row per
(model, setting, sample, target) holds the map as a float16/float32 blob, so thousands of maps can
be queried later.

    with ExplanationDB("runs/explanations.db") as db:
        m = db.add_model(sha256, "resnet18", cfg)
        s = db.add_setting("ig", {"steps": 64, "baseline": "zeros"})
        ids = db.add_samples(dataset="pathmnist-1a2b3c", size=28, split="test", indices=indices, labels=labels)
        db.add_attributions(model_id=m, setting_id=s, sample_ids=ids, targets=targets, predicted=predicted,
                            confidence=confidence, maps=maps, deltas=deltas)
        worst = db.top_errors(k=16, method="ig")   # worst["maps"]: (16, 3, 28, 28) float32
        rows = db.maps(model_id=m, setting_id=s)
        db.add_sample_metrics(rows["attribution_id"], "deletion_auc", aucs)   # trust metrics per map
        db.add_summary_metric(model_id=m, setting_id=s, dataset="pathmnist-1a2b3c", size=28, split="test",
                              name="deletion_auc", value=aucs.mean(), n=len(aucs), detail={"curve": mean_curve})
        counts = db.merge_from("shard2.db")   # another file's rows, ids remapped; twice adds nothing
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time

import numpy as np

from db_audit import AuditTables
from db_merge import check_sources, merge_into
from db_schema import (APPLICATION_ID, DTYPES, FILE_SPLIT, MIGRATIONS, NOW, SCHEMA_VERSION, UNKNOWN_LABEL,
                       DatabaseError, StoreError, canonical_json, check_header, db_error, decode, encode, floats,
                       ints, plain, statements, uri)

__all__ = ["APPLICATION_ID", "FILE_SPLIT", "SCHEMA_VERSION", "UNKNOWN_LABEL", "DatabaseError", "ExplanationDB",
           "StoreError", "check_sources"]

# maps() filter -> condition on the joined row (a: attributions, s: settings, x: samples).
_FILTERS = {"model_id": "a.model_id = ?", "setting_id": "a.setting_id = ?", "method": "s.method = ?",
            "dataset": "x.dataset = ?", "size": "x.size = ?", "split": "x.split = ?",
            "label": "x.label = ?", "predicted": "a.predicted = ?", "target": "a.target = ?",
            "indices": "x.idx IN (SELECT value FROM json_each(?))",
            "sample_ids": "a.sample_id IN (SELECT value FROM json_each(?))"}
_COLUMNS = {"attribution_id": "a.id", "sample_id": "a.sample_id", "model_id": "a.model_id", "setting_id": "a.setting_id",
            "method": "s.method", "dataset": "x.dataset", "size": "x.size", "split": "x.split",
            "index": "x.idx", "label": "x.label", "target": "a.target", "predicted": "a.predicted",
            "confidence": "a.confidence", "delta": "a.delta"}
_ORDER = "a.model_id, a.setting_id, x.dataset, x.size, x.split, x.idx, a.target"
_SELECT = f"""SELECT {", ".join(_COLUMNS.values())}, a.dtype, a.shape, a.map, a.raw_shape, a.raw
    FROM attributions a JOIN settings s ON s.id = a.setting_id JOIN samples x ON x.id = a.sample_id"""
_UPSERT = """INSERT INTO attributions(model_id, setting_id, sample_id, target, predicted, confidence,
        delta, dtype, shape, map, raw_shape, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT(model_id, setting_id, sample_id, target) DO UPDATE SET
        predicted = excluded.predicted, confidence = excluded.confidence, delta = excluded.delta,
        dtype = excluded.dtype, shape = excluded.shape, map = excluded.map,
        raw_shape = excluded.raw_shape, raw = excluded.raw, created_at = excluded.created_at"""
_INSERT_NEW = _UPSERT[:_UPSERT.index("DO UPDATE")] + "DO NOTHING"
_SAMPLE_METRICS = f"""SELECT {", ".join(_COLUMNS.values())}, v.value
    FROM sample_metrics v JOIN attributions a ON a.id = v.attribution_id
        JOIN settings s ON s.id = a.setting_id JOIN samples x ON x.id = a.sample_id"""
_SUMMARY_METRICS = """SELECT v.model_id, m.name, substr(m.checkpoint_sha256, 1, 12), nullif(v.setting_id, 0),
        s.method, s.params_json, v.dataset, v.size, v.split, v.name, v.value, v.n, v.detail_json, v.created_at
    FROM summary_metrics v JOIN models m ON m.id = v.model_id LEFT JOIN settings s ON s.id = v.setting_id"""
# Image files are one sample each (dataset "sha256:<hex>"): summed up as the one dataset "files".
_SUMMARY_DATASET = f"CASE WHEN x.split = '{FILE_SPLIT}' THEN 'files' ELSE x.dataset END"
_SUMMARY = f"""SELECT m.name, substr(m.checkpoint_sha256, 1, 12), s.method, s.params_json, {_SUMMARY_DATASET},
        x.size, x.split, count(*), sum(x.label >= 0 AND a.predicted != x.label), avg(abs(a.delta))
    FROM attributions a JOIN models m ON m.id = a.model_id JOIN settings s ON s.id = a.setting_id
        JOIN samples x ON x.id = a.sample_id
    GROUP BY a.model_id, a.setting_id, {_SUMMARY_DATASET}, x.size, x.split
    ORDER BY m.name, a.model_id, s.method, s.params_json, {_SUMMARY_DATASET}, x.size, x.split"""


class ExplanationDB(AuditTables):
    """Store and query attribution maps; see the module docstring for a tour."""

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0):
        """Open or create `path`, refusing foreign, damaged or newer files before writing anything."""
        self.path, self.timeout = os.fspath(path), timeout
        if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
            # Read-only first, so a file that turns out not to be ours stays byte-identical.
            try:
                with contextlib.closing(sqlite3.connect(uri(self.path, "ro"), uri=True, timeout=timeout)) as ro:
                    check_header(ro, self.path)
            except sqlite3.Error as e:
                raise db_error(self.path, e) from e
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, Python's sqlite3 never does.
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise db_error(self.path, e) from e
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._set_wal()  # readers never block the writer
            self._conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL, much faster commits
            # Check again under the write lock: another process may have created the file meanwhile.
            with self._transaction() as conn:
                for version in range(check_header(conn, self.path), SCHEMA_VERSION):
                    for statement in statements(MIGRATIONS[version]):
                        conn.execute(statement)
                # Written even when up to date: SQLite silently opens an unwritable file read-only
                # and WAL lets BEGIN IMMEDIATE pass, so this write is what fails before the first insert.
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            self._conn.close()
            raise db_error(self.path, e) from e
        except BaseException:
            self._conn.close()
            raise

    def _set_wal(self) -> None:
        """Switch to WAL. Two processes opening a new file at once can get SQLITE_BUSY from this
        pragma without SQLite's busy handler waiting, so retry it for up to the timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ExplanationDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction; any error rolls it back, so a batch is all-or-nothing."""
        try:
            # IMMEDIATE takes the write lock up front (waiting up to the timeout) instead of failing
            # half-way through a batch when another process writes too.
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise db_error(self.path, e) from e
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException as e:
            if self._conn.in_transaction:  # some errors (disk full) already rolled back
                self._conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise db_error(self.path, e) from e
            raise

    def add_model(self, checkpoint_sha256: str, name: str, config: dict) -> int:
        """Register a checkpoint by its SHA-256; the first registration's name and config are kept."""
        sha = str(checkpoint_sha256).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"checkpoint_sha256 must be 64 hex digits, got {checkpoint_sha256!r}")
        with self._transaction() as conn:
            conn.execute("INSERT INTO models(checkpoint_sha256, name, config_json) VALUES (?, ?, ?) "
                         "ON CONFLICT DO NOTHING", (sha, str(name), canonical_json(config)))
            return conn.execute("SELECT id FROM models WHERE checkpoint_sha256 = ?", (sha,)).fetchone()[0]

    def add_setting(self, method: str, params: dict) -> int:
        """Register an explanation method with its parameters; equal params give the same id."""
        if not method or not isinstance(method, str):
            raise ValueError(f"method must be a non-empty string, got {method!r}")
        key = (method, canonical_json(params))
        with self._transaction() as conn:
            conn.execute("INSERT INTO settings(method, params_json) VALUES (?, ?) "
                         "ON CONFLICT DO NOTHING", key)
            return conn.execute("SELECT id FROM settings WHERE method = ? AND params_json = ?",
                                key).fetchone()[0]

    def add_samples(self, *, dataset: str, size: int, split: str, indices, labels) -> np.ndarray:
        """Register samples of one data file; return their ids (int64) in input order."""
        indices = ints("indices", indices)
        labels = ints("labels", labels, len(indices))
        key = (str(dataset), int(size), str(split))
        with self._transaction() as conn:
            conn.executemany("INSERT INTO samples(dataset, size, split, idx, label) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT DO NOTHING",
                             [(*key, i, y) for i, y in zip(indices.tolist(), labels.tolist())])
            stored = {idx: (sid, y) for sid, idx, y in conn.execute(
                "SELECT id, idx, label FROM samples WHERE dataset = ? AND size = ? AND split = ? "
                "AND idx IN (SELECT value FROM json_each(?))", (*key, json.dumps(indices.tolist())))}
            for i, y in zip(indices.tolist(), labels.tolist()):
                if stored[i][1] != y:  # the data changed under the same dataset key
                    raise StoreError(f"{self.path}: sample {dataset}/{size}/{split} index {i} has label {y} "
                                     f"but the database stores {stored[i][1]}; the data changed under the same "
                                     "key: give it another dataset key, or use another --db")
        return np.array([stored[i][0] for i in indices.tolist()], dtype=np.int64)

    def add_files(self, *, size: int, sha256s, paths, widths, heights, labels) -> np.ndarray:
        """Register image files as samples keyed by content hash (see FILE_SPLIT); return their ids.

        A file seen before keeps its sample and gets its latest path and size recorded; a label
        (UNKNOWN_LABEL: -1) fills in an unknown one, and a different known label is a StoreError."""
        shas = [str(h).lower() for h in sha256s]
        labels = ints("labels", labels, len(shas))
        sizes = ints("widths", widths, len(shas)), ints("heights", heights, len(shas))
        if len(paths) != len(shas) or any(not re.fullmatch(r"[0-9a-f]{64}", h) for h in shas):
            raise ValueError("add_files: give one path and one 64-digit hex SHA-256 per file")
        ids = []
        with self._transaction() as conn:
            for sha, path, w, h, y in zip(shas, map(str, paths), *map(np.ndarray.tolist, sizes), labels.tolist()):
                key = (f"sha256:{sha}", int(size), FILE_SPLIT, 0)
                conn.execute("INSERT INTO samples(dataset, size, split, idx, label) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT DO NOTHING", (*key, y))
                sid, stored = conn.execute("SELECT id, label FROM samples WHERE dataset = ? AND size = ? "
                                           "AND split = ? AND idx = ?", key).fetchone()
                if stored == UNKNOWN_LABEL and y != UNKNOWN_LABEL:
                    conn.execute("UPDATE samples SET label = ? WHERE id = ?", (y, sid))
                elif y not in (UNKNOWN_LABEL, stored):
                    raise StoreError(f"{self.path}: {path} (sha256 {sha[:12]}) has label {y} but the database "
                                     f"stores {stored} for this image; rename the file so its label matches, "
                                     "or use another --db")
                conn.execute("INSERT INTO files(sample_id, sha256, path, width, height) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT DO UPDATE SET path = excluded.path, width = excluded.width, "
                             f"height = excluded.height, seen_at = {NOW}", (sid, sha, path, w, h))
                ids.append(sid)
        return np.array(ids, dtype=np.int64)

    def files(self, sample_ids) -> dict[int, dict]:
        """sample id -> {sha256, path, width, height} of registered image files."""
        rows = self._conn.execute("SELECT sample_id, sha256, path, width, height FROM files "
                                  "WHERE sample_id IN (SELECT value FROM json_each(?))",
                                  (json.dumps(ints("sample_ids", sample_ids).tolist()),))
        return {r[0]: dict(zip(("sha256", "path", "width", "height"), r[1:])) for r in rows}

    def done_targets(self, model_id: int, setting_id: int, sample_ids) -> set[tuple[int, int]]:
        """(sample_id, target) pairs already stored for this model and setting: skip them on resume."""
        rows = self._conn.execute(
            "SELECT sample_id, target FROM attributions WHERE model_id = ? AND setting_id = ? "
            "AND sample_id IN (SELECT value FROM json_each(?))",
            (int(model_id), int(setting_id), json.dumps(ints("sample_ids", sample_ids).tolist())))
        return set(rows)

    def add_attributions(self, *, model_id: int, setting_id: int, sample_ids, targets, predicted, confidence,
                         maps: np.ndarray, deltas=None, raw_maps=None, dtype: str = "float16",
                         replace: bool = True) -> int:
        """Store a batch of maps (N, ...) in one transaction; a rerun of a key replaces its row.

        deltas: IG convergence deltas (NaN or None -> NULL). raw_maps: optional low-resolution maps
        (N, ...), e.g. Grad-CAM before upsampling. replace=False keeps a row already stored under a key
        (another process may have written it meanwhile) and inserts only the new keys. Returns the
        number of rows written.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        sample_ids = ints("sample_ids", sample_ids)
        n = len(sample_ids)
        targets, predicted = ints("targets", targets, n), ints("predicted", predicted, n)
        confidence = floats("confidence", confidence, n)
        deltas = np.full(n, np.nan) if deltas is None else floats("deltas", deltas, n, allow_nan=True)
        if len(np.unique(np.stack([sample_ids, targets]), axis=1).T) != n:
            raise ValueError("add_attributions: a (sample_id, target) pair appears twice in one batch")
        shape, blobs = encode("maps", maps, n, dtype)
        raw_shape, raw_blobs = (None, [None] * n) if raw_maps is None else encode("raw_maps", raw_maps,
                                                                                   n, dtype)
        keys = (int(model_id), int(setting_id))
        rows = [(*keys, s, t, p, c, None if np.isnan(d) else d, dtype, shape, b, raw_shape, r)
                for s, t, p, c, d, b, r in zip(sample_ids.tolist(), targets.tolist(), predicted.tolist(),
                                               confidence.tolist(), deltas.tolist(), blobs, raw_blobs)]
        try:
            with self._transaction() as conn:
                written = conn.executemany(_UPSERT if replace else _INSERT_NEW, rows).rowcount
        except sqlite3.IntegrityError as e:
            raise ValueError(f"add_attributions: {e} (unknown model_id, setting_id or sample_id?); "
                             "nothing of this batch was stored") from e
        return n if replace else written

    def maps(self, *, model_id: int | None = None, method: str | None = None, setting_id: int | None = None,
             dataset: str | None = None, size: int | None = None, split: str | None = None, indices=None,
             label: int | None = None, predicted: int | None = None, target: int | None = None,
             sample_ids=None, errors_only: bool = False, limit: int | None = None) -> dict[str, np.ndarray]:
        """Selected maps stacked as float32 (N, *shape) plus one array per column; None means any."""
        filters = dict(model_id=model_id, method=method, setting_id=setting_id, dataset=dataset, size=size,
                       split=split, indices=indices, label=label, predicted=predicted, target=target,
                       sample_ids=sample_ids)
        return self._select(filters, errors_only, _ORDER, limit)

    def settings_used(self, **filters) -> list[tuple[int, str]]:
        """(setting id, method) of the settings that have maps matching maps()' filters, by id."""
        where, params = _where(filters, False)
        return [tuple(r) for r in self._conn.execute(
            "SELECT DISTINCT a.setting_id, s.method FROM attributions a JOIN settings s ON s.id = a.setting_id "
            f"JOIN samples x ON x.id = a.sample_id{where} ORDER BY a.setting_id", params)]

    def sample_metric_names(self, **filters) -> list[str]:
        """Names of the per-map metrics stored for the maps matching maps()' filters."""
        where, params = _where(filters, False)
        return [r[0] for r in self._conn.execute(
            "SELECT DISTINCT v.name FROM sample_metrics v JOIN attributions a ON a.id = v.attribution_id "
            "JOIN settings s ON s.id = a.setting_id JOIN samples x ON x.id = a.sample_id"
            f"{where} ORDER BY v.name", params)]

    def find_model(self, checkpoint_sha256: str) -> int | None:
        """The id of a registered checkpoint, or None (nothing is written)."""
        row = self._conn.execute("SELECT id FROM models WHERE checkpoint_sha256 = ?",
                                 (str(checkpoint_sha256).lower(),)).fetchone()
        return None if row is None else row[0]

    def top_errors(self, k: int = 10, **filters) -> dict[str, np.ndarray]:
        """The k most confident wrong predictions (predicted != label), most confident first."""
        return self._select(filters, True, f"a.confidence DESC, {_ORDER}", k)

    def _select(self, filters: dict, errors_only: bool, order: str, limit) -> dict[str, np.ndarray]:
        where, params = _where(filters, errors_only)
        sql = f"{_SELECT}{where} ORDER BY {order}"
        if limit is not None:
            sql, params = sql + " LIMIT ?", params + [int(limit)]
        rows = self._conn.execute(sql, params).fetchall()
        cols = list(zip(*rows)) if rows else [()] * (len(_COLUMNS) + 5)
        out = {}
        for name, values in zip(_COLUMNS, cols):
            kind = str if name in ("method", "dataset", "split") else np.int64
            kind = float if name in ("confidence", "delta") else kind  # float(NULL delta) -> NaN
            out[name] = np.array(values, dtype=kind)
        dtypes, shapes, blobs, raw_shapes, raw_blobs = cols[len(_COLUMNS):]
        if len(set(zip(shapes, raw_shapes))) > 1:
            found = sorted({f"{s} (raw {r})" for s, r in zip(shapes, raw_shapes)})
            raise ValueError(f"selected maps have different shapes {found}; "
                             "filter by method= or setting_id=")
        out["maps"] = decode(blobs, dtypes, shapes) if rows else np.zeros(0, np.float32)
        out["raw"] = decode(raw_blobs, dtypes, raw_shapes) if rows and raw_shapes[0] else None
        return out

    def export_npz(self, out_path: str | os.PathLike, **filters) -> int:
        """Write maps(**filters) to a .npz (no "raw" key when there are none) atomically; return N."""
        data = self.maps(**filters)
        if data["raw"] is None:
            del data["raw"]  # np.savez cannot store None without pickle
        out_path = os.fspath(out_path)
        tmp = f"{out_path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:  # a file object, so np.savez does not append ".npz"
                np.savez(f, **data)
            os.replace(tmp, out_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return len(data["index"])

    def summary(self) -> list[dict]:
        """One dict per (model, setting, dataset, size, split) with n_maps, n_errors, mean_abs_delta;
        the maps of image files (explain.py --images) count as one dataset, "files"."""
        rows = self._conn.execute(_SUMMARY)
        keys = ("model", "sha256", "method", "params", "dataset", "size", "split", "n_maps", "n_errors",
                "mean_abs_delta")
        # mean_abs_delta is NaN, not None, for methods without deltas, so it formats like a number.
        return [dict(zip(keys, row[:-1] + (np.nan if row[-1] is None else row[-1],))) for row in rows]

    def map_bytes(self) -> float:
        """Mean size in bytes of a stored map blob (raw maps not counted); NaN when there are none."""
        value = self._conn.execute("SELECT avg(length(map)) FROM attributions").fetchone()[0]
        return float("nan") if value is None else float(value)

    def add_sample_metrics(self, attribution_ids, name: str, values) -> int:
        """Store one metric for a batch of maps in one transaction (NaN -> NULL); a rerun replaces it."""
        if not name or not isinstance(name, str):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        ids = ints("attribution_ids", attribution_ids)
        values = floats("values", values, len(ids), allow_nan=True)
        rows = [(i, name, None if np.isnan(v) else v) for i, v in zip(ids.tolist(), values.tolist())]
        try:
            with self._transaction() as conn:
                conn.executemany("INSERT INTO sample_metrics(attribution_id, name, value) VALUES (?, ?, ?) "
                                 "ON CONFLICT DO UPDATE SET value = excluded.value", rows)
        except sqlite3.IntegrityError as e:
            raise ValueError(f"add_sample_metrics: {e} (unknown attribution_id?); nothing was stored") from e
        return len(rows)

    def add_summary_metric(self, *, model_id: int, setting_id: int | None, dataset: str, size: int, split: str,
                           name: str, value: float, n: int, detail: dict | None = None) -> None:
        """Store an aggregated metric; setting_id None for model-level ones. A rerun replaces the row.

        detail: curves, per-layer lists, per-class dicts (plain JSON; numpy values and NaN -> null).
        """
        row = (int(model_id), 0 if setting_id is None else int(setting_id), str(dataset), int(size), str(split),
               str(name), None if value is None or np.isnan(value) else float(value), int(n),
               canonical_json(plain(detail or {})))
        try:
            with self._transaction() as conn:
                conn.execute("""INSERT INTO summary_metrics(model_id, setting_id, dataset, size, split, name,
                    value, n, detail_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET
                    value = excluded.value, n = excluded.n, detail_json = excluded.detail_json,
                    created_at = excluded.created_at""", row)
        except sqlite3.IntegrityError as e:
            raise ValueError(f"add_summary_metric: {e} (unknown model_id?); nothing was stored") from e

    def sample_metrics(self, name: str, errors_only: bool = False, **filters) -> dict[str, np.ndarray]:
        """One metric of the selected maps (maps() filters): the maps' columns plus `value` (NaN: NULL)."""
        where, params = _where(filters, errors_only)
        where = f"{where} AND v.name = ?" if where else " WHERE v.name = ?"
        rows = self._conn.execute(f"{_SAMPLE_METRICS}{where} ORDER BY {_ORDER}", params + [name]).fetchall()
        cols = list(zip(*rows)) if rows else [()] * (len(_COLUMNS) + 1)
        out = {}
        for key, values in zip([*_COLUMNS, "value"], cols):
            kind = str if key in ("method", "dataset", "split") else np.int64
            kind = float if key in ("confidence", "delta", "value") else kind
            out[key] = np.array(values, dtype=kind)
        return out

    def summary_metrics(self, model_id: int | None = None) -> list[dict]:
        """Aggregated metrics, sorted; setting_id, method and params are None for model-level rows."""
        sql, params = _SUMMARY_METRICS, []
        if model_id is not None:
            sql, params = sql + " WHERE v.model_id = ?", [int(model_id)]
        rows = self._conn.execute(sql + " ORDER BY v.model_id, v.setting_id, v.dataset, v.size, v.split, v.name",
                                  params)
        keys = ("model_id", "model", "sha256", "setting_id", "method", "params", "dataset", "size", "split",
                "name", "value", "n", "detail", "created_at")
        out = []
        for row in rows:
            d = dict(zip(keys, row))
            d["value"] = np.nan if d["value"] is None else d["value"]
            d["detail"] = json.loads(d["detail"])
            out.append(d)
        return out

    def merge_from(self, path: str | os.PathLike) -> dict[str, int]:
        """Copy every model, setting, sample, map and metric of another explanations database here,
        in one transaction; merging twice adds nothing (db_merge.merge_into says how keys and
        conflicts are handled). Returns rows added per table and the conflicts."""
        return merge_into(self.path, os.fspath(path), self.timeout)


def _where(filters: dict, errors_only: bool) -> tuple[str, list]:
    """WHERE clause and parameters for maps() filters; a None value means 'any'."""
    clauses, params = ["x.label >= 0 AND a.predicted != x.label"] if errors_only else [], []  # -1: unknown
    for name, value in filters.items():
        if name not in _FILTERS:
            raise TypeError(f"unknown filter {name!r}; expected one of {sorted(_FILTERS)}")
        if value is not None:
            clauses.append(_FILTERS[name])
            if name in ("indices", "sample_ids"):
                value = json.dumps(ints(name, value).tolist())
            params.append(value.item() if isinstance(value, np.generic) else value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


