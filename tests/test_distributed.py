"""train.py under torchrun: two CPU processes (gloo) share each epoch, write one set of outputs, and resume.

The sharding itself (seed_epoch) is checked in-process; the torchrun runs use tiny synthetic data
(96/48/48 images, 16 per batch and process).
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import training
from model import build_model, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 96
# float32 (--amp off), so that the recomputations below are exact on every CPU
FLAGS = ["--dataset", "synthetic", "--epoch-steps", "1", "--synthetic-sizes", f"{TRAIN_IMAGES},48,48", "--device", "cpu",
         "--batch-size", "16", "--eval-batch-size", "64", "--amp", "off"]


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n, world", [(96, 1), (96, 2), (97, 2), (100, 3), (5, 4)])
def test_each_rank_gets_an_equal_disjoint_share_of_one_permutation(n, world):
    shards = [training.seed_epoch(0, 3, n, rank, world)[0] for rank in range(world)]
    assert all(len(s) == n // world for s in shards)  # equal batches on every rank: no rank waits forever
    joined = torch.cat(shards)
    assert len(joined.unique()) == len(joined) == n - n % world  # each image at most once per epoch
    alone = training.seed_epoch(0, 3, n, 0, 1)[0]
    assert torch.equal(torch.stack(shards, 1).flatten(), alone[: n - n % world])  # the same permutation


def test_epoch_draws_depend_on_seed_epoch_and_rank_only():
    order, g = training.seed_epoch(0, 2, 96, 1, 2)
    dropout = torch.rand(4)
    again, g2 = training.seed_epoch(0, 2, 96, 1, 2)
    assert torch.equal(order, again) and torch.equal(torch.rand(4), dropout)
    assert torch.equal(g.get_state(), g2.get_state())
    _, g_rank0 = training.seed_epoch(0, 2, 96, 0, 2)
    dropout_rank0 = torch.rand(4)
    assert not torch.equal(g_rank0.get_state(), g.get_state()) and not torch.equal(dropout_rank0, dropout)
    assert not torch.equal(training.seed_epoch(0, 3, 96, 1, 2)[0], order)  # a new order every epoch
    assert not torch.equal(training.seed_epoch(1, 2, 96, 1, 2)[0], order)  # and for every seed


# ----------------------------------------------------------------------------- torchrun

def torchrun(cwd: Path, *args: str, script: Path = REPO / "train.py") -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def read_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_torchrun_two_processes_one_set_of_outputs_and_resume(tmp_path):
    run = tmp_path / "run"
    p = torchrun(tmp_path, *FLAGS, "--epochs", "1", "--out", str(run))

    # One set of outputs, written by rank 0 alone.
    assert p.stdout.count("epoch   1 |") == 1 and p.stdout.count("data: ") == 1
    assert {f.name for f in run.iterdir()} >= {"config.json", "metrics.csv", "last.pt", "best.pt", "test_metrics.json"}
    assert json.loads((run / "config.json").read_text())["batch_size"] == 16
    (row,) = read_rows(run)
    # Each training image once per epoch over both processes (48 each): 2 x 96 if every rank took the
    # whole split, 48 if the counts were not summed over ranks.
    assert row["images_per_s"] * row["seconds"] == pytest.approx(TRAIN_IMAGES, rel=1e-9)
    assert row["train_acc"] * TRAIN_IMAGES == pytest.approx(round(row["train_acc"] * TRAIN_IMAGES), abs=1e-6)

    # Checkpoints hold the unwrapped network ("module." nowhere) and stand alone.
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ckpt["model"].keys() == build_model("lightcnn").state_dict().keys()
    # The weights saved are the ones rank 0 validated: recompute validation from best.pt alone.
    net, cfg, _ = load_checkpoint(run / "best.pt")
    val = data.load_data("synthetic", 28, splits=("val",), seed=cfg["seed"], synthetic_sizes=(96, 48, 48)).splits["val"]
    with torch.no_grad():
        logits = net(data.normalize(val.images)).double()
    assert row["val_acc"] == pytest.approx((logits.argmax(1) == val.labels).double().mean().item(), abs=1e-9)
    assert row["val_loss"] == pytest.approx(F.cross_entropy(logits, val.labels).item(), rel=1e-5)

    # Resumed under torchrun: one more epoch, again each image once.
    p = torchrun(tmp_path, "--resume", str(run), "--epochs", "2")
    assert p.stdout.count(f"resumed {run} after epoch 1") == 1 and p.stdout.count("epoch   2 |") == 1
    rows = read_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == row
    assert rows[1]["images_per_s"] * rows[1]["seconds"] == pytest.approx(TRAIN_IMAGES, rel=1e-9)
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 2


def test_ranks_train_on_disjoint_images_and_end_with_the_same_weights(tmp_path):
    """Each rank trains on its own half of every epoch, and DDP's gradient averaging keeps the two
    copies of the network identical: without the DDP wrap each rank would fit its own half and the
    weights would drift apart after the first step."""
    torchrun(tmp_path, str(tmp_path), *FLAGS, "--epochs", "2", "--out", str(tmp_path / "run"),
             script=REPO / "tests" / "ddp_probe.py")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for epoch in range(2):
        a, b = (r["orders"][epoch] for r in ranks)
        assert len(a) == len(b) == TRAIN_IMAGES // 2
        assert not set(a.tolist()) & set(b.tolist())  # disjoint
        assert set(a.tolist()) | set(b.tolist()) == set(range(TRAIN_IMAGES))  # together: every image
    assert not torch.equal(ranks[0]["orders"][0], ranks[0]["orders"][1])  # a new order each epoch
    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    # ... and they are the weights rank 0 saved.
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[name], p0[name]) for name in p0)


def test_torchrun_explain_shards_into_one_database(tmp_path):
    """torchrun explain.py: each rank explains its slice into the one database (disjoint, together
    everything), then rank 0 alone draws the figures; the maps equal a single process's."""
    import train
    from db import ExplanationDB
    from explain import ExplainConfig
    methods = ExplainConfig().methods.split(",")  # the defaults: one figure each
    run = train.main([*FLAGS, "--epochs", "1", "--out", str(tmp_path / "run")])
    args = ["--checkpoint", str(run / "best.pt"), "--device", "cpu", "--ig-steps", "8", "--batch-size", "8"]
    p = torchrun(tmp_path, *args, "--db", str(tmp_path / "two.db"), script=REPO / "explain.py")
    assert p.stdout.count("shard 1/2: 24 of 48") == 1 and p.stdout.count("shard 2/2: 24 of 48") == 1
    assert p.stdout.count("wrote ") == len(methods)  # METHOD_examples.png, by rank 0 only
    subprocess.run([sys.executable, str(REPO / "explain.py"), *args, "--db", str(tmp_path / "one.db"), "--no-figures"],
                   cwd=tmp_path, check=True, capture_output=True)
    for method in methods:
        with ExplanationDB(tmp_path / "two.db") as a, ExplanationDB(tmp_path / "one.db") as b:
            ra, rb = a.maps(method=method), b.maps(method=method)
        assert ra["index"].tolist() == rb["index"].tolist() == list(range(48))  # each image once
        assert (ra["maps"] == rb["maps"]).all()
