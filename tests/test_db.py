"""Tests for db.py: round trips, keys that must not collide, filters against numpy, bad files."""
import contextlib
import hashlib
import multiprocessing
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from db import APPLICATION_ID, SCHEMA_VERSION, DatabaseError, ExplanationDB

REPO = Path(__file__).resolve().parents[1]


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def raw_sql(path, sql: str) -> list:
    """Run one statement on a plain sqlite3 connection, as another tool would, and close it."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(sql).fetchall()


def count(path, table: str = "attributions") -> int:
    return raw_sql(path, f"SELECT count(*) FROM {table}")[0][0]


def f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


@pytest.fixture
def db(tmp_path):
    with ExplanationDB(tmp_path / "x.db") as d:
        yield d


def test_float32_round_trip_is_bit_exact(db):
    m, s = db.add_model(sha("a"), "tiny", {"width": 8}), db.add_setting("ig", {"steps": 16})
    ids = db.add_samples(dataset="synthetic-seed0", size=8, split="test", indices=[5, 2, 7], labels=[0, 1, 2])
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
    maps[0, 0, 0, :3] = [-0.0, 1e-45, np.finfo(np.float32).max]  # signed zero, subnormal, extreme
    raw = rng.standard_normal((3, 1, 2, 2)).astype(np.float32)
    assert db.add_attributions(model_id=m, setting_id=s, sample_ids=ids, targets=[0, 1, 2], predicted=[0, 2, 2],
                               confidence=[0.9, 0.6, 0.3], maps=maps, deltas=[0.1, np.nan, -0.2], raw_maps=raw,
                               dtype="float32") == 3
    out = db.maps()
    order = [1, 0, 2]  # rows come back sorted by image index: 2, 5, 7
    assert out["maps"].dtype == np.float32
    assert np.array_equal(out["maps"].view(np.uint32), maps[order].view(np.uint32))
    assert np.array_equal(out["raw"].view(np.uint32), raw[order].view(np.uint32))
    assert out["index"].tolist() == [2, 5, 7] and out["label"].tolist() == [1, 0, 2]
    assert out["target"].tolist() == [1, 0, 2] and out["predicted"].tolist() == [2, 0, 2]
    assert out["confidence"].tolist() == [0.6, 0.9, 0.3]
    assert np.isnan(out["delta"][0]) and out["delta"][1:].tolist() == [0.1, -0.2]
    assert out["method"].tolist() == ["ig"] * 3 and out["dataset"].dtype.kind == "U"


def test_float16_is_the_default_and_compact(db):
    m, s = db.add_model(sha("a"), "tiny", {}), db.add_setting("gradcam", {"layer": "layer4"})
    ids = db.add_samples(dataset="pathmnist", size=28, split="val", indices=[0, 1], labels=[3, 4])
    rng = np.random.default_rng(1)
    maps = (rng.standard_normal((2, 1, 28, 28)) * 1e-3).astype(np.float32)  # IG-sized values
    raw = rng.random((2, 1, 7, 7))  # float64 input is cast too
    db.add_attributions(model_id=m, setting_id=s, sample_ids=ids, targets=[3, 4], predicted=[3, 4],
                        confidence=[0.5, 0.5], maps=maps, raw_maps=raw)
    out = db.maps()
    assert np.array_equal(out["maps"], f16(maps)) and np.array_equal(out["raw"], f16(raw))
    assert np.isnan(out["delta"]).all()
    rows = raw_sql(db.path, "SELECT dtype, shape, length(map), raw_shape, length(raw) FROM attributions")
    assert rows == [("float16", "1,28,28", 2 * 28 * 28, "1,7,7", 2 * 7 * 7)] * 2


def test_float16_overflow_is_refused_with_a_remedy(db):
    m, s = db.add_model(sha("a"), "tiny", {}), db.add_setting("ig", {})
    ids = db.add_samples(dataset="d", size=8, split="test", indices=[0], labels=[0])
    big = np.full((1, 2, 2), 1e5, np.float32)  # finite in float32, inf in float16
    with pytest.raises(ValueError, match="float32"):
        db.add_attributions(model_id=m, setting_id=s, sample_ids=ids, targets=[0], predicted=[0],
                            confidence=[1.0], maps=big)
    db.add_attributions(model_id=m, setting_id=s, sample_ids=ids, targets=[0], predicted=[0], confidence=[1.0],
                        maps=big, dtype="float32")
    assert db.maps()["maps"].tolist() == big.tolist()


def test_writes_take_keywords_only_so_fields_cannot_be_swapped(db):
    m, s = db.add_model(sha("a"), "tiny", {}), db.add_setting("ig", {})
    with pytest.raises(TypeError):
        db.add_samples("d", 8, "test", [0], [0])
    ids = db.add_samples(dataset="d", size=8, split="test", indices=[0], labels=[0])
    with pytest.raises(TypeError):  # targets and predicted would be indistinguishable by position
        db.add_attributions(m, s, ids, [0], [1], [0.5], np.zeros((1, 2, 2)))
    with pytest.raises(TypeError):
        db.add_summary_metric(m, s, "d", 8, "test", "x", 0.0, 1)
    assert count(db.path) == 0


def test_models_methods_and_params_do_not_collide(db):
    models = [db.add_model(sha("a"), "a", {"lr": 0.1}), db.add_model(sha("b"), "b", {"lr": 0.1})]
    settings = [db.add_setting("ig", {"steps": 32, "baseline": "zeros"}),
                db.add_setting("ig", {"steps": 64, "baseline": "zeros"}), db.add_setting("gradcam", {})]
    assert len(set(models)) == 2 and len(set(settings)) == 3
    # Idempotent: the same checkpoint hash, the same params in another key order.
    assert db.add_model(sha("a").upper(), "renamed", {}) == models[0]
    assert db.add_setting("ig", {"baseline": "zeros", "steps": 32}) == settings[0]
    (sid,) = db.add_samples(dataset="pathmnist", size=28, split="test", indices=[11], labels=[5])
    for i, m in enumerate(models):
        for j, s in enumerate(settings):
            db.add_attributions(model_id=m, setting_id=s, sample_ids=[sid], targets=[5], predicted=[5],
                                confidence=[0.5], maps=np.full((1, 2, 2), 10 * i + j))
    assert count(db.path) == 6
    for i, m in enumerate(models):
        for j, s in enumerate(settings):
            out = db.maps(model_id=m, setting_id=s)
            assert out["maps"].shape == (1, 2, 2) and (out["maps"] == 10 * i + j).all()
    assert len(db.maps(method="ig")["index"]) == 4


def test_rerun_replaces_rows_and_keeps_ids(db):
    m, s = db.add_model(sha("a"), "tiny", {}), db.add_setting("ig", {})
    ids = db.add_samples(dataset="d", size=8, split="test", indices=range(4), labels=[0, 1, 0, 1])
    db.add_attributions(model_id=m, setting_id=s, sample_ids=ids, targets=[0, 1, 0, 1], predicted=[0] * 4,
                        confidence=[0.1] * 4, maps=np.zeros((4, 2, 2)), deltas=[1.0] * 4)
    before = db.maps()["attribution_id"]
    db.add_attributions(model_id=m, setting_id=s, sample_ids=ids[:2], targets=[0, 1], predicted=[1, 1],
                        confidence=[0.7, 0.8], maps=np.ones((2, 2, 2)))
    out = db.maps()
    assert count(db.path) == 4 and np.array_equal(out["attribution_id"], before)
    assert (out["maps"][:2] == 1).all() and (out["maps"][2:] == 0).all()
    assert out["predicted"].tolist() == [1, 1, 0, 0] and out["confidence"].tolist() == [0.7, 0.8, 0.1, 0.1]
    assert np.isnan(out["delta"][:2]).all() and out["delta"][2:].tolist() == [1.0, 1.0]


def test_done_targets_returns_exactly_what_is_stored(db):
    m, s, other = db.add_model(sha("a"), "tiny", {}), db.add_setting("ig", {}), db.add_setting("gradcam", {})
    a, b, c = db.add_samples(dataset="d", size=8, split="test", indices=[0, 1, 2], labels=[0, 0, 0]).tolist()
    db.add_attributions(model_id=m, setting_id=s, sample_ids=[a, a, b], targets=[1, 3, 2], predicted=[0, 0, 0],
                        confidence=[0.5] * 3, maps=np.zeros((3, 2, 2)))
    db.add_attributions(model_id=m, setting_id=other, sample_ids=[c], targets=[0], predicted=[0],
                        confidence=[0.5], maps=np.zeros((1, 2, 2)))
    assert db.done_targets(m, s, [a, b, c]) == {(a, 1), (a, 3), (b, 2)}
    assert db.done_targets(m, s, np.array([b])) == {(b, 2)}
    assert db.done_targets(m, other, [a, b, c]) == {(c, 0)}
    assert db.done_targets(m, s, []) == set()


def test_add_samples_ids_follow_input_order_and_labels_are_checked(db):
    ids = db.add_samples(dataset="pathmnist", size=28, split="test", indices=[7, 3, 9], labels=[1, 2, 3])
    assert ids.dtype == np.int64 and len(set(ids.tolist())) == 3
    assert db.add_samples(dataset="pathmnist", size=28, split="test", indices=[9, 7], labels=[3, 1]).tolist() == [ids[2], ids[0]]
    assert not set(db.add_samples(dataset="pathmnist", size=28, split="val", indices=[7], labels=[1]).tolist()) & set(ids.tolist())
    with pytest.raises(ValueError, match=r"pathmnist/28/test index 3 has label 5"):
        db.add_samples(dataset="pathmnist", size=28, split="test", indices=[100, 3], labels=[0, 5])
    assert count(db.path, "samples") == 4  # index 100 of the failed batch was not kept
    with pytest.raises(ValueError, match="integers"):
        db.add_samples(dataset="pathmnist", size=28, split="test", indices=[1.5], labels=[0])


@pytest.fixture
def populated(db):
    """40 images with an IG map each and Grad-CAM maps for two targets each, plus numpy references."""
    rng = np.random.default_rng(2)
    n = 40
    ref = {"index": rng.permutation(np.arange(0, 2 * n, 2)), "label": rng.integers(0, 4, n),
           "predicted": rng.integers(0, 4, n), "confidence": rng.random(n), "delta": rng.standard_normal(n),
           "ig": rng.standard_normal((n, 3, 6, 6)).astype(np.float32),
           "cam": rng.random((n, 2, 1, 6, 6)), "raw": rng.random((n, 2, 1, 2, 2))}
    m = db.add_model(sha("a"), "tiny", {})
    ig, cam = db.add_setting("ig", {"steps": 8}), db.add_setting("gradcam", {})
    ids = db.add_samples(dataset="synthetic-seed0", size=8, split="test", indices=ref["index"],
                         labels=ref["label"])
    db.add_attributions(model_id=m, setting_id=ig, sample_ids=ids, targets=ref["predicted"],
                        predicted=ref["predicted"], confidence=ref["confidence"], maps=ref["ig"],
                        deltas=ref["delta"])
    for t in range(2):  # Grad-CAM for target (predicted + t) % 4
        db.add_attributions(model_id=m, setting_id=cam, sample_ids=ids, targets=(ref["predicted"] + t) % 4,
                            predicted=ref["predicted"], confidence=ref["confidence"], maps=ref["cam"][:, t],
                            raw_maps=ref["raw"][:, t])
    return db, ref


@pytest.mark.parametrize("filters", [{"label": 2}, {"errors_only": True}, {"predicted": 1},
                                     {"indices": [3, 50, 78, 99]}, {"label": 0, "errors_only": True}])
def test_filters_match_numpy(populated, filters):
    db, ref = populated
    mask = np.ones(len(ref["index"]), bool)
    if "label" in filters:
        mask &= ref["label"] == filters["label"]
    if "predicted" in filters:
        mask &= ref["predicted"] == filters["predicted"]
    if "indices" in filters:
        mask &= np.isin(ref["index"], filters["indices"])
    if filters.get("errors_only"):
        mask &= ref["predicted"] != ref["label"]
    images = np.flatnonzero(mask)[np.argsort(ref["index"][mask])]
    assert len(images) > 0
    out = db.maps(method="ig", **filters)
    assert out["index"].tolist() == ref["index"][images].tolist()
    assert np.array_equal(out["maps"], f16(ref["ig"][images])) and out["raw"] is None
    assert out["delta"].tolist() == ref["delta"][images].tolist()
    # Grad-CAM rows: (image, t) with target (predicted + t) % 4, sorted by index then target.
    rows = [(i, t, (ref["predicted"][i] + t) % 4) for i in images for t in range(2)]
    rows.sort(key=lambda r: (ref["index"][r[0]], r[2]))
    cam = db.maps(method="gradcam", **filters)
    assert cam["target"].tolist() == [target for _, _, target in rows]
    assert np.array_equal(cam["maps"], f16(np.stack([ref["cam"][i, t] for i, t, _ in rows])))
    assert np.array_equal(cam["raw"], f16(np.stack([ref["raw"][i, t] for i, t, _ in rows])))
    cam2 = db.maps(method="gradcam", target=2, **filters)
    assert cam2["index"].tolist() == [ref["index"][i] for i, _, target in rows if target == 2]


def test_maps_refuses_mixed_shapes_and_handles_empty_and_limit(populated):
    db, _ = populated
    with pytest.raises(ValueError, match="different shapes.*method="):
        db.maps()
    empty = db.maps(method="occlusion")
    assert empty["maps"].shape == (0,) and empty["raw"] is None and empty["index"].shape == (0,)
    full, first = db.maps(method="gradcam"), db.maps(method="gradcam", limit=5)
    assert np.array_equal(first["attribution_id"], full["attribution_id"][:5])
    assert np.array_equal(first["maps"], full["maps"][:5])
    with pytest.raises(TypeError, match="unknown filter"):
        db.top_errors(methd="ig")


def test_top_errors_are_the_most_confident_wrong_predictions(populated):
    db, ref = populated
    wrong = np.flatnonzero(ref["predicted"] != ref["label"])
    expected = wrong[np.argsort(-ref["confidence"][wrong])][:5]
    out = db.top_errors(k=5, method="ig")
    assert out["index"].tolist() == ref["index"][expected].tolist()
    assert out["confidence"].tolist() == ref["confidence"][expected].tolist()
    assert (out["predicted"] != out["label"]).all()
    assert np.array_equal(out["maps"], f16(ref["ig"][expected]))


def test_export_npz_round_trip(populated, tmp_path):
    db, _ = populated
    for method in ("ig", "gradcam"):
        path = tmp_path / f"{method}.npz"
        n = db.export_npz(path, method=method, errors_only=True)
        expected = db.maps(method=method, errors_only=True)
        with np.load(path, allow_pickle=False) as z:
            assert set(z.files) == set(expected) - ({"raw"} if expected["raw"] is None else set())
            for key in z.files:
                np.testing.assert_array_equal(z[key], expected[key])
            assert z["method"].dtype.kind == "U" and len(z["index"]) == n > 0
    # The temporary files were renamed away, none left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if "npz" in p.name) == ["gradcam.npz", "ig.npz"]


def test_summary_counts_match_numpy(populated):
    db, ref = populated
    rows = {r["method"]: r for r in db.summary()}
    n_errors = int((ref["predicted"] != ref["label"]).sum())
    assert rows["ig"]["n_maps"] == 40 and rows["ig"]["n_errors"] == n_errors
    assert rows["ig"]["mean_abs_delta"] == pytest.approx(np.abs(ref["delta"]).mean())
    assert rows["gradcam"]["n_maps"] == 80 and rows["gradcam"]["n_errors"] == 2 * n_errors
    assert np.isnan(rows["gradcam"]["mean_abs_delta"])
    assert rows["ig"]["sha256"] == sha("a")[:12] and rows["ig"]["params"] == '{"steps":8}'


BAD_BATCHES = {  # case -> what to change in a valid batch, given its three sample ids
    "short targets": lambda ids: dict(targets=[0, 1]),
    "maps of another length": lambda ids: dict(maps=np.zeros((2, 2, 2))),
    "NaN in the last map": lambda ids: dict(maps=np.concatenate([np.ones((2, 2, 2)),
                                                                 np.full((1, 2, 2), np.nan)])),
    "inf in a raw map": lambda ids: dict(raw_maps=np.full((3, 1, 1), np.inf)),
    "NaN confidence": lambda ids: dict(confidence=[0.5, np.nan, 0.5]),
    "short deltas": lambda ids: dict(deltas=[0.1]),
    "float64 storage": lambda ids: dict(dtype="float64"),
    "duplicate key": lambda ids: dict(sample_ids=[ids[0], ids[1], ids[0]]),
    "unknown last sample id (fails inside the transaction)":
        lambda ids: dict(sample_ids=[ids[0], ids[1], ids.max() + 1]),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_bad_batch_raises_and_stores_nothing(db, case):
    m, s = db.add_model(sha("a"), "tiny", {}), db.add_setting("ig", {})
    ids = db.add_samples(dataset="d", size=8, split="test", indices=[0, 1, 2], labels=[0, 0, 0])
    db.add_attributions(model_id=m, setting_id=s, sample_ids=ids[:2], targets=[0, 0], predicted=[0, 0],
                        confidence=[0.9, 0.9], maps=np.zeros((2, 2, 2)))
    before = db.maps()
    # The batch overwrites the two stored rows and adds a third: none of it may land.
    batch = dict(sample_ids=ids, targets=[0, 0, 0], predicted=[1, 1, 1], confidence=[0.5] * 3,
                 maps=np.ones((3, 2, 2)), raw_maps=None, dtype="float16")
    batch.update(BAD_BATCHES[case](ids))
    with pytest.raises(ValueError):
        db.add_attributions(model_id=m, setting_id=s, **batch)
    after = db.maps()
    assert count(db.path) == 2 and after["raw"] is None
    for key in set(before) - {"raw"}:
        np.testing.assert_array_equal(after[key], before[key])


def make_bad_file(path: Path, kind: str, tmp_path: Path) -> None:
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(8192))
    elif kind.startswith("truncated"):
        real = tmp_path / "real.db"
        with ExplanationDB(real) as d:
            ids = d.add_samples(dataset="d", size=8, split="test", indices=range(50), labels=[0] * 50)
            d.add_attributions(model_id=d.add_model(sha("a"), "a", {}), setting_id=d.add_setting("ig", {}),
                               sample_ids=ids, targets=[0] * 50, predicted=[0] * 50, confidence=[0.5] * 50,
                               maps=np.ones((50, 3, 8, 8)))
        size = 1000 if kind == "truncated to 1000 bytes" else 2 * 4096
        assert real.stat().st_size > size
        path.write_bytes(real.read_bytes()[:size])
    elif kind == "foreign tables":
        raw_sql(path, "CREATE TABLE notes(x)")
    elif kind == "foreign application_id":
        raw_sql(path, "PRAGMA application_id = 42")
    elif kind == "newer schema":
        ExplanationDB(path).close()
        raw_sql(path, f"PRAGMA user_version = {SCHEMA_VERSION + 2}")


@pytest.mark.parametrize("kind", ["random bytes", "truncated to 1000 bytes", "truncated to two pages",
                                  "foreign tables", "foreign application_id", "newer schema"])
def test_foreign_damaged_or_newer_files_are_refused_untouched(tmp_path, kind):
    path = tmp_path / "victim.db"
    make_bad_file(path, kind, tmp_path)
    digest = file_hash(path)
    with pytest.raises(DatabaseError) as err:
        ExplanationDB(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and "--db" in message
    expected = f"schema version {SCHEMA_VERSION + 2} is newer" if kind == "newer schema" else "not an explanations"
    assert expected in message
    assert file_hash(path) == digest


def test_empty_file_is_initialised_and_reopened(tmp_path):
    path = tmp_path / "x.db"
    path.touch()
    with ExplanationDB(path) as d:
        d.add_setting("ig", {})
    with ExplanationDB(path) as d:  # reopening neither migrates again nor loses data
        assert d.add_setting("ig", {}) == 1
    assert raw_sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert raw_sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw_sql(path, "PRAGMA journal_mode") == [("wal",)]


def test_locked_database_raises_after_the_timeout(tmp_path):
    path = tmp_path / "x.db"
    with ExplanationDB(path, timeout=0.2) as early:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # as another process in the middle of a write
        digest = file_hash(path)
        start = time.monotonic()
        with pytest.raises(DatabaseError, match="locked by another process.*raise the timeout"):
            ExplanationDB(path, timeout=0.2)
        with pytest.raises(DatabaseError, match="locked by another process"):
            early.add_samples(dataset="d", size=8, split="test", indices=[0], labels=[0])
        assert time.monotonic() - start < 5 and file_hash(path) == digest
        holder.execute("ROLLBACK")
        holder.close()
        assert early.add_samples(dataset="d", size=8, split="test", indices=[0], labels=[0]).tolist() == [1]


CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
import db
if os.geteuid() == 0:
    try:
        os.setuid(65534)  # drop root for real: from here on file permissions apply
    except OSError:
        print("cannot drop root")
        sys.exit(0)
for path in sys.argv[2:]:
    try:
        db.ExplanationDB(path).close()
        print("opened")
    except db.DatabaseError as e:
        print(e)
"""


def test_read_only_file_or_directory():
    # Root ignores chmod, so the opening runs in a child that gives up root first. pytest's
    # tmp_path is private to root; the child needs a directory it can reach.
    base = Path(tempfile.mkdtemp())
    ro_dir, rw_dir = base / "ro", base / "rw"
    try:
        base.chmod(0o755)
        for d in (ro_dir, rw_dir):
            d.mkdir()
            with ExplanationDB(d / "x.db") as x:
                x.add_setting("ig", {})
            (d / "x.db").chmod(0o444)
        ro_dir.chmod(0o555)
        rw_dir.chmod(0o777)
        paths = [ro_dir / "x.db", ro_dir / "new.db", rw_dir / "x.db"]
        digests = [file_hash(paths[0]), file_hash(paths[2])]
        run = subprocess.run([sys.executable, "-c", CHILD, str(REPO), *map(str, paths)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        if run.stdout.startswith("cannot drop root"):
            pytest.skip("running as root without CAP_SETUID: no honest way to make a file unwritable")
        lines = run.stdout.splitlines()
        assert len(lines) == 3
        for line, path in zip(lines, paths):
            assert line.startswith(f"{path}: ") and "permissions" in line, line
        assert [file_hash(paths[0]), file_hash(paths[2])] == digests
        assert not paths[1].exists()
    finally:
        for d in (ro_dir, rw_dir):
            if d.exists():
                d.chmod(0o755)
        shutil.rmtree(base)


def write_range(path: str, lo: int, hi: int) -> None:
    """Worker for the two-process test; maps depend only on index and target, so either writer is right."""
    with ExplanationDB(path) as d:
        m, s = d.add_model(sha("a"), "tiny", {}), d.add_setting("ig", {"steps": 4})
        for start in range(lo, hi, 5):
            idx = np.arange(start, min(start + 5, hi))
            ids = d.add_samples(dataset="synthetic-seed0", size=8, split="test", indices=idx, labels=idx % 9)
            for target in (0, 1):
                maps = np.broadcast_to((idx + target / 10)[:, None, None], (len(idx), 4, 4))
                d.add_attributions(model_id=m, setting_id=s, sample_ids=ids, targets=np.full(len(idx), target),
                                   predicted=idx % 9, confidence=idx / 1000, maps=maps, dtype="float32")


def test_two_processes_write_overlapping_batches(tmp_path):
    path = str(tmp_path / "shared.db")  # neither process finds a file: creating it races too
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=write_range, args=(path, 0, 120)),
             ctx.Process(target=write_range, args=(path, 60, 180))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    with ExplanationDB(path) as d:
        out = d.maps()
    assert count(path) == 180 * 2 and count(path, "samples") == 180
    keys = sorted(zip(out["index"].tolist(), out["target"].tolist()))
    assert keys == [(i, t) for i in range(180) for t in (0, 1)]
    assert np.array_equal(out["maps"][:, 0, 0], (out["index"] + out["target"] / 10).astype(np.float32))


# ----------------------------------------------------------------------------- trust metrics (schema 2)

# The schema of the first release, frozen here as it shipped (not read from db.MIGRATIONS, so that a
# change to the migration scripts cannot change what an old file looks like to this test).
SCHEMA_V1 = """
PRAGMA application_id = 1481657422;
CREATE TABLE models(
    id INTEGER PRIMARY KEY, checkpoint_sha256 TEXT UNIQUE NOT NULL, name TEXT NOT NULL,
    config_json TEXT NOT NULL, created_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE TABLE settings(
    id INTEGER PRIMARY KEY, method TEXT NOT NULL, params_json TEXT NOT NULL, UNIQUE(method, params_json));
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
    map BLOB NOT NULL, raw_shape TEXT, raw BLOB, created_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE(model_id, setting_id, sample_id, target));
CREATE INDEX attributions_sample ON attributions(sample_id);
CREATE INDEX attributions_class ON attributions(predicted, target);
CREATE INDEX attributions_confidence ON attributions(confidence);
PRAGMA user_version = 1;
"""


def test_version_1_file_upgrades_in_place(tmp_path):
    """A file written by the schema-1 code opens with this code: rows kept, metric tables added."""
    path = tmp_path / "v1.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(SCHEMA_V1)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO models(checkpoint_sha256, name, config_json) VALUES (?, 'tiny', '{}')", (sha("a"),))
        conn.execute("INSERT INTO settings(method, params_json) VALUES ('ig', '{}')")
        conn.execute("INSERT INTO samples(dataset, size, split, idx, label) VALUES ('d', 2, 'test', 7, 1)")
        blob = np.arange(4, dtype="<f2").tobytes()
        conn.execute("INSERT INTO attributions(model_id, setting_id, sample_id, target, predicted, confidence, "
                     "delta, dtype, shape, map) VALUES (1, 1, 1, 1, 1, 0.5, 0.25, 'float16', '2,2', ?)", (blob,))
        conn.execute("COMMIT")
    tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    assert [t for (t,) in raw_sql(path, tables)] == ["attributions", "models", "samples", "settings"]
    with ExplanationDB(path) as d:
        rows = d.maps()
        assert rows["index"].tolist() == [7] and rows["delta"].tolist() == [0.25]
        np.testing.assert_array_equal(rows["maps"], np.arange(4, dtype=np.float32).reshape(1, 2, 2))
        d.add_sample_metrics(rows["attribution_id"], "deletion_auc", [0.3])
        assert d.sample_metrics("deletion_auc")["value"].tolist() == [0.3]
    assert raw_sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 5
    members = [name for (_, name, *_) in raw_sql(path, "PRAGMA table_info(strategy_members)")]
    assert members[-2:] == ["x", "y"]  # migration 5: the map of the data set
    assert {"sample_metrics", "summary_metrics", "files", "audits", "strategies", "strategy_members"} <= {
        t for (t,) in raw_sql(path, tables)}
    assert raw_sql(path, "SELECT map FROM attributions") == [(blob,)]  # the map is untouched


def test_sample_and_summary_metrics_round_trip(populated):
    db, ref = populated
    ig = db.maps(method="ig")
    values = np.linspace(0, 1, len(ig["index"]))
    values[3] = np.nan  # undefined, e.g. relevance mass of an all-zero map
    assert db.add_sample_metrics(ig["attribution_id"], "relevance_mass", values) == 40
    out = db.sample_metrics("relevance_mass", method="ig")
    np.testing.assert_array_equal(out["attribution_id"], ig["attribution_id"])
    np.testing.assert_array_equal(out["value"], values)  # NaN stays NaN
    assert out["index"].tolist() == ig["index"].tolist() and out["method"].tolist() == ["ig"] * 40
    some = db.sample_metrics("relevance_mass", label=2, errors_only=True)
    assert some["index"].tolist() == ig["index"][(ig["label"] == 2) & (ig["predicted"] != ig["label"])].tolist()
    assert db.sample_metrics("relevance_mass", method="gradcam")["value"].shape == (0,)
    db.add_sample_metrics(ig["attribution_id"][:2], "relevance_mass", [5.0, 6.0])  # replaces, no new rows
    assert count(db.path, "sample_metrics") == 40
    assert db.sample_metrics("relevance_mass")["value"][:2].tolist() == [5.0, 6.0]
    with pytest.raises(ValueError, match="unknown attribution_id"):
        db.add_sample_metrics([ig["attribution_id"][0], 10_000], "x", [1.0, 2.0])
    assert count(db.path, "sample_metrics") == 40  # all-or-nothing

    m, s = int(ig["model_id"][0]), int(ig["setting_id"][0])
    curve = np.array([0.9, 0.5, np.nan])
    db.add_summary_metric(model_id=m, setting_id=s, dataset="synthetic-seed0", size=8, split="test",
                          name="deletion_auc", value=np.float32(0.25), n=16,
                          detail={"curve": curve, "per_class": {"disk": np.float64(0.5)}, "layers": ("fc", "conv1")})
    db.add_summary_metric(model_id=m, setting_id=None, dataset="synthetic-seed0", size=8, split="test",
                          name="agreement", value=0.1, n=40, detail={})
    db.add_summary_metric(model_id=m, setting_id=None, dataset="synthetic-seed0", size=8, split="test",
                          name="agreement", value=0.2, n=41, detail={})  # replaces
    rows = db.summary_metrics()
    assert [(r["method"], r["setting_id"], r["name"], r["value"], r["n"]) for r in rows] == [
        (None, None, "agreement", 0.2, 41), ("ig", s, "deletion_auc", 0.25, 16)]
    assert rows[1]["detail"] == {"curve": [0.9, 0.5, None], "per_class": {"disk": 0.5}, "layers": ["fc", "conv1"]}
    assert rows[1]["sha256"] == sha("a")[:12] and rows[1]["params"] == '{"steps":8}'
    assert db.summary_metrics(model_id=m + 1) == []
    with pytest.raises(ValueError, match="unknown model_id"):
        db.add_summary_metric(model_id=m + 1, setting_id=s, dataset="d", size=8, split="test", name="x",
                              value=0.0, n=1)


def test_rewritten_map_drops_the_metrics_computed_from_it(populated):
    """Stored numbers must describe stored maps: a new map for a key invalidates its metrics."""
    db, ref = populated
    ig = db.maps(method="ig")
    m, s = int(ig["model_id"][0]), int(ig["setting_id"][0])
    db.add_sample_metrics(ig["attribution_id"], "deletion_auc", np.zeros(40))
    db.add_summary_metric(model_id=m, setting_id=s, dataset="synthetic-seed0", size=8, split="test",
                          name="deletion_auc", value=0.0, n=40)
    db.add_summary_metric(model_id=m, setting_id=None, dataset="synthetic-seed0", size=8, split="test",
                          name="agreement", value=0.0, n=40)
    db.add_summary_metric(model_id=m, setting_id=s, dataset="other", size=8, split="test", name="deletion_auc",
                          value=0.0, n=40)
    first = slice(0, 1)
    sid = db.add_samples(dataset="synthetic-seed0", size=8, split="test", indices=ig["index"][first],
                         labels=ig["label"][first])
    # The same map again: nothing changes, the metrics stay.
    db.add_attributions(model_id=m, setting_id=s, sample_ids=sid, targets=ig["target"][first],
                        predicted=ig["predicted"][first], confidence=ig["confidence"][first],
                        maps=ig["maps"][first], deltas=ig["delta"][first])
    assert count(db.path, "sample_metrics") == 40 and count(db.path, "summary_metrics") == 3
    # A different map: its per-map metric and the summaries of its data set go, the rest stays.
    db.add_attributions(model_id=m, setting_id=s, sample_ids=sid, targets=ig["target"][first],
                        predicted=ig["predicted"][first], confidence=ig["confidence"][first],
                        maps=ig["maps"][first] + 1, deltas=ig["delta"][first])
    left = db.sample_metrics("deletion_auc")
    assert len(left["value"]) == 39 and ig["attribution_id"][0] not in left["attribution_id"]
    assert [(r["dataset"], r["name"]) for r in db.summary_metrics()] == [("other", "deletion_auc")]


def test_switching_to_wal_retries_while_another_process_opens_the_new_file(tmp_path, monkeypatch):
    """Two processes creating one database at once: SQLite can answer PRAGMA journal_mode = WAL
    with 'database is locked' at once, without its busy handler waiting (seen about once in 150
    simultaneous opens). The open retries the pragma within the timeout instead of failing."""
    import db as DB
    real_connect = sqlite3.connect
    refusals = []

    class Busy:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            if "journal_mode" in sql and len(refusals) < 3:
                refusals.append(sql)
                raise sqlite3.OperationalError("database is locked")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    monkeypatch.setattr(DB.sqlite3, "connect", lambda *a, **k: Busy(real_connect(*a, **k)))
    with DB.ExplanationDB(tmp_path / "new.db") as store:
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(refusals) == 3
    refusals.clear()
    with pytest.raises(DB.DatabaseError, match="locked by another process"):  # past the timeout: the one-line error
        DB.ExplanationDB(tmp_path / "other.db", timeout=0.0)


def audit_rows(ids: np.ndarray, classes: np.ndarray, seed: int = 0):
    """An audit of maps `ids`: two strategies per class, members split by position; numpy references."""
    rng = np.random.default_rng(seed)
    strategies, where = [], np.zeros(len(ids), np.int64)
    for c in np.unique(classes):
        mine = np.flatnonzero(classes == c)
        for rank, part in enumerate(np.array_split(mine, 2), 1):
            where[part] = len(strategies)
            strategies.append({"class": int(c), "rank": rank, "n": len(part), "suspicion": float(rng.random()),
                               "flip": 0.5, "control_flip": 0.1, "atypical": 0.25, "area": 0.03,
                               "concentration": 0.6, "prob_drop": 0.4, "exemplars": ids[part][:3]})
    members = {"attribution_id": ids, "strategy": where, "flip": rng.integers(0, 2, len(ids)),
               "control_flip": np.zeros(len(ids)), "atypical": rng.integers(0, 2, len(ids)),
               "area": rng.random(len(ids)), "concentration": rng.random(len(ids)), "x": rng.random(len(ids)),
               "y": rng.random(len(ids))}
    return strategies, members


def test_an_audit_round_trips_and_a_new_one_replaces_it(populated):
    db, ref = populated
    ig = db.maps(method="ig")
    key = dict(model_id=int(ig["model_id"][0]), setting_id=int(ig["setting_id"][0]), dataset="synthetic-seed0",
               size=8, split="test")
    assert db.audit(**key) is None
    strategies, members = audit_rows(ig["attribution_id"], ig["predicted"])
    db.add_audit(**key, params={"features": "evidence"}, strategies=strategies, members=members)
    got = db.audit(**key)
    assert got["n_maps"] == 40 and got["params"] == {"features": "evidence"}
    want = sorted(strategies, key=lambda s: (s["class"], s["rank"]))
    for g, w in zip(got["strategies"], want, strict=True):
        assert {k: g[k] for k in w if k != "exemplars"} == {k: v for k, v in w.items() if k != "exemplars"}
        assert g["exemplars"] == w["exemplars"].tolist()
    order = np.argsort(ig["attribution_id"])
    m = got["members"]
    np.testing.assert_array_equal(m["attribution_id"], ig["attribution_id"][order])
    np.testing.assert_array_equal(m["index"], ig["index"][order])  # joined back to the samples
    np.testing.assert_array_equal(m["predicted"], ig["predicted"][order])
    for c in ("flip", "atypical", "area", "concentration", "x", "y"):
        np.testing.assert_allclose(m[c], np.asarray(members[c], float)[order])
    by_id = {s["id"]: (s["class"], s["rank"]) for s in got["strategies"]}
    assert [by_id[s] for s in m["strategy_id"]] == [(strategies[w]["class"], strategies[w]["rank"])
                                                     for w in members["strategy"][order]]
    # Auditing again (another selection of the same maps) replaces the audit: no rows left behind.
    strategies2, members2 = audit_rows(ig["attribution_id"][:10], ig["predicted"][:10], seed=1)
    db.add_audit(**key, params={"features": "spray"}, strategies=strategies2, members=members2)
    assert db.audit(**key)["n_maps"] == 10
    assert count(db.path, "audits") == 1 and count(db.path, "strategies") == len(strategies2)
    assert count(db.path, "strategy_members") == 10


def test_a_bad_audit_stores_nothing_and_a_rewritten_map_drops_its_audit(populated):
    db, ref = populated
    ig = db.maps(method="ig")
    m, s = int(ig["model_id"][0]), int(ig["setting_id"][0])
    key = dict(model_id=m, setting_id=s, dataset="synthetic-seed0", size=8, split="test")
    strategies, members = audit_rows(ig["attribution_id"], ig["predicted"])
    with pytest.raises(ValueError, match="not one of the strategies"):
        db.add_audit(**key, params={}, strategies=strategies[:1], members=members)
    bad = {**members, "attribution_id": members["attribution_id"] + 10_000}
    with pytest.raises(ValueError, match="unknown model, setting or attribution"):
        db.add_audit(**key, params={}, strategies=strategies, members=bad)
    assert count(db.path, "audits") == count(db.path, "strategies") == 0  # all or nothing
    db.add_audit(**key, params={}, strategies=strategies, members=members)
    first = slice(0, 1)
    sid = db.add_samples(dataset="synthetic-seed0", size=8, split="test", indices=ig["index"][first],
                         labels=ig["label"][first])
    same = dict(model_id=m, setting_id=s, sample_ids=sid, targets=ig["target"][first],
                predicted=ig["predicted"][first], confidence=ig["confidence"][first], deltas=ig["delta"][first])
    db.add_attributions(**same, maps=ig["maps"][first])  # the same map: the audit stays
    assert db.audit(**key) is not None
    db.add_attributions(**same, maps=ig["maps"][first] + 1)  # another map: the audit no longer describes the maps
    assert db.audit(**key) is None
    assert count(db.path, "strategies") == count(db.path, "strategy_members") == 0


def test_the_header_check_reads_one_moment_while_another_process_creates_the_file(tmp_path):
    """A shard opening a file another shard is creating must not read the header from before that
    shard's commit and the tables from after it ("application_id 0, 25 schema objects")."""
    from db_schema import check_header, uri
    path = tmp_path / "shared.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as w:
        w.execute("PRAGMA journal_mode = WAL")
        w.execute("CREATE TABLE x(a)")
        w.execute("DROP TABLE x")  # a WAL file with nothing in it yet, as a shard's first open leaves it

    class CommitsBetweenReads(sqlite3.Connection):
        """After the header's application_id is read, the other shard commits its schema."""
        def execute(self, sql, *args):
            out = super().execute(sql, *args)
            if "application_id" in sql:
                with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
                    other.execute("BEGIN IMMEDIATE")
                    other.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    other.execute("CREATE TABLE models(id INTEGER PRIMARY KEY)")
                    other.execute("COMMIT")
            return out

    with contextlib.closing(sqlite3.connect(uri(str(path), "ro"), uri=True, factory=CommitsBetweenReads)) as ro:
        assert check_header(ro, str(path)) == 0  # empty as of its one moment; before the fix: DatabaseError
        assert not ro.in_transaction
    with contextlib.closing(sqlite3.connect(uri(str(path), "ro"), uri=True)) as ro:
        assert ro.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID  # the commit did land
