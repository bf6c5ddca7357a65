"""explain.py at scale and under faults: --shard K/N, two processes writing one database at once,
SIGKILL mid-run then resume, --merge-from of shard files, and bad input as one-line errors.

Subprocesses run `python explain.py` as a user would, on one thread (OMP_NUM_THREADS=1) and a 48-image
synthetic test split with a seeded, untrained LightCNN (it predicts classes 2 and 6, so most images
are errors and --targets both gives them two maps). In-process reference runs use one thread too, so
their arithmetic is the subprocesses' bit for bit: where a reference chunks the work as the run under
test did, float32-stored maps are compared byte for byte; where the chunking differs (a shard's
chunks against an unsharded run's), within a tolerance, because a kernel may sum in another order
for another batch (oneDNN picks blockings by batch size; on a GPU even more so).
"""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

import data as D
import explain as X
import model as M
from db import SCHEMA_VERSION, DatabaseError, ExplanationDB

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 48
SIZES = f"10,10,{N_IMAGES}"  # train/val/test: explain.py rebuilds this test split from the checkpoint
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Both targets of an image (most are errors), float32 blobs so maps compare bit for bit, 12 chunks;
# predictions in float32 (--amp off) as expected_keys() makes them, whatever the CPU's bfloat16 support.
FLAGS = ("--device", "cpu", "--amp", "off", "--methods", "ig,gradcam", "--ig-steps", 4, "--batch-size", 4, "--targets", "both",
         "--store-dtype", "float32")


pytestmark = pytest.mark.usefixtures("one_thread")


def save_checkpoint(path: Path, name: str, state: dict) -> Path:
    """A checkpoint in the layout train.py writes, for the synthetic split above."""
    cfg = {"dataset": "synthetic", "size": 28, "data_dir": "data", "model": name, "pretrained": False,
           "epochs": 1, "batch_size": 32, "lr": 1e-3, "seed": 0, "device": "cpu", "synthetic_sizes": SIZES}
    arch = {"in_channels": 3, "num_classes": 9, "task": "multi-class", "class_names": list(D.SYNTHETIC_CLASSES),
            "flag": "synthetic", "data_source": "synthetic"}
    path.parent.mkdir(parents=True, exist_ok=True)
    M.save_checkpoint(path, {"model": state, "optimizer": {}, "scheduler": {}, "epoch": 1, "best_metric": 0.0,
                             "config": cfg, "arch": arch})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = M.build_model("lightcnn")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run" / "best.pt", "lightcnn", net.state_dict())


def run(checkpoint, db, *args, figures: bool = False) -> str:
    """explain.main in this process; returns what it printed."""
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        X.main(["--checkpoint", str(checkpoint), "--db", str(db), *([] if figures else ["--no-figures"]),
                *map(str, args)])
    return buf.getvalue()


def start(checkpoint, db, *args, cwd: Path, log: str) -> subprocess.Popen:
    """`python explain.py ARGS` in the background; stdout and stderr go to cwd/LOG.out and LOG.err."""
    return subprocess.Popen([sys.executable, str(REPO / "explain.py"), "--checkpoint", str(checkpoint),
                             "--db", str(db), *map(str, args)], cwd=cwd, env=ENV,
                            stdout=open(cwd / f"{log}.out", "w"), stderr=open(cwd / f"{log}.err", "w"))


def finish(p: subprocess.Popen, cwd: Path, log: str) -> str:
    """Wait for a start()ed run; assert it succeeded; return its stdout."""
    p.wait(timeout=120)
    err = (cwd / f"{log}.err").read_text()
    assert p.returncode == 0 and "Traceback" not in err, err
    return (cwd / f"{log}.out").read_text()


def written(out: str) -> int:
    """Maps a run says it wrote, over all methods ("ig: 12 maps written, 3 already in x.db")."""
    return sum(int(n) for n in re.findall(r"^\w+: (\d+) maps written", out, re.M))


def stored(db, ig_steps: int = 4) -> dict[tuple, tuple]:
    """(method, image index, target) -> the row as stored (map and raw blobs, delta, predicted,
    confidence), for Grad-CAM and IG with `ig_steps`; read-only, so the file stays byte-identical."""
    with contextlib.closing(sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT s.method, s.params_json, x.idx, a.target, a.map, a.raw, a.delta, a.predicted, "
                            "a.confidence FROM attributions a JOIN settings s ON s.id = a.setting_id "
                            "JOIN samples x ON x.id = a.sample_id").fetchall()
    return {(m, i, t): tuple(rest) for m, params, i, t, *rest in rows
            if m == "gradcam" or json.loads(params)["steps"] == ig_steps}


def floats(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, "<f4")


def raw_rows(db) -> list[tuple]:
    """Every attribution row as stored, with ids and created_at (a rewrite would show)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT * FROM attributions ORDER BY id").fetchall()


def count(db) -> int:
    """Committed attribution rows as another process sees them (0 before the table exists)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT count(*) FROM attributions").fetchone()[0]
    except sqlite3.Error:
        return 0


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_keys(ckpt, indices) -> set[tuple]:
    """(method, index, target) of --targets both over these images: predicted and true class."""
    net, mcfg, _ = M.load_checkpoint(ckpt)
    split = D.data_for_run(mcfg, ("test",)).splits["test"]
    with torch.no_grad():
        pred = net(D.normalize(split.images)).argmax(1).tolist()
    labels = split.labels.tolist()
    return {(m, i, t) for m in ("ig", "gradcam") for i in indices for t in {pred[i], labels[i]}}


# ----------------------------------------------------------------------------- --shard K/N

@pytest.mark.parametrize("shard", ["0/2", "3/2", "2", "a/b", "1/0", "-1/2", "1/2/3"])
def test_bad_shard_is_refused_by_check(shard):
    assert X.ExplainConfig(shard=shard).check() == f"--shard must be K/N with 1 <= K <= N, got {shard!r}"


def test_shard_slices_partition_the_selection():
    for n_selected, n in [(48, 2), (48, 5), (7, 3), (2, 4), (0, 2)]:
        idx = np.random.default_rng(n_selected).permutation(100)[:n_selected]  # any selection, any order
        assert X.ExplainConfig(shard=f"{n}/{n}").check() is None
        parts = [X.shard_slice(idx, k, n) for k in range(1, n + 1)]
        np.testing.assert_array_equal(np.concatenate(parts), idx)  # disjoint, complete, contiguous, in order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        for k in range(1, n + 1):  # a rerun of a shard gets the same slice, hence the same chunks
            np.testing.assert_array_equal(X.shard_slice(idx.copy(), k, n), parts[k - 1])


def test_two_shards_write_one_database_at_once_then_a_whole_run_only_draws(ckpt, tmp_path):
    """--shard 1/2 and 2/2 started together on one database: the union, each map as a single-process
    run of that shard stores it (same chunks: bit for bit), nothing written twice, figures and --trust
    put off; a run without --shard afterwards computes no map, rewrites none, draws and measures."""
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt.parent, run_dir)
    procs = {k: start(run_dir / "best.pt", tmp_path / "shared.db", *FLAGS, "--shard", f"{k}/2", "--trust",
                      cwd=tmp_path, log=f"shard{k}") for k in (1, 2)}
    refs = {k: tmp_path / f"ref{k}.db" for k in (1, 2)}
    for k, ref in refs.items():  # meanwhile, the references: each shard alone
        run(ckpt, ref, *FLAGS, "--shard", f"{k}/2")
    outs = {k: finish(p, tmp_path, f"shard{k}") for k, p in procs.items()}

    shards = {k: stored(ref) for k, ref in refs.items()}
    images = {k: {i for _, i, _ in s} for k, s in shards.items()}
    assert images == {1: set(range(24)), 2: set(range(24, 48))}  # by image: both targets in one shard
    both = stored(tmp_path / "shared.db")
    assert set(both) == expected_keys(ckpt, range(N_IMAGES)) and len(both) > 2 * N_IMAGES
    assert both == shards[1] | shards[2]  # every row, bit for bit, none lost or extra
    assert count(tmp_path / "shared.db") == len(both)
    assert written(outs[1]) + written(outs[2]) == len(both)  # no map written twice
    for out in outs.values():
        assert "figures and --trust skipped, they need the whole selection" in out
    assert not (run_dir / "images").exists()

    before = raw_rows(tmp_path / "shared.db")
    out = run(run_dir / "best.pt", tmp_path / "shared.db", *FLAGS, "--trust", "--trust-n", 4, "--trust-steps", 4,
              "--curve-steps", 4, figures=True)
    n_ig = sum(m == "ig" for m, _, _ in both)
    assert f"ig: 0 maps written, {n_ig} already in" in out and f"gradcam: 0 maps written, {n_ig} already in" in out
    assert raw_rows(tmp_path / "shared.db") == before  # not even rewritten: ids and created_at unchanged
    with ExplanationDB(tmp_path / "shared.db") as d:
        assert {"sanity_spearman", "deletion_auc", "agreement_ig_gradcam"} <= {r["name"] for r in d.summary_metrics()}
    assert {p.name for p in (run_dir / "images").iterdir()} == {
        "ig_examples.png", "gradcam_examples.png", "sanity_check.png", "deletion_insertion.png", "localisation.png"}


def test_two_processes_with_overlapping_selections_at_once(ckpt, tmp_path):
    """Images 0-29 and 17-47 into one database at once. In chunks of 4 work rows the overlap is
    chunked differently by the two runs, so a shared key holds whichever run's map came first:
    bit for bit one of the two single-process maps, and within float32 rounding of the other."""
    sel = {"a": ",".join(map(str, range(0, 30))), "b": ",".join(map(str, range(17, 48)))}
    procs = {r: start(ckpt, tmp_path / "shared.db", *FLAGS, "--indices", s, "--no-figures", cwd=tmp_path, log=r)
             for r, s in sel.items()}
    refs = {}
    for r, s in sel.items():
        run(ckpt, tmp_path / f"ref_{r}.db", *FLAGS, "--indices", s)
        refs[r] = stored(tmp_path / f"ref_{r}.db")
    outs = {r: finish(p, tmp_path, r) for r, p in procs.items()}

    both = stored(tmp_path / "shared.db")
    assert set(both) == set(refs["a"]) | set(refs["b"]) == expected_keys(ckpt, range(N_IMAGES))
    assert count(tmp_path / "shared.db") == len(both)
    assert written(outs["a"]) + written(outs["b"]) == len(both)  # a key stored by one run is kept by the other
    for key, row in both.items():
        candidates = [ref[key] for ref in refs.values() if key in ref]
        assert row in candidates, key
        for ref in candidates:  # the other candidate: the same up to the order of float32 sums
            assert row[3:] == ref[3:]  # predicted, confidence: from the same whole-split prediction
            for mine, theirs in zip(row[:2], ref[:2]):  # map, Grad-CAM's raw map
                if theirs is not None:
                    np.testing.assert_allclose(floats(mine), floats(theirs), rtol=1e-5,
                                               atol=1e-6 * np.abs(floats(theirs)).max())
            if ref[2] is not None:  # IG delta
                assert abs(row[2] - ref[2]) <= 1e-5 * np.abs(floats(ref[0])).sum()


# ----------------------------------------------------------------------------- SIGKILL

def test_sigkill_loses_no_committed_chunk_and_a_rerun_matches_a_clean_run(ckpt, tmp_path):
    """Killed after at least 2 of 12 chunks: every chunk another process saw committed is there, whole
    (one transaction per chunk), the file is intact, and resuming gives a clean run's rows bit for
    bit (the chunks are fixed, so the resumed chunks are the clean run's batches).

    The process is stopped (SIGSTOP) before counting, then killed, so nothing commits in between; a
    stop landing after the commit record reached the WAL but before the WAL index was updated would
    show that chunk only after the kill, hence `seen <= after <= seen + one chunk`."""
    args = ("--device", "cpu", "--methods", "ig", "--ig-steps", 16, "--batch-size", 4, "--store-dtype", "float32",
            "--no-figures")  # 16 steps: a chunk takes ~0.1 s, long enough to stop the run in the middle
    db = tmp_path / "killed.db"
    p = start(ckpt, db, *args, cwd=tmp_path, log="killed")
    try:
        deadline = time.monotonic() + 120
        while count(db) < 8:
            assert p.poll() is None, (tmp_path / "killed.err").read_text()
            assert time.monotonic() < deadline, "timed out waiting for two chunks"
            time.sleep(0.002)
        p.send_signal(signal.SIGSTOP)
        seen = count(db)
    finally:
        p.send_signal(signal.SIGKILL)  # also when an assertion above failed: no stopped process left behind
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        after = conn.execute("SELECT count(*) FROM attributions").fetchone()[0]
    assert 8 <= seen <= after <= seen + 4 and after % 4 == 0 and after < N_IMAGES, (seen, after)

    clean = tmp_path / "clean.db"
    run(ckpt, clean, *args)
    partial, reference = stored(db, 16), stored(clean, 16)
    assert set(partial) == {("ig", i, t) for _, i, t in reference if i < after}  # whole chunks, in order
    assert all(partial[k] == reference[k] for k in partial)
    out = run(ckpt, db, *args)
    assert f"ig: {N_IMAGES - after} maps written, {after} already in" in out
    assert stored(db, 16) == reference


# ----------------------------------------------------------------------------- --merge-from

def test_merged_shard_files_equal_one_database(ckpt, tmp_path):
    """Three shard files merged into a database that already holds other maps (so sample and setting
    ids differ from the shards'): the union bit for bit, the shard files unchanged, a second merge
    adds nothing, and a run without --shard then finds everything."""
    shard_dbs = [tmp_path / f"shard{k}.db" for k in (1, 2, 3)]
    for k, path in enumerate(shard_dbs, 1):
        run(ckpt, path, *FLAGS, "--shard", f"{k}/3")
    dest = tmp_path / "all.db"
    run(ckpt, dest, "--device", "cpu", "--methods", "ig", "--ig-steps", 2, "--indices", "47,46,45")  # other setting
    other = stored(dest, ig_steps=2)
    hashes = [digest(p) for p in shard_dbs]

    out = X.main(["--db", str(dest), "--merge-from", ",".join(map(str, shard_dbs))])
    union = {}
    for path in shard_dbs:
        union |= stored(path)
    assert len(union) == sum(len(stored(p)) for p in shard_dbs)  # the shards are disjoint
    assert [c["maps"] for c in out["merged"].values()] == [len(stored(p)) for p in shard_dbs]
    assert all(c["maps_present"] == c["map_conflicts"] == c["metric_conflicts"] == 0 for c in out["merged"].values())
    assert stored(dest) == union
    assert {k: v for k, v in stored(dest, ig_steps=2).items() if k[0] == "ig"} == other
    assert [digest(p) for p in shard_dbs] == hashes  # opened read-only
    with contextlib.closing(sqlite3.connect(shard_dbs[0])) as a, contextlib.closing(sqlite3.connect(dest)) as b:
        src_ids = a.execute("SELECT idx, id FROM samples ORDER BY idx").fetchall()
        dst_ids = dict(b.execute("SELECT idx, id FROM samples").fetchall())
    assert any(dst_ids[i] != sid for i, sid in src_ids)  # remapped, not copied

    before = raw_rows(dest)
    again = X.main(["--db", str(dest), "--merge-from", ",".join(map(str, shard_dbs))])
    assert all(c["maps"] == c["samples"] == c["models"] == c["settings"] == 0 for c in again["merged"].values())
    assert [c["maps_present"] for c in again["merged"].values()] == [len(stored(p)) for p in shard_dbs]
    assert raw_rows(dest) == before

    printed = run(ckpt, dest, *FLAGS)
    assert re.search(r"^ig: 0 maps written", printed, re.M) and re.search(r"^gradcam: 0 maps written", printed, re.M)
    # Against one unsharded run: other chunks, so equal within float32 rounding (here it is even exact).
    whole = tmp_path / "whole.db"
    run(ckpt, whole, *FLAGS)
    ref = stored(whole)
    assert set(ref) == set(union)
    for k, row in union.items():
        a, b = floats(row[0]), floats(ref[k][0])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


SHA = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("a", "b")}


def fill(path: Path, maps: dict, metric: dict | None = None, summary=(), shift: bool = False,
         labels: dict | None = None, shape=(4, 4)) -> None:
    """A database with maps {(sample index, target): value} of model "a" under one IG setting, a
    per-map metric "m" {(index, target): value} and summary rows (per setting?, dataset, name).
    shift: another model, setting and samples come first, so no id matches an unshifted file's."""
    with ExplanationDB(path) as d:
        if shift:
            d.add_model(SHA["b"], "b", {})
            d.add_setting("gradcam", {})
            d.add_samples(dataset="d", size=8, split="test", indices=[7, 6], labels=[7, 6])
        model, ig = d.add_model(SHA["a"], "a", {}), d.add_setting("ig", {"steps": 4})
        idx = sorted({i for i, _ in maps} | set(labels or {}))
        ids = dict(zip(idx, d.add_samples(dataset="d", size=8, split="test", indices=idx,
                                          labels=[(labels or {}).get(i, i % 9) for i in idx]).tolist()))
        for (i, t), v in maps.items():
            d.add_attributions(model_id=model, setting_id=ig, sample_ids=[ids[i]], targets=[t], predicted=[t],
                               confidence=[0.5], maps=np.full((1, *shape), v), dtype="float32")
        rows = d.maps()
        key = {(i, t): a for i, t, a in zip(rows["index"].tolist(), rows["target"].tolist(), rows["attribution_id"])}
        for (i, t), v in (metric or {}).items():
            d.add_sample_metrics([key[i, t]], "m", [v])
        for per_setting, dataset, name in summary:
            d.add_summary_metric(model_id=model, setting_id=ig if per_setting else None, dataset=dataset,
                                 size=8, split="test", name=name, value=1.0, n=3, detail={"x": 1})


def test_merge_keeps_the_destination_on_conflict_and_carries_metrics(tmp_path):
    src, dest = tmp_path / "src.db", tmp_path / "dest.db"
    fill(src, {(0, 0): 1.0, (1, 0): 2.0, (2, 0): 3.0, (3, 0): 4.0}, {(0, 0): 0.1, (1, 0): 0.2, (2, 0): 0.3, (3, 0): 0.4},
         [(True, "d", "deletion_auc"), (False, "d", "agreement"), (True, "other", "deletion_auc")])
    # Here (2, 0) holds another map (a conflict) and (3, 0) the same map with another value of "m".
    fill(dest, {(2, 0): 30.0, (3, 0): 4.0}, {(3, 0): 0.9}, shift=True)
    src_hash = digest(src)

    with ExplanationDB(dest) as d:
        counts = d.merge_from(src)
        rows = d.maps(method="ig")
        metric = d.sample_metrics("m")
        summary = {(r["dataset"], r["name"]) for r in d.summary_metrics()}
        again = d.merge_from(src)
    assert counts == {"models": 0, "settings": 0, "samples": 2, "files": 0, "maps": 2, "maps_present": 1, "map_conflicts": 1,
                      "sample_metrics": 2, "summary_metrics": 1, "metric_conflicts": 4}
    # Left out: "m" of the conflicting map (it describes the source's map) and of (3, 0) (another
    # value here), and both aggregates over data set "d", where map (2, 0) stayed this file's.
    assert dict(zip(rows["index"].tolist(), rows["maps"][:, 0, 0].tolist())) == {0: 1.0, 1: 2.0, 2: 30.0, 3: 4.0}
    assert set(rows["model_id"].tolist()) == {2} and set(rows["setting_id"].tolist()) == {2}  # 1 and 1 there
    assert dict(zip(metric["index"].tolist(), np.round(metric["value"], 6).tolist())) == {0: 0.1, 1: 0.2, 3: 0.9}
    assert summary == {("other", "deletion_auc")}
    assert again == {**{k: 0 for k in counts}, "maps_present": 3, "map_conflicts": 1, "metric_conflicts": 4}
    assert digest(src) == src_hash


def test_add_attributions_without_replace_keeps_what_is_stored(tmp_path):
    """What explain.py writes with: a key another process stored meanwhile is kept, not rewritten."""
    fill(tmp_path / "x.db", {(0, 0): 1.0})
    before = raw_rows(tmp_path / "x.db")
    with ExplanationDB(tmp_path / "x.db") as d:
        n = d.add_attributions(model_id=1, setting_id=1, sample_ids=[1, 1], targets=[0, 5], predicted=[0, 5],
                               confidence=[0.5, 0.5], maps=np.full((2, 4, 4), 7.0), replace=False)
        rows = d.maps()
    assert n == 1 and raw_rows(tmp_path / "x.db")[0] == before[0]
    assert rows["target"].tolist() == [0, 5] and rows["maps"][:, 0, 0].tolist() == [1.0, 7.0]


def make_bad_source(path: Path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(8192))
    elif kind == "truncated":
        full = path.with_suffix(".full")
        fill(full, {(i, 0): float(i) for i in range(40)}, shape=(32, 32))  # 40 maps of 4 kB
        path.write_bytes(full.read_bytes()[:2 * 4096])
    elif kind in ("foreign application_id", "newer schema"):
        fill(path, {(0, 0): 1.0})
        pragma = "application_id = 42" if kind == "foreign application_id" else f"user_version = {SCHEMA_VERSION + 1}"
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute(f"PRAGMA {pragma}")
    elif kind == "other labels":
        fill(path, {(1, 0): 1.0}, labels={1: 3})  # good.db says 1 % 9 = 1


@pytest.mark.parametrize("kind, message", [
    ("random bytes", "not a readable explanations database"), ("truncated", "malformed"),
    ("foreign application_id", "not an explanations database"), ("newer schema", "newer than this code's"),
    ("missing", "no such file"), ("the destination", "is the database being merged into"),
    ("other labels", "index 1 has label 3 there but 1 in")])
def test_merge_refuses_bad_sources_and_changes_no_file(tmp_path, kind, message):
    good, dest = tmp_path / "good.db", tmp_path / "dest.db"
    fill(good, {(0, 0): 1.0, (1, 1): 1.0})
    fill(dest, {(4, 1): 2.0}, shift=True)
    bad = dest if kind == "the destination" else tmp_path / "bad.db"
    make_bad_source(bad, kind)
    files = {p.name: digest(p) for p in tmp_path.iterdir()}
    for target in (dest,) if kind == "the destination" else (dest, tmp_path / "new.db"):  # new: not created
        with pytest.raises(DatabaseError) as e:
            X.main(["--db", str(target), "--merge-from", f"{good},{bad}"])
        assert str(e.value).startswith(f"{bad}: ") and message in str(e.value) and "\n" not in str(e.value)
        # Every file as it was; read-only openings of a WAL file leave SQLite's -shm and an empty -wal.
        now = {p.name: digest(p) for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))}
        assert now == files
        assert all(p.stat().st_size == 0 for p in tmp_path.glob("*-wal"))


# ----------------------------------------------------------------------------- bad input through the CLI

# The interpreter lives under /root, which nobody cannot enter: the child imports explain.py's modules
# as root, then gives up root for real (file permissions apply from there on) and runs the script.
AS_NOBODY = """
import os, runpy, sys
sys.path.insert(0, sys.argv[1])
import explain
try:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
except OSError:
    print("cannot drop root")
    sys.exit(0)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def set_user_version(path: Path, version: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {version}")


@pytest.fixture(scope="module")
def bad_runs(ckpt):
    """Every bad-input case in its own folder, all started at once (each costs a Python + torch start).
    Each case: extra flags (after --checkpoint best.pt --db good.db ...), how to make its bad file,
    what the error must say."""
    with torch.random.fork_rng():
        light = M.build_model("lightcnn").state_dict()
    cases = {
        "not sqlite": ("--db x.db", lambda d: (d / "x.db").write_bytes(np.random.default_rng(1).bytes(8192)),
                       "x.db: not an explanations database"),
        "newer schema": ("--db x.db", lambda d: set_user_version(shutil.copy(d / "good.db", d / "x.db"), SCHEMA_VERSION + 1),
                         f"x.db: schema version {SCHEMA_VERSION + 1} is newer"),
        "read-only db": ("--db x.db", lambda d: (shutil.copy(d / "good.db", d / "x.db").chmod(0o444), d.chmod(0o777)),
                         "x.db: cannot open for writing"),
        "other model": ("--checkpoint other.pt", lambda d: save_checkpoint(d / "other.pt", "resnet50", light),
                        "other.pt: weights do not fit a resnet50"),
        "truncated checkpoint": ("--checkpoint cut.pt",
                                 lambda d: (d / "cut.pt").write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2]),
                                 "cut.pt: not a readable checkpoint"),
        "--shard 0/2": ("--shard 0/2", None, "--shard must be K/N with 1 <= K <= N, got '0/2'"),
        "--shard 3/2": ("--shard 3/2", None, "--shard must be K/N with 1 <= K <= N, got '3/2'"),
        "damaged merge source": ("--db out.db --merge-from good.db,cut.db",
                                 lambda d: (d / "cut.db").write_bytes((d / "good.db").read_bytes()[:4096]),
                                 "cut.db: "),
    }
    base = Path(tempfile.mkdtemp())  # not pytest's tmp_path: it is private to root, and nobody must reach it
    base.chmod(0o755)
    mpl = base / "mpl"  # matplotlib's cache, copied: a fresh one would print "building the font cache"
    shutil.copytree(matplotlib.get_cachedir(), mpl)
    mpl.chmod(0o777)
    procs, results = {}, {}
    for i, (name, (args, make, expected)) in enumerate(cases.items()):
        d = base / f"case{i}"
        d.mkdir()
        d.chmod(0o755)
        shutil.copy(ckpt, d / "best.pt")
        with ExplanationDB(d / "good.db") as db:
            db.add_setting("ig", {})
        if make:
            make(d)
        before = {p.name: digest(p) for p in d.iterdir()}
        as_nobody = ["-c", AS_NOBODY, str(REPO)] if name == "read-only db" and os.geteuid() == 0 else []
        procs[name] = subprocess.Popen(
            [sys.executable, *as_nobody, str(REPO / "explain.py"), "--checkpoint", "best.pt", "--db", "good.db",
             "--device", "cpu", "--methods", "gradcam", "--n", "2", *args.split()], cwd=d, text=True,
            env={**ENV, "MPLCONFIGDIR": str(mpl), "HOME": str(mpl)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        results[name] = (d, before, expected)
    for name, p in procs.items():
        out, err = p.communicate(timeout=180)
        # No CAP_SETUID: root cannot make a file unwritable for itself.
        results[name] = None if out.startswith("cannot drop root") else (*results[name], p.returncode, err)
    yield results
    for d in base.iterdir():
        d.chmod(0o755)
    shutil.rmtree(base)


@pytest.mark.parametrize("case", ["not sqlite", "newer schema", "read-only db", "other model", "truncated checkpoint",
                                  "--shard 0/2", "--shard 3/2", "damaged merge source"])
def test_bad_input_is_one_line_on_stderr_and_changes_no_file(bad_runs, case):
    if bad_runs[case] is None:
        pytest.skip("running as root without CAP_SETUID: no honest way to make a file unwritable")
    d, before, expected, rc, err = bad_runs[case]
    assert rc == (2 if case.startswith("--shard") else 1), (rc, err)
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: " if rc == 1 else "explain.py: error: ") and expected in err, err
    after = {p.name: digest(p) for p in d.iterdir() if not p.name.endswith(("-wal", "-shm"))}
    assert after == before  # byte-identical, nothing created (but SQLite's read-only side files)
    assert all(p.stat().st_size == 0 for p in d.glob("*-wal"))
