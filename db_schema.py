"""The explanations database's file format: tables, migrations, the header that marks our files,
the errors of opening one, and how arrays become rows and blobs. db.py (reads and writes) and
db_merge.py (--merge-from) build on it; these three are the only modules that import sqlite3.

Open a file with db.ExplanationDB, not from here.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 5
APPLICATION_ID = 0x58504C4E  # "XPLN" in the file header: tells our files from other SQLite files

NOW = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
# MIGRATIONS[i] takes schema version i to i + 1. Append new scripts, never edit old ones, so files
# written by older code still upgrade.
MIGRATIONS = [
    f"""
    PRAGMA application_id = {APPLICATION_ID};
    CREATE TABLE models(
        id INTEGER PRIMARY KEY, checkpoint_sha256 TEXT UNIQUE NOT NULL, name TEXT NOT NULL,
        config_json TEXT NOT NULL, created_at TEXT DEFAULT {NOW});
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
        map BLOB NOT NULL, raw_shape TEXT, raw BLOB, created_at TEXT DEFAULT {NOW},
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
        value REAL, n INTEGER NOT NULL, detail_json TEXT NOT NULL, created_at TEXT DEFAULT {NOW},
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
        width INTEGER NOT NULL, height INTEGER NOT NULL, seen_at TEXT DEFAULT {NOW});
    CREATE INDEX files_sha256 ON files(sha256);
    """,
    # 4: the shortcut audit (explain.py --audit, audit.py). One audit per (model, setting, data): its
    # strategies (per class, rank 1 the most suspicious) and each audited map's strategy with its
    # own causal test. A new audit of the same maps replaces the old; a rewritten map drops the
    # audit it took part in, so a stored audit always describes the stored maps.
    f"""
    CREATE TABLE audits(
        id INTEGER PRIMARY KEY, model_id INTEGER NOT NULL REFERENCES models(id),
        setting_id INTEGER NOT NULL REFERENCES settings(id),
        dataset TEXT NOT NULL, size INTEGER NOT NULL, split TEXT NOT NULL,
        n_maps INTEGER NOT NULL, params_json TEXT NOT NULL, created_at TEXT DEFAULT {NOW},
        UNIQUE(model_id, setting_id, dataset, size, split));
    CREATE TABLE strategies(
        id INTEGER PRIMARY KEY, audit_id INTEGER NOT NULL REFERENCES audits(id) ON DELETE CASCADE,
        class INTEGER NOT NULL, rank INTEGER NOT NULL CHECK (rank >= 1), n INTEGER NOT NULL,
        suspicion REAL NOT NULL, flip REAL NOT NULL, control_flip REAL NOT NULL, atypical REAL NOT NULL,
        area REAL NOT NULL, concentration REAL NOT NULL, prob_drop REAL NOT NULL, exemplars_json TEXT NOT NULL,
        UNIQUE(audit_id, class, rank));
    CREATE TABLE strategy_members(
        attribution_id INTEGER PRIMARY KEY REFERENCES attributions(id) ON DELETE CASCADE,
        strategy_id INTEGER NOT NULL REFERENCES strategies(id) ON DELETE CASCADE,
        flip INTEGER NOT NULL, control_flip INTEGER NOT NULL, atypical INTEGER NOT NULL,
        area REAL NOT NULL, concentration REAL NOT NULL);
    CREATE INDEX strategy_members_strategy ON strategy_members(strategy_id);
    CREATE TRIGGER attributions_rewritten_audit AFTER UPDATE ON attributions
    WHEN OLD.map IS NOT NEW.map BEGIN
        DELETE FROM audits WHERE id IN (SELECT s.audit_id FROM strategy_members m
            JOIN strategies s ON s.id = m.strategy_id WHERE m.attribution_id = NEW.id);
    END;
    """,
    # 4 -> 5: each audited map's place on the map of the data set (mosaic.layout); NULL for audits
    # stored before it existed.
    """
    ALTER TABLE strategy_members ADD COLUMN x REAL;
    ALTER TABLE strategy_members ADD COLUMN y REAL;
    """,
]
FILE_SPLIT = "file"  # samples of image files: dataset "sha256:<hex>", this split, index 0
UNKNOWN_LABEL = -1

# Little-endian on disk, so a file copied between machines decodes the same.
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


class DatabaseError(Exception):
    """The file cannot be used (damaged, foreign, newer schema, locked, read-only); one-line message."""


class StoreError(DatabaseError, ValueError):
    """Values the database cannot store as given (a map beyond float16's range, a sample whose
    label changed under its key); nothing of the batch is stored, and the message names the remedy."""


def db_error(path: str, exc: sqlite3.Error) -> DatabaseError:
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


def check_header(conn: sqlite3.Connection, path: str, schema: str = "main", for_merge: bool = False) -> int:
    """Return the schema version of `schema` on `conn`; DatabaseError if it is foreign or too new.
    An empty file (application_id 0, nothing inside) is version 0, to be created; not as a source."""
    # One read transaction, so the three reads see one moment: another process may be creating the
    # file, and its header read before its commit with its tables read after would look foreign.
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        app = conn.execute(f"PRAGMA {schema}.application_id").fetchone()[0]
        version = conn.execute(f"PRAGMA {schema}.user_version").fetchone()[0]
        n_objects = conn.execute(f"SELECT count(*) FROM {schema}.sqlite_master").fetchone()[0]
    finally:
        if own:
            conn.execute("COMMIT")
    away = "leave it out of --merge-from" if for_merge else "pass another --db path or move this file away"
    if app != APPLICATION_ID and (app != 0 or n_objects or for_merge):  # app 0 and nothing inside: empty
        raise DatabaseError(f"{path}: not an explanations database (application_id {app}, "
                            f"{n_objects} schema objects); {away}")
    if version > SCHEMA_VERSION:
        update = "update the code to merge it" if for_merge else "update the code or use another --db"
        raise DatabaseError(f"{path}: schema version {version} is newer than this code's {SCHEMA_VERSION}; {update}")
    return version


def uri(path: str, mode: str = "rwc") -> str:
    """file: URI of a path (absolute, percent-encoded), e.g. for mode=ro opening."""
    return f"{Path(path).resolve().as_uri()}?mode={mode}"


def statements(script: str):
    """Split an SQL script into statements; complete_statement keeps e.g. trigger bodies whole."""
    # Not executescript(): it commits the open transaction first, so a migration would not be atomic.
    statement = ""
    for part in script.split(";"):
        statement += part + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n\t;"):
                yield statement
            statement = ""


def canonical_json(obj) -> str:
    """Sorted keys, compact separators: equal dicts give equal strings, hence equal setting ids."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def plain(obj):
    """numpy scalars/arrays and tuples -> plain JSON types, NaN and inf -> None (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [plain(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def ints(name: str, values, n: int | None = None) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D sequence of integers, got shape {a.shape} dtype {a.dtype}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has {len(a)} entries, expected {n}")
    return a.astype(np.int64)


def floats(name: str, values, n: int, allow_nan: bool = False) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    if np.isinf(a).any() or (not allow_nan and np.isnan(a).any()):
        raise ValueError(f"{name} has non-finite values")
    return a


def encode(name: str, maps, n: int, dtype: str) -> tuple[str, list[bytes]]:
    """Check a stack of N maps and return the per-map shape ("3,28,28") and one blob per map."""
    a = np.asarray(maps)
    if a.ndim < 2 or len(a) != n:
        raise ValueError(f"{name} must have shape ({n}, ...), got {a.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with a remedy
        stored = np.ascontiguousarray(a, dtype=DTYPES[dtype])
    # float16: inf and nan are the values whose exponent bits are all set (integer ops, 10x faster).
    bad = ((stored.view(np.uint16) & 0x7C00) == 0x7C00).any() if dtype == "float16" else \
        not np.isfinite(stored).all()
    if bad:
        hint = (" (float16 holds at most 65504: store float32, explain.py --store-dtype float32)"
                if dtype == "float16" else "")
        raise StoreError(f"{name} has non-finite values{hint}")
    return ",".join(map(str, a.shape[1:])), [m.tobytes() for m in stored]


def decode(blobs, dtypes, shapes) -> np.ndarray:
    """Stack blobs (all of one shape, checked by the caller) into a float32 (N, *shape) array."""
    dims = [int(d) for d in shapes[0].split(",")]
    return np.stack([np.frombuffer(b, dtype=DTYPES[d]).reshape(dims) for b, d in zip(blobs, dtypes)]
                    ).astype(np.float32)

