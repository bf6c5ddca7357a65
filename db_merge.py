"""Merging explanations databases (explain.py --merge-from): every model, setting, sample, map and
metric of a source file copied into another, matched by natural key, in one transaction.

    check_sources(["shard1.db", "shard2.db"], into="all.db")   # refuses a bad list before writing
    with ExplanationDB("all.db") as db:
        counts = db.merge_from("shard1.db")                      # calls merge_into below
"""
from __future__ import annotations

import contextlib
import os
import sqlite3

from db_schema import DatabaseError, check_header, db_error, uri

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



def merge_into(dest: str, source: str, timeout: float) -> dict[str, int]:
    """ExplanationDB.merge_from: every model, setting, sample, map and metric of `source` copied into
    `dest`, attached read-only to a second connection to `dest`, checked, and copied in one transaction.

    Rows are matched by natural key (checkpoint hash; method and params; dataset, size, split,
    index; model, setting, sample, target), so ids are remapped and merging twice adds nothing.
    Where both files hold a map under one key but the maps differ, dest's row is kept (with
    its metrics) and counted in map_conflicts; the source's metrics of that map, and its
    aggregates over that model/setting/data, are left out (metric_conflicts, with the metrics
    whose values differ). The source is opened read-only and checked first (DatabaseError if
    missing, foreign, damaged or newer); the copy is one transaction, so an error changes nothing.

    Returns rows added per table (models, settings, samples, maps, sample_metrics,
    summary_metrics) and maps_present, map_conflicts, metric_conflicts.
    """
    version = check_source(source, into=dest)
    # A second connection opened by URI: only then may ATTACH name a URI (mode=ro) everywhere.
    conn = sqlite3.connect(uri(dest), uri=True, timeout=timeout, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("ATTACH DATABASE ? AS src", (uri(source, "ro"),))  # not inside a transaction
        check_header(conn, source, "src", for_merge=True)  # the file checked is the file read
        conn.execute("BEGIN IMMEDIATE")
        try:
            counts = _merge(conn, source, dest, version)
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        reason = " ".join(str(e).split())
        if "locked" in reason or "busy" in reason or "readonly" in reason or "read-only" in reason:
            raise db_error(dest, e) from e
        raise DatabaseError(f"{source}: cannot be merged into {dest} ({reason}); nothing was merged; "
                            "check the file or leave it out of --merge-from") from e
    finally:
        conn.close()
    return counts


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
        with contextlib.closing(sqlite3.connect(uri(path, "ro"), uri=True)) as ro:
            version = check_header(ro, path, for_merge=True)
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
            with contextlib.closing(sqlite3.connect(uri(path, "ro"), uri=True)) as ro:
                version = check_header(ro, path, for_merge=is_source)
                rows = ro.execute("SELECT dataset, size, split, idx, label FROM samples").fetchall() if version else []
        except sqlite3.Error as e:
            raise db_error(path, e) from e
        for *key, label in rows:
            theirs, where = labels.setdefault(tuple(key), (label, path))
            if theirs != label:
                raise DatabaseError(f"{path}: sample {'/'.join(map(str, key[:3]))} index {key[3]} has label "
                                    f"{label} there but {theirs} in {where}: the files explain different data "
                                    "under one dataset name; nothing was merged")


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


