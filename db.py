"""Attribution maps (Integrated Gradients, Grad-CAM, ...) for many images in one SQLite file.

The only module that imports sqlite3. Models are keyed by checkpoint hash, settings by method and
canonical params, samples by (dataset, size, split, index); one row per (model, setting, sample,
target) holds the map as a float16/float32 blob, so thousands of maps can be queried later.

    with ExplanationDB("runs/explanations.db") as db:
        m = db.add_model(sha256, "resnet18", cfg)
        s = db.add_setting("ig", {"steps": 64, "baseline": "zeros"})
        ids = db.add_samples("pathmnist", 28, "test", indices, labels)
        db.add_attributions(m, s, ids, targets, predicted, confidence, maps, deltas=deltas)
        worst = db.top_errors(k=16, method="ig")   # worst["maps"]: (16, 3, 28, 28) float32
        rows = db.maps(model_id=m, setting_id=s)
        db.add_sample_metrics(rows["attribution_id"], "deletion_auc", aucs)   # trust metrics per map
        db.add_summary_metric(m, s, "pathmnist", 28, "test", "deletion_auc", aucs.mean(), len(aucs),
                              {"curve": mean_curve})
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2
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
]

# Little-endian on disk, so a file copied between machines decodes the same.
_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
# maps() filter -> condition on the joined row (a: attributions, s: settings, x: samples).
_FILTERS = {"model_id": "a.model_id = ?", "setting_id": "a.setting_id = ?", "method": "s.method = ?",
            "dataset": "x.dataset = ?", "size": "x.size = ?", "split": "x.split = ?",
            "label": "x.label = ?", "predicted": "a.predicted = ?", "target": "a.target = ?",
            "indices": "x.idx IN (SELECT value FROM json_each(?))"}
_COLUMNS = {"attribution_id": "a.id", "model_id": "a.model_id", "setting_id": "a.setting_id",
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
_SAMPLE_METRICS = f"""SELECT {", ".join(_COLUMNS.values())}, v.value
    FROM sample_metrics v JOIN attributions a ON a.id = v.attribution_id
        JOIN settings s ON s.id = a.setting_id JOIN samples x ON x.id = a.sample_id"""
_SUMMARY_METRICS = """SELECT v.model_id, m.name, substr(m.checkpoint_sha256, 1, 12), nullif(v.setting_id, 0),
        s.method, s.params_json, v.dataset, v.size, v.split, v.name, v.value, v.n, v.detail_json, v.created_at
    FROM summary_metrics v JOIN models m ON m.id = v.model_id LEFT JOIN settings s ON s.id = v.setting_id"""
_SUMMARY = """SELECT m.name, substr(m.checkpoint_sha256, 1, 12), s.method, s.params_json, x.dataset,
        x.size, x.split, count(*), sum(a.predicted != x.label), avg(abs(a.delta))
    FROM attributions a JOIN models m ON m.id = a.model_id JOIN settings s ON s.id = a.setting_id
        JOIN samples x ON x.id = a.sample_id
    GROUP BY a.model_id, a.setting_id, x.dataset, x.size, x.split
    ORDER BY m.name, a.model_id, s.method, s.params_json, x.dataset, x.size, x.split"""


class DatabaseError(Exception):
    """The file cannot be used (damaged, foreign, newer schema, locked, read-only); one-line message."""


class ExplanationDB:
    """Store and query attribution maps; see the module docstring for a tour."""

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0):
        """Open or create `path`, refusing foreign, damaged or newer files before writing anything."""
        self.path = os.fspath(path)
        if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
            # Read-only first, so a file that turns out not to be ours stays byte-identical.
            uri = Path(self.path).resolve().as_uri() + "?mode=ro"
            try:
                with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=timeout)) as ro:
                    self._check(ro)
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
                for version in range(self._check(conn), SCHEMA_VERSION):
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

    def _check(self, conn: sqlite3.Connection) -> int:
        """Return the file's schema version; raise DatabaseError if it is foreign or too new."""
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        n_objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app != APPLICATION_ID and (app != 0 or n_objects):  # app 0 and nothing inside: empty
            raise DatabaseError(f"{self.path}: not an explanations database (application_id {app}, "
                                f"{n_objects} schema objects); pass another --db path or move this file away")
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"{self.path}: schema version {version} is newer than this code's "
                                f"{SCHEMA_VERSION}; update the code or use another --db")
        return version

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

    def add_samples(self, dataset: str, size: int, split: str, indices, labels) -> np.ndarray:
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
                if stored[i][1] != y:  # the data file changed under the same dataset name
                    raise ValueError(f"sample {dataset}/{size}/{split} index {i} has label {y} but "
                                     f"the database stores {stored[i][1]}; the data file changed, "
                                     "use a new dataset name")
        return np.array([stored[i][0] for i in indices.tolist()], dtype=np.int64)

    def done_targets(self, model_id: int, setting_id: int, sample_ids) -> set[tuple[int, int]]:
        """(sample_id, target) pairs already stored for this model and setting: skip them on resume."""
        rows = self._conn.execute(
            "SELECT sample_id, target FROM attributions WHERE model_id = ? AND setting_id = ? "
            "AND sample_id IN (SELECT value FROM json_each(?))",
            (int(model_id), int(setting_id), json.dumps(_ints("sample_ids", sample_ids).tolist())))
        return set(rows)

    def add_attributions(self, model_id: int, setting_id: int, sample_ids, targets, predicted, confidence,
                         maps: np.ndarray, deltas=None, raw_maps=None, dtype: str = "float16") -> int:
        """Store a batch of maps (N, ...) in one transaction; a rerun of a key replaces its row.

        deltas: IG convergence deltas (NaN or None -> NULL). raw_maps: optional low-resolution maps
        (N, ...), e.g. Grad-CAM before upsampling. Returns the number of rows written.
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
                conn.executemany(_UPSERT, rows)
        except sqlite3.IntegrityError as e:
            raise ValueError(f"add_attributions: {e} (unknown model_id, setting_id or sample_id?); "
                             "nothing of this batch was stored") from e
        return n

    def maps(self, *, model_id: int | None = None, method: str | None = None, setting_id: int | None = None,
             dataset: str | None = None, size: int | None = None, split: str | None = None, indices=None,
             label: int | None = None, predicted: int | None = None, target: int | None = None,
             errors_only: bool = False, limit: int | None = None) -> dict[str, np.ndarray]:
        """Selected maps stacked as float32 (N, *shape) plus one array per column; None means any."""
        filters = dict(model_id=model_id, method=method, setting_id=setting_id, dataset=dataset, size=size,
                       split=split, indices=indices, label=label, predicted=predicted, target=target)
        return self._select(filters, errors_only, _ORDER, limit)

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

    def add_summary_metric(self, model_id: int, setting_id: int | None, dataset: str, size: int, split: str,
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
    clauses, params = ["a.predicted != x.label"] if errors_only else [], []
    for name, value in filters.items():
        if name not in _FILTERS:
            raise TypeError(f"unknown filter {name!r}; expected one of {sorted(_FILTERS)}")
        if value is not None:
            clauses.append(_FILTERS[name])
            if name == "indices":
                value = json.dumps(_ints("indices", value).tolist())
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
    if not np.isfinite(stored).all():
        hint = "" if not np.isfinite(a).all() else f" after casting to {dtype}; pass dtype='float32'"
        raise ValueError(f"{name} has non-finite values{hint}")
    return ",".join(map(str, a.shape[1:])), [m.tobytes() for m in stored]


def _decode(blobs, dtypes, shapes) -> np.ndarray:
    """Stack blobs (all of one shape, checked by the caller) into a float32 (N, *shape) array."""
    dims = [int(d) for d in shapes[0].split(",")]
    return np.stack([np.frombuffer(b, dtype=_DTYPES[d]).reshape(dims) for b, d in zip(blobs, dtypes)]
                    ).astype(np.float32)
