"""Attribution maps (Integrated Gradients, Grad-CAM, ...) for many images in one SQLite file.

The only module that imports sqlite3. Models are keyed by checkpoint hash, settings by method and
canonical params, samples by (dataset, size, split, index); one row per (model, setting, sample,
target) holds the map as a float16/float32 blob, so thousands of maps can be queried later.

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
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 3
APPLICATION_ID = 0x58504C4E  # "XPLN" in the file header: tells our files from other SQLite files

_NOW = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
# MIGRATIONS[i] takes schema version i to i + 1. Append new scripts, never edit old ones, so files
# written by older code still upgrade.
MIGRATIONS = [
    f"""
    PRAGMA application_id = {APPLICATION_ID};
    CREATE TABLE models(
        id INTEGER PRIMARY KEY, checkpoint_sha256 TEXT UNIQUE NOT NULL, name TEXT NOT NULL,
        config_json TEXT NOT NULL, created_at TEXT DEFAULT {_NOW});
    CREATE TABLE settings(
        id INTEGER PRIMARY KEY, method TEXT NOT NULL, params_json TEXT NOT NULL,
        UNIQUE(method, params_json));
    CREATE TABLE samples(
        id INTEGER PRIMARY KEY, dataset TEXT NOT NULL, size INTEGER NOT NULL, split TEXT NOT NULL,
        idx INTEGER NOT NULL, label INTEGER NOT NULL, UNIQUE(dataset, size, split, idx));
    CREATE TABLE attributions(
        id INTEGER PRIMARY KEY,
        model_id INTEGER NOT NULL REFERENCES models(id),
        setting_id INTEGER NOT NULL REFERENCES settings(id),
        sample_id INTEGER NOT NULL REFERENCES samples(id),
        target INTEGER NOT NULL, predicted INTEGER NOT NULL, confidence REAL NOT NULL, delta REAL,
        dtype TEXT NOT NULL CHECK (dtype IN ('float16', 'float32')), shape TEXT NOT NULL,
        map BLOB NOT NULL, raw_shape TEXT, raw BLOB, created_at TEXT DEFAULT {_NOW},
        UNIQUE(model_id, setting_id, sample_id, target));
    -- The UNIQUE index above already serves lookups by (model_id, setting_id).
    CREATE INDEX attributions_sample ON attributions(sample_id);
    CREATE INDEX attributions_class ON attributions(predicted, target);
    CREATE INDEX attributions_confidence ON attributions(confidence);
    """,
    # 2: trust metrics. Per map (sample_metrics) and aggregated (summary_metrics); setting_id 0 marks
    # a model-level row such as IG-vs-Grad-CAM agreement (NULL would never conflict in the key).
    # A rewritten map drops the metrics computed from it, so stored numbers describe stored maps.
    f"""
    CREATE TABLE sample_metrics(
        attribution_id INTEGER NOT NULL REFERENCES attributions(id) ON DELETE CASCADE,
        name TEXT NOT NULL, value REAL, PRIMARY KEY(attribution_id, name)) WITHOUT ROWID;
    CREATE INDEX sample_metrics_name ON sample_metrics(name);
    CREATE TABLE summary_metrics(
        model_id INTEGER NOT NULL REFERENCES models(id),
        setting_id INTEGER NOT NULL CHECK (setting_id >= 0),
        dataset TEXT NOT NULL, size INTEGER NOT NULL, split TEXT NOT NULL, name TEXT NOT NULL,
        value REAL, n INTEGER NOT NULL, detail_json TEXT NOT NULL, created_at TEXT DEFAULT {_NOW},
        PRIMARY KEY(model_id, setting_id, dataset, size, split, name));
    CREATE TRIGGER attributions_rewritten AFTER UPDATE ON attributions
    WHEN OLD.map IS NOT NEW.map OR OLD.delta IS NOT NEW.delta BEGIN
        DELETE FROM sample_metrics WHERE attribution_id = NEW.id;
        DELETE FROM summary_metrics WHERE model_id = NEW.model_id AND setting_id IN (NEW.setting_id, 0)
            AND (dataset, size, split) = (SELECT dataset, size, split FROM samples WHERE id = NEW.sample_id);
    END;
    """,
    # 3: image files (explain.py --images). A file is the sample (dataset "sha256:<hex>", split
    # "file", index 0) of its content hash, so a renamed or copied file is the same sample; this
    # table keeps where it was last read and its size there. Label -1: unknown.
    f"""
    CREATE TABLE files(
        sample_id INTEGER PRIMARY KEY REFERENCES samples(id), sha256 TEXT NOT NULL, path TEXT NOT NULL,
        width INTEGER NOT NULL, height INTEGER NOT NULL, seen_at TEXT DEFAULT {_NOW});
    CREATE INDEX files_sha256 ON files(sha256);
    """,
]
FILE_SPLIT = "file"  # samples of image files: dataset "sha256:<hex>", this split, index 0
UNKNOWN_LABEL = -1

# Little-endian on disk, so a file copied between machines decodes the same.
_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
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
_SUMMARY = """SELECT m.name, substr(m.checkpoint_sha256, 1, 12), s.method, s.params_json, x.dataset,
        x.size, x.split, count(*), sum(x.label >= 0 AND a.predicted != x.label), avg(abs(a.delta))
    FROM attributions a JOIN models m ON m.id = a.model_id JOIN settings s ON s.id = a.setting_id
        JOIN samples x ON x.id = a.sample_id
    GROUP BY a.model_id, a.setting_id, x.dataset, x.size, x.split
    ORDER BY m.name, a.model_id, s.method, s.params_json, x.dataset, x.size, x.split"""

# merge_from(): the source is attached as "src"; its rows are matched to this file's by natural key.
_MERGE_LABELS = """SELECT s.dataset, s.size, s.split, s.idx, s.label, d.label FROM src.samples s
    JOIN main.samples d ON d.dataset = s.dataset AND d.size = s.size AND d.split = s.split AND d.idx = s.idx
    WHERE d.label != s.label LIMIT 1"""
_MERGE_PARENTS = {  # WHERE true: without it SQLite would read ON CONFLICT as a join constraint
    "models": """INSERT INTO main.models(checkpoint_sha256, name, config_json, created_at)
        SELECT checkpoint_sha256, name, config_json, created_at FROM src.models WHERE true ON CONFLICT DO NOTHING""",
    "settings": """INSERT INTO main.settings(method, params_json)
        SELECT method, params_json FROM src.settings WHERE true ON CONFLICT DO NOTHING""",
    "samples": """INSERT INTO main.samples(dataset, size, split, idx, label)
        SELECT dataset, size, split, idx, label FROM src.samples WHERE true ON CONFLICT DO NOTHING"""}
_MERGE_FILES = """INSERT INTO main.files(sample_id, sha256, path, width, height, seen_at)
    SELECT dx.id, f.sha256, f.path, f.width, f.height, f.seen_at FROM src.files f JOIN src.samples sx ON sx.id = f.sample_id
    JOIN main.samples dx ON dx.dataset = sx.dataset AND dx.size = sx.size AND dx.split = sx.split AND dx.idx = sx.idx
    WHERE true ON CONFLICT DO NOTHING"""
# Per source map: this file's ids, the row already stored under its key (dest_id) and whether that
# row holds the same map (same: 1) or another one (a conflict: this file's row is kept).
_MERGE_KEYS = """CREATE TEMP TABLE merge_keys AS
    SELECT a.id AS src_id, dm.id AS model_id, ds.id AS setting_id, dx.id AS sample_id, a.target AS target,
        d.id AS dest_id, (d.map IS a.map AND d.dtype IS a.dtype AND d.shape IS a.shape AND d.raw IS a.raw
                          AND d.raw_shape IS a.raw_shape AND d.delta IS a.delta) AS same
    FROM src.attributions a
    JOIN src.models sm ON sm.id = a.model_id JOIN main.models dm ON dm.checkpoint_sha256 = sm.checkpoint_sha256
    JOIN src.settings ss ON ss.id = a.setting_id
    JOIN main.settings ds ON ds.method = ss.method AND ds.params_json = ss.params_json
    JOIN src.samples sx ON sx.id = a.sample_id
    JOIN main.samples dx ON dx.dataset = sx.dataset AND dx.size = sx.size AND dx.split = sx.split AND dx.idx = sx.idx
    LEFT JOIN main.attributions d
        ON d.model_id = dm.id AND d.setting_id = ds.id AND d.sample_id = dx.id AND d.target = a.target"""
_MERGE_MAPS = """INSERT INTO main.attributions(model_id, setting_id, sample_id, target, predicted, confidence,
        delta, dtype, shape, map, raw_shape, raw, created_at)
    SELECT k.model_id, k.setting_id, k.sample_id, k.target, a.predicted, a.confidence, a.delta, a.dtype,
        a.shape, a.map, a.raw_shape, a.raw, a.created_at
    FROM temp.merge_keys k JOIN src.attributions a ON a.id = k.src_id WHERE k.dest_id IS NULL
    ON CONFLICT DO NOTHING"""
_MERGE_NEW_IDS = """UPDATE temp.merge_keys SET same = 1, dest_id = (SELECT d.id FROM main.attributions d
    WHERE d.model_id = merge_keys.model_id AND d.setting_id = merge_keys.setting_id
        AND d.sample_id = merge_keys.sample_id AND d.target = merge_keys.target) WHERE dest_id IS NULL"""
# Metrics describe maps: a source metric follows only a map this file now holds identically.
_MERGE_SAMPLE_METRICS = """CREATE TEMP TABLE merge_sample_metrics AS
    SELECT k.dest_id AS attribution_id, v.name AS name, v.value AS value, k.same AS ok,
        EXISTS (SELECT 1 FROM main.sample_metrics d WHERE d.attribution_id = k.dest_id AND d.name = v.name
                AND d.value IS v.value) AS present
    FROM src.sample_metrics v JOIN temp.merge_keys k ON k.src_id = v.attribution_id"""
# ... and an aggregate only where no map of its (model, setting, data) kept this file's other version.
_MERGE_SUMMARY_METRICS = """CREATE TEMP TABLE merge_summary_metrics AS
    SELECT dm.id AS model_id, coalesce(ds.id, 0) AS setting_id, v.dataset, v.size, v.split, v.name, v.value,
        v.n, v.detail_json, v.created_at,
        NOT EXISTS (SELECT 1 FROM temp.merge_keys k JOIN main.samples x ON x.id = k.sample_id
                    WHERE NOT k.same AND k.model_id = dm.id AND (v.setting_id = 0 OR k.setting_id = ds.id)
                        AND x.dataset = v.dataset AND x.size = v.size AND x.split = v.split) AS ok,
        EXISTS (SELECT 1 FROM main.summary_metrics d WHERE d.model_id = dm.id
                AND d.setting_id = coalesce(ds.id, 0) AND d.dataset = v.dataset AND d.size = v.size
                AND d.split = v.split AND d.name = v.name AND d.value IS v.value AND d.n = v.n
                AND d.detail_json = v.detail_json) AS present
    FROM src.summary_metrics v
    JOIN src.models sm ON sm.id = v.model_id JOIN main.models dm ON dm.checkpoint_sha256 = sm.checkpoint_sha256
    LEFT JOIN src.settings ss ON ss.id = v.setting_id
    LEFT JOIN main.settings ds ON ds.method = ss.method AND ds.params_json = ss.params_json"""
_MERGE_METRICS = {
    "sample_metrics": """INSERT INTO main.sample_metrics(attribution_id, name, value)
        SELECT attribution_id, name, value FROM temp.merge_sample_metrics WHERE ok ON CONFLICT DO NOTHING""",
    "summary_metrics": """INSERT INTO main.summary_metrics(model_id, setting_id, dataset, size, split, name,
            value, n, detail_json, created_at)
        SELECT model_id, setting_id, dataset, size, split, name, value, n, detail_json, created_at
        FROM temp.merge_summary_metrics WHERE ok ON CONFLICT DO NOTHING"""}


class DatabaseError(Exception):
    """The file cannot be used (damaged, foreign, newer schema, locked, read-only); one-line message."""


class StoreError(DatabaseError, ValueError):
    """Values the database cannot store as given (a map beyond float16's range, a sample whose
    label changed under its key); nothing of the batch is stored, and the message names the remedy."""


class ExplanationDB:
    """Store and query attribution maps; see the module docstring for a tour."""

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0):
        """Open or create `path`, refusing foreign, damaged or newer files before writing anything."""
        self.path, self.timeout = os.fspath(path), timeout
        if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
            # Read-only first, so a file that turns out not to be ours stays byte-identical.
            try:
                with contextlib.closing(sqlite3.connect(_uri(self.path, "ro"), uri=True, timeout=timeout)) as ro:
                    _check_header(ro, self.path)
            except sqlite3.Error as e:
                raise _db_error(self.path, e) from e
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, Python's sqlite3 never does.
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise _db_error(self.path, e) from e
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
            self._conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL, much faster commits
            # Check again under the write lock: another process may have created the file meanwhile.
            with self._transaction() as conn:
                for version in range(_check_header(conn, self.path), SCHEMA_VERSION):
                    for statement in _statements(MIGRATIONS[version]):
                        conn.execute(statement)
                # Written even when up to date: SQLite silently opens an unwritable file read-only
                # and WAL lets BEGIN IMMEDIATE pass, so this write is what fails before the first insert.
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            self._conn.close()
            raise _db_error(self.path, e) from e
        except BaseException:
            self._conn.close()
            raise

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
            raise _db_error(self.path, e) from e
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException as e:
            if self._conn.in_transaction:  # some errors (disk full) already rolled back
                self._conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise _db_error(self.path, e) from e
            raise

    def add_model(self, checkpoint_sha256: str, name: str, config: dict) -> int:
        """Register a checkpoint by its SHA-256; the first registration's name and config are kept."""
        sha = str(checkpoint_sha256).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"checkpoint_sha256 must be 64 hex digits, got {checkpoint_sha256!r}")
        with self._transaction() as conn:
            conn.execute("INSERT INTO models(checkpoint_sha256, name, config_json) VALUES (?, ?, ?) "
                         "ON CONFLICT DO NOTHING", (sha, str(name), _canonical_json(config)))
            return conn.execute("SELECT id FROM models WHERE checkpoint_sha256 = ?", (sha,)).fetchone()[0]

    def add_setting(self, method: str, params: dict) -> int:
        """Register an explanation method with its parameters; equal params give the same id."""
        if not method or not isinstance(method, str):
            raise ValueError(f"method must be a non-empty string, got {method!r}")
        key = (method, _canonical_json(params))
        with self._transaction() as conn:
            conn.execute("INSERT INTO settings(method, params_json) VALUES (?, ?) "
                         "ON CONFLICT DO NOTHING", key)
            return conn.execute("SELECT id FROM settings WHERE method = ? AND params_json = ?",
                                key).fetchone()[0]

    def add_samples(self, *, dataset: str, size: int, split: str, indices, labels) -> np.ndarray:
        """Register samples of one data file; return their ids (int64) in input order."""
        indices = _ints("indices", indices)
        labels = _ints("labels", labels, len(indices))
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
        labels = _ints("labels", labels, len(shas))
        sizes = _ints("widths", widths, len(shas)), _ints("heights", heights, len(shas))
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
                             f"height = excluded.height, seen_at = {_NOW}", (sid, sha, path, w, h))
                ids.append(sid)
        return np.array(ids, dtype=np.int64)

    def files(self, sample_ids) -> dict[int, dict]:
        """sample id -> {sha256, path, width, height} of registered image files."""
        rows = self._conn.execute("SELECT sample_id, sha256, path, width, height FROM files "
                                  "WHERE sample_id IN (SELECT value FROM json_each(?))",
                                  (json.dumps(_ints("sample_ids", sample_ids).tolist()),))
        return {r[0]: dict(zip(("sha256", "path", "width", "height"), r[1:])) for r in rows}

    def done_targets(self, model_id: int, setting_id: int, sample_ids) -> set[tuple[int, int]]:
        """(sample_id, target) pairs already stored for this model and setting: skip them on resume."""
        rows = self._conn.execute(
            "SELECT sample_id, target FROM attributions WHERE model_id = ? AND setting_id = ? "
            "AND sample_id IN (SELECT value FROM json_each(?))",
            (int(model_id), int(setting_id), json.dumps(_ints("sample_ids", sample_ids).tolist())))
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
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        sample_ids = _ints("sample_ids", sample_ids)
        n = len(sample_ids)
        targets, predicted = _ints("targets", targets, n), _ints("predicted", predicted, n)
        confidence = _floats("confidence", confidence, n)
        deltas = np.full(n, np.nan) if deltas is None else _floats("deltas", deltas, n, allow_nan=True)
        if len(np.unique(np.stack([sample_ids, targets]), axis=1).T) != n:
            raise ValueError("add_attributions: a (sample_id, target) pair appears twice in one batch")
        shape, blobs = _encode("maps", maps, n, dtype)
        raw_shape, raw_blobs = (None, [None] * n) if raw_maps is None else _encode("raw_maps", raw_maps,
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
        out["maps"] = _decode(blobs, dtypes, shapes) if rows else np.zeros(0, np.float32)
        out["raw"] = _decode(raw_blobs, dtypes, raw_shapes) if rows and raw_shapes[0] else None
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
        """One dict per (model, setting, dataset, size, split) with n_maps, n_errors, mean_abs_delta."""
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
        ids = _ints("attribution_ids", attribution_ids)
        values = _floats("values", values, len(ids), allow_nan=True)
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
               _canonical_json(_plain(detail or {})))
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
        """Copy every model, setting, sample, map and metric of another explanations database here.

        Rows are matched by natural key (checkpoint hash; method and params; dataset, size, split,
        index; model, setting, sample, target), so ids are remapped and merging twice adds nothing.
        Where both files hold a map under one key but the maps differ, this file's row is kept (with
        its metrics) and counted in map_conflicts; the source's metrics of that map, and its
        aggregates over that model/setting/data, are left out (metric_conflicts, with the metrics
        whose values differ). The source is opened read-only and checked first (DatabaseError if
        missing, foreign, damaged or newer); the copy is one transaction, so an error changes nothing.

        Returns rows added per table (models, settings, samples, maps, sample_metrics,
        summary_metrics) and maps_present, map_conflicts, metric_conflicts.
        """
        source = os.fspath(path)
        version = check_source(source, into=self.path)
        # A second connection opened by URI: only then may ATTACH name a URI (mode=ro) everywhere.
        conn = sqlite3.connect(_uri(self.path), uri=True, timeout=self.timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("ATTACH DATABASE ? AS src", (_uri(source, "ro"),))  # not inside a transaction
            _check_header(conn, source, "src", for_merge=True)  # the file checked is the file read
            conn.execute("BEGIN IMMEDIATE")
            try:
                counts = _merge(conn, source, self.path, version)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            reason = " ".join(str(e).split())
            if "locked" in reason or "busy" in reason or "readonly" in reason or "read-only" in reason:
                raise _db_error(self.path, e) from e
            raise DatabaseError(f"{source}: cannot be merged into {self.path} ({reason}); nothing was merged; "
                                "check the file or leave it out of --merge-from") from e
        finally:
            conn.close()
        return counts


def _db_error(path: str, exc: sqlite3.Error) -> DatabaseError:
    """Turn an sqlite3 error on `path` into a one-line DatabaseError that says what to do."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if "locked" in reason or "busy" in reason:
        return DatabaseError(f"{path}: database is locked by another process ({reason}); "
                             "retry later or raise the timeout")
    if "readonly" in reason or "read-only" in reason or "unable to open" in reason:
        return DatabaseError(f"{path}: cannot open for writing ({reason}); check that the directory exists, "
                             "check file and directory permissions, or pass another --db")
    if "malformed" in reason or "not a database" in reason:
        return DatabaseError(f"{path}: not an explanations database ({reason}); "
                             "pass another --db path or move this file away")
    return DatabaseError(f"{path}: SQLite error ({reason}); check the file and free disk space, "
                         "or pass another --db")


def check_source(path: str | os.PathLike, into: str | os.PathLike | None = None) -> int:
    """Schema version of an explanations database to merge from, opened read-only (nothing is
    written); a one-line DatabaseError if it is missing, foreign, damaged (PRAGMA quick_check),
    newer, or the file `into` itself."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatabaseError(f"{path}: no such file to merge; check the --merge-from list")
    if into is not None and os.path.exists(into) and os.path.samefile(path, into):
        raise DatabaseError(f"{path}: is the database being merged into; leave it out of --merge-from")
    try:
        with contextlib.closing(sqlite3.connect(_uri(path, "ro"), uri=True)) as ro:
            version = _check_header(ro, path, for_merge=True)
            problems = [row[0] for row in ro.execute("PRAGMA quick_check(3)")]
    except sqlite3.Error as e:
        reason = " ".join(str(e).split())
        raise DatabaseError(f"{path}: not a readable explanations database ({reason}); nothing was merged; "
                            "leave it out of --merge-from") from e
    if problems != ["ok"]:
        raise DatabaseError(f"{path}: damaged ({'; '.join(' '.join(p.split()) for p in problems)}); "
                            "nothing was merged; leave it out of --merge-from")
    return version


def check_sources(paths, into: str | os.PathLike) -> None:
    """Everything merge_from() could refuse, for several sources at once and before `into` is written:
    each file (check_source), then one label per sample across `into` and all sources. A merge that
    passes this only fails on a lock or a disk error, so a bad file in a list changes no file."""
    for path in paths:
        check_source(path, into)
    labels = {}  # (dataset, size, split, idx) -> (label, file it came from)
    files = [(os.fspath(into), False)] if os.path.isfile(into) and os.path.getsize(into) else []
    for path, is_source in files + [(os.fspath(p), True) for p in paths]:
        try:
            with contextlib.closing(sqlite3.connect(_uri(path, "ro"), uri=True)) as ro:
                version = _check_header(ro, path, for_merge=is_source)
                rows = ro.execute("SELECT dataset, size, split, idx, label FROM samples").fetchall() if version else []
        except sqlite3.Error as e:
            raise _db_error(path, e) from e
        for *key, label in rows:
            theirs, where = labels.setdefault(tuple(key), (label, path))
            if theirs != label:
                raise DatabaseError(f"{path}: sample {'/'.join(map(str, key[:3]))} index {key[3]} has label "
                                    f"{label} there but {theirs} in {where}: the files explain different data "
                                    "under one dataset name; nothing was merged")


def _check_header(conn: sqlite3.Connection, path: str, schema: str = "main", for_merge: bool = False) -> int:
    """Return the schema version of `schema` on `conn`; DatabaseError if it is foreign or too new.
    An empty file (application_id 0, nothing inside) is version 0, to be created; not as a source."""
    app = conn.execute(f"PRAGMA {schema}.application_id").fetchone()[0]
    version = conn.execute(f"PRAGMA {schema}.user_version").fetchone()[0]
    n_objects = conn.execute(f"SELECT count(*) FROM {schema}.sqlite_master").fetchone()[0]
    away = "leave it out of --merge-from" if for_merge else "pass another --db path or move this file away"
    if app != APPLICATION_ID and (app != 0 or n_objects or for_merge):  # app 0 and nothing inside: empty
        raise DatabaseError(f"{path}: not an explanations database (application_id {app}, "
                            f"{n_objects} schema objects); {away}")
    if version > SCHEMA_VERSION:
        update = "update the code to merge it" if for_merge else "update the code or use another --db"
        raise DatabaseError(f"{path}: schema version {version} is newer than this code's {SCHEMA_VERSION}; {update}")
    return version


def _merge(conn: sqlite3.Connection, source: str, dest: str, version: int) -> dict[str, int]:
    """The body of merge_from(), inside its transaction; `src` is attached."""
    clash = conn.execute(_MERGE_LABELS).fetchone()
    if clash:
        dataset, size, split, idx, theirs, ours = clash
        raise DatabaseError(f"{source}: sample {dataset}/{size}/{split} index {idx} has label {theirs} there "
                            f"but {ours} in {dest}: the files explain different data under one dataset name; "
                            "nothing was merged")
    counts = {table: conn.execute(sql).rowcount for table, sql in _MERGE_PARENTS.items()}
    counts["files"] = conn.execute(_MERGE_FILES).rowcount if version >= 3 else 0
    conn.execute(_MERGE_KEYS)
    conn.execute("CREATE INDEX temp.merge_keys_src ON merge_keys(src_id)")
    counts["maps_present"], counts["map_conflicts"] = conn.execute(
        "SELECT count(*) FILTER (WHERE same), count(*) FILTER (WHERE dest_id IS NOT NULL AND NOT same) "
        "FROM temp.merge_keys").fetchone()
    counts["maps"] = conn.execute(_MERGE_MAPS).rowcount
    conn.execute(_MERGE_NEW_IDS)
    counts["metric_conflicts"] = 0
    for table, create in (("sample_metrics", _MERGE_SAMPLE_METRICS), ("summary_metrics", _MERGE_SUMMARY_METRICS)):
        if version < 2:  # schema 1 had no metric tables
            counts[table] = 0
            continue
        conn.execute(create)
        total, present = conn.execute(f"SELECT count(*), count(*) FILTER (WHERE ok AND present) "
                                      f"FROM temp.merge_{table}").fetchone()
        counts[table] = conn.execute(_MERGE_METRICS[table]).rowcount
        counts["metric_conflicts"] += total - present - counts[table]
    return counts


def _uri(path: str, mode: str = "rwc") -> str:
    """file: URI of a path (absolute, percent-encoded), e.g. for mode=ro opening."""
    return f"{Path(path).resolve().as_uri()}?mode={mode}"


def _statements(script: str):
    """Split an SQL script into statements; complete_statement keeps e.g. trigger bodies whole."""
    # Not executescript(): it commits the open transaction first, so a migration would not be atomic.
    statement = ""
    for part in script.split(";"):
        statement += part + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n\t;"):
                yield statement
            statement = ""


def _canonical_json(obj) -> str:
    """Sorted keys, compact separators: equal dicts give equal strings, hence equal setting ids."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _plain(obj):
    """numpy scalars/arrays and tuples -> plain JSON types, NaN and inf -> None (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _where(filters: dict, errors_only: bool) -> tuple[str, list]:
    """WHERE clause and parameters for maps() filters; a None value means 'any'."""
    clauses, params = ["x.label >= 0 AND a.predicted != x.label"] if errors_only else [], []  # -1: unknown
    for name, value in filters.items():
        if name not in _FILTERS:
            raise TypeError(f"unknown filter {name!r}; expected one of {sorted(_FILTERS)}")
        if value is not None:
            clauses.append(_FILTERS[name])
            if name in ("indices", "sample_ids"):
                value = json.dumps(_ints(name, value).tolist())
            params.append(value.item() if isinstance(value, np.generic) else value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _ints(name: str, values, n: int | None = None) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D sequence of integers, got shape {a.shape} dtype {a.dtype}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has {len(a)} entries, expected {n}")
    return a.astype(np.int64)


def _floats(name: str, values, n: int, allow_nan: bool = False) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    if np.isinf(a).any() or (not allow_nan and np.isnan(a).any()):
        raise ValueError(f"{name} has non-finite values")
    return a


def _encode(name: str, maps, n: int, dtype: str) -> tuple[str, list[bytes]]:
    """Check a stack of N maps and return the per-map shape ("3,28,28") and one blob per map."""
    a = np.asarray(maps)
    if a.ndim < 2 or len(a) != n:
        raise ValueError(f"{name} must have shape ({n}, ...), got {a.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with a remedy
        stored = np.ascontiguousarray(a, dtype=_DTYPES[dtype])
    # float16: inf and nan are the values whose exponent bits are all set (integer ops, 10x faster).
    bad = ((stored.view(np.uint16) & 0x7C00) == 0x7C00).any() if dtype == "float16" else \
        not np.isfinite(stored).all()
    if bad:
        hint = (" (float16 holds at most 65504: store float32, explain.py --store-dtype float32)"
                if dtype == "float16" else "")
        raise StoreError(f"{name} has non-finite values{hint}")
    return ",".join(map(str, a.shape[1:])), [m.tobytes() for m in stored]


def _decode(blobs, dtypes, shapes) -> np.ndarray:
    """Stack blobs (all of one shape, checked by the caller) into a float32 (N, *shape) array."""
    dims = [int(d) for d in shapes[0].split(",")]
    return np.stack([np.frombuffer(b, dtype=_DTYPES[d]).reshape(dims) for b, d in zip(blobs, dtypes)]
                    ).astype(np.float32)
