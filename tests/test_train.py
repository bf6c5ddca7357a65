"""train.py: run folder contents, checkpoints, test-split isolation, resume, determinism, selection.

Every run trains LightCNN on CPU, on one thread, on tiny synthetic data (97/45/45 images: 3 batches
of 32 plus a single image, which train_one_epoch skips and must not count in its rates).
"""

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import data
import train
import training
from model import CheckpointError, build_model, load_checkpoint, read_checkpoint, save_checkpoint

SIZES = (97, 45, 45)  # train/val/test; 45 holds every one of the 9 classes
SEEN = 96  # the train images minus the last batch of one, which is skipped
# float32 (--amp off): the recomputations below are float32 too, on every CPU; the bfloat16 path has its own test
FLAGS = ["--dataset", "synthetic", "--epoch-steps", "1", "--synthetic-sizes", "97,45,45", "--device", "cpu", "--batch-size", "32",
         "--eval-batch-size", "64", "--amp", "off"]
REAL_LOAD_DATA = data.load_data
COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds",
           "images_per_s"]
TIMING = {"seconds", "images_per_s"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _install(mp: pytest.MonkeyPatch, events: list) -> None:
    """Log data requests (train.py's own, and evaluate.py's through data.data_for_run) and
    checkpoint writes in order."""
    def loader(who):
        def load(dataset, size=28, data_dir="data", splits=data.SPLITS, seed=0, **kw):
            events.append(("load", who, tuple(splits)))
            return REAL_LOAD_DATA(dataset, size, data_dir, splits, seed, **kw)
        return load

    real_save = train.save_checkpoint

    def save(path, state):
        events.append(("save", Path(path).name, state["epoch"]))
        real_save(path, state)

    mp.setattr(train, "load_data", loader("train"))
    mp.setattr(data, "load_data", loader("evaluate"))
    mp.setattr(train, "save_checkpoint", save)


@pytest.fixture
def events(monkeypatch, tmp_path) -> list:
    log = []
    _install(monkeypatch, log)
    monkeypatch.chdir(tmp_path)  # runs/latest and default run folders land in tmp_path
    return log


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """One 1-epoch run shared by the read-only tests: (run folder, events)."""
    root = tmp_path_factory.mktemp("one_epoch")
    log = []
    with pytest.MonkeyPatch.context() as mp:
        _install(mp, log)
        mp.chdir(root)
        run = train.main([*FLAGS, "--epochs", "1", "--out", str(root / "run")])
    return run, log


def fit(out: Path, *flags: str) -> Path:
    return train.main([*FLAGS, "--out", str(out), *flags])


def read_rows(run: Path) -> tuple[list[str], list[dict]]:
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: float(v) for k, v in r.items()} for r in reader]
    return reader.fieldnames, rows


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def logits_on(ckpt: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's model rebuilt from the file alone, run on a split generated independently."""
    net, cfg, _ = load_checkpoint(ckpt)
    s = data.load_data("synthetic", 28, splits=(split,), seed=cfg["seed"], synthetic_sizes=SIZES).splits[split]
    with torch.no_grad():
        return net(data.normalize(s.images)).double(), s.labels


def assert_accuracy(acc: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """acc is the accuracy of these logits, up to images whose two top logits are so close (within
    1e-5 of the logits' scale) that the reordered float32 sums of an inference copy may flip them."""
    top2 = logits.topk(2, 1).values
    ties = int((top2[:, 0] - top2[:, 1] < 1e-5 * logits.abs().max()).sum())
    correct = int((logits.argmax(1) == labels).sum())
    assert abs(acc * len(labels) - correct) <= ties + 1e-6, (acc, correct, ties)


def script_val_acc(monkeypatch, accs) -> None:
    """Replace the validation accuracy of each epoch by a scripted value (loss and AUC stay real)."""
    real, it = train.validate, iter(accs)
    monkeypatch.setattr(train, "validate", lambda *a, **k: {**real(*a, **k), "acc": next(it)})


# ----------------------------------------------------------------------------- one epoch

def test_run_folder_config_and_metrics(one_epoch):
    run, _ = one_epoch
    expected = {**asdict(train.TrainConfig()), "dataset": "synthetic", "device": "cpu", "batch_size": 32,
                "eval_batch_size": 64, "amp": "off", "epochs": 1, "epoch_steps": 1, "out": str(run), "synthetic_sizes": "97,45,45"}
    assert json.loads((run / "config.json").read_text()) == expected
    columns, rows = read_rows(run)
    assert columns == COLUMNS and len(rows) == 1
    r = rows[0]
    assert r["epoch"] == 1 and r["lr"] == 1e-3
    # Rates are over the images actually trained on: the single-image last batch is not counted.
    assert r["images_per_s"] * r["seconds"] == pytest.approx(SEEN, rel=1e-9)
    assert r["train_acc"] * SEEN == pytest.approx(round(r["train_acc"] * SEEN), abs=1e-6)
    assert np.isfinite(r["train_loss"]) and r["train_loss"] > 0
    assert (run.parent / "latest").resolve() == run.resolve()


def test_checkpoints_stand_alone(one_epoch):
    run, _ = one_epoch
    config = json.loads((run / "config.json").read_text())
    _, rows = read_rows(run)
    last, best = load(run / "last.pt"), load(run / "best.pt")
    for ck in (last, best):
        assert {"model", "optimizer", "scheduler", "epoch", "best_metric", "config", "rng"} <= ck.keys()
        assert ck["epoch"] == 1 and ck["config"] == config
        assert ck["best_metric"] == rows[0]["val_acc"]
        assert ck["model"].keys() == build_model("lightcnn").state_dict().keys()  # no prefixes
        assert ck["rng"]["torch"].dtype == torch.uint8 and ck["rng"]["data"].dtype == torch.uint8
        assert ck["optimizer"]["param_groups"][0]["lr"] == 0.0  # the cosine over the run's one epoch is at its end
    assert_same_tensors(last["model"], best["model"])  # epoch 1 always improves on -inf


def test_test_metrics_match_independent_recomputation(one_epoch):
    run, _ = one_epoch
    logits, labels = logits_on(run / "best.pt", "test")
    record = json.loads((run / "test_metrics.json").read_text())
    assert record["split"] == "test" and record["n"] == SIZES[2]
    assert record["config"]["checkpoint"] == str(run / "best.pt")
    assert_accuracy(record["acc"], logits, labels)


def test_validation_metrics_match_independent_recomputation(one_epoch):
    run, _ = one_epoch
    logits, labels = logits_on(run / "best.pt", "val")
    _, rows = read_rows(run)
    r = rows[0]
    assert_accuracy(r["val_acc"], logits, labels)
    assert r["val_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    probs = torch.softmax(logits, 1).numpy()
    assert r["val_auc"] == pytest.approx(roc_auc_score(labels.numpy(), probs, multi_class="ovr"), abs=1e-6)


def test_test_split_read_only_after_training(one_epoch):
    _, log = one_epoch
    assert log == [("load", "train", ("train", "val")),
                   ("save", "last.pt", 1), ("save", "best.pt", 1),
                   ("load", "evaluate", ("test",))]


def test_training_curve_png(one_epoch):
    run, _ = one_epoch
    img = mpimg.imread(run / "images" / "training_curves.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.01  # something is drawn


# ----------------------------------------------------------------------------- reproducibility

def test_identical_runs_give_identical_weights(one_epoch, events, tmp_path):
    run, _ = one_epoch
    again = train.main([*FLAGS, "--epochs", "1"])  # default folder: runs/NAME under the cwd
    assert again.parent == Path("runs")
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / again).resolve()
    assert_same_tensors(load(run / "last.pt")["model"], load(again / "last.pt")["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(read_rows(run)[1]) == strip(read_rows(again)[1])


@pytest.mark.parametrize("recipe", [["--schedule", "plateau"], ["--ema", "0.5"]])
def test_resume_equals_uninterrupted(events, tmp_path, recipe):
    a, b = tmp_path / "A", tmp_path / "B"
    fit(a, "--epochs", "2", *recipe)
    fit(b, "--epochs", "1", *recipe)
    train.main(["--resume", str(b), "--epochs", "2", "--device", "cpu"])
    la, lb = load(a / "last.pt"), load(b / "last.pt")
    assert la["epoch"] == lb["epoch"] == 2
    assert_same_tensors(la["model"], lb["model"])
    if "--ema" in recipe:  # the average is the model kept; the trained weights travel beside it
        assert_same_tensors(la["trained_model"], lb["trained_model"])
        assert la["ema_steps"] == lb["ema_steps"] > 0
        assert any(not torch.equal(la["model"][k], la["trained_model"][k]) for k in la["model"])
    assert_same_tensors(la["rng"], lb["rng"])
    assert la["optimizer"]["param_groups"] == lb["optimizer"]["param_groups"]
    for k, st in la["optimizer"]["state"].items():
        assert_same_tensors(st, lb["optimizer"]["state"][k])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    rows_a, rows_b = read_rows(a)[1], read_rows(b)[1]
    assert len(rows_a) == len(rows_b) == 2 and strip(rows_a) == strip(rows_b)
    assert json.loads((b / "config.json").read_text())["epochs"] == 2
    assert [e for e in events if e[0] == "load" and "test" in e[2]] == [("load", "evaluate", ("test",))] * 3


def test_resume_of_a_run_from_before_amp_auto(events, tmp_path):
    """Runs recorded --amp as true/false before it took auto/on/off: they resume as on/off."""
    run = fit(tmp_path / "run", "--epochs", "1", "--amp", "off")
    state = read_checkpoint(run / "last.pt")
    state["config"]["amp"] = False
    del state["config"]["select"], state["config"]["shift"]  # nor did they have --select and --shift
    save_checkpoint(run / "last.pt", state)
    train.main(["--resume", str(run), "--epochs", "2", "--device", "cpu"])
    assert load(run / "last.pt")["config"]["amp"] == "off"
    assert (load(run / "last.pt")["config"]["select"], load(run / "last.pt")["config"]["shift"]) == ("best", 0)
    assert json.loads((run / "config.json").read_text())["amp"] == "off"


def test_resume_honours_a_lower_lr(events, tmp_path):
    run = fit(tmp_path / "run", "--epochs", "1")
    train.main(["--resume", str(run), "--epochs", "2", "--device", "cpu", "--lr", "1e-4"])
    last = load(run / "last.pt")
    assert last["config"]["lr"] == 1e-4 and last["scheduler"]["base_lrs"] == [1e-4]
    # The new peak rate on the cosine of the new budget: epoch 2 of 2 trains at half of it.
    assert read_rows(run)[1][1]["lr"] == pytest.approx(5e-5, rel=1e-12)
    plateau = fit(tmp_path / "plateau", "--epochs", "1", "--schedule", "plateau")
    train.main(["--resume", str(plateau), "--epochs", "2", "--device", "cpu", "--lr", "1e-4"])
    assert load(plateau / "last.pt")["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert read_rows(plateau)[1][1]["lr"] == 1e-4


# ----------------------------------------------------------------------------- model selection

@pytest.mark.parametrize("accs, best_epoch", [(None, None), ([0.3, 0.5, 0.5], 2)])
def test_best_checkpoint_tracks_validation(monkeypatch, events, tmp_path, accs, best_epoch):
    if accs is not None:
        script_val_acc(monkeypatch, accs)
    run = fit(tmp_path / "run", "--epochs", "3", "--select", "best")
    _, rows = read_rows(run)
    val = [r["val_acc"] for r in rows]
    assert len(val) == 3 and (accs is None or val == accs)
    want = int(np.argmax(val)) + 1  # first maximum on ties
    assert best_epoch is None or want == best_epoch
    best, last = load(run / "best.pt"), load(run / "last.pt")
    assert best["epoch"] == want and last["epoch"] == 3
    assert best["best_metric"] == last["best_metric"] == max(val)
    saved = [e[2] for e in events if e[:2] == ("save", "best.pt")]
    assert saved == [i + 1 for i, v in enumerate(val) if v > max(val[:i], default=-1.0)]
    record = json.loads((run / "test_metrics.json").read_text())
    logits, labels = logits_on(run / "best.pt", "test")  # the test report is of best.pt, not last.pt
    assert_accuracy(record["acc"], logits, labels)


def test_select_last_keeps_the_end_of_the_schedule_and_never_stops_early(monkeypatch, events, tmp_path, capsys):
    """The default: validation falls after epoch 1, yet all epochs run and best.pt is the last one."""
    script_val_acc(monkeypatch, [0.5, 0.4, 0.3, 0.2])
    run = fit(tmp_path / "run", "--epochs", "4", "--patience", "1")
    assert "note: --patience stops early only with --select best" in capsys.readouterr().out
    assert [r["epoch"] for r in read_rows(run)[1]] == [1, 2, 3, 4]
    best, last = load(run / "best.pt"), load(run / "last.pt")
    assert best["epoch"] == last["epoch"] == 4 and best["best_metric"] == 0.2 and last["stale_epochs"] == 0
    assert_same_tensors(best["model"], last["model"])
    record = json.loads((run / "test_metrics.json").read_text())
    logits, labels = logits_on(run / "best.pt", "test")
    assert_accuracy(record["acc"], logits, labels)


def test_early_stopping_and_resume_after_it(monkeypatch, events, tmp_path):
    script_val_acc(monkeypatch, [0.5, 0.4, 0.4, 0.4, 0.4])
    run = fit(tmp_path / "run", "--epochs", "5", "--patience", "2", "--select", "best")
    assert [r["epoch"] for r in read_rows(run)[1]] == [1, 2, 3]
    last = load(run / "last.pt")
    assert last["epoch"] == 3 and last["stale_epochs"] == 2 and load(run / "best.pt")["epoch"] == 1
    # The restored patience counter stops a resumed run at once.
    train.main(["--resume", str(run), "--epochs", "5", "--device", "cpu"])
    assert [r["epoch"] for r in read_rows(run)[1]] == [1, 2, 3] and load(run / "last.pt")["epoch"] == 3


# ----------------------------------------------------------------------------- failures

@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--epochs", "two"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--dataset", "nosuchmnist"], "unknown dataset 'nosuchmnist'"),
    (["--size", "32"], "invalid choice: 32"),
    (["--lr", "0"], "--lr must be greater than 0, got 0.0"),
    (["--lr", "nan"], "--lr must be greater than 0, got nan"),
    (["--patience", "0"], "--patience must be at least 1, got 0"),
    (["--weight-decay=-1e-4"], "--weight-decay must be at least 0, got -0.0001"),
    (["--monitor", "loss"], "invalid choice: 'loss'"),
    (["--shift", "28"], "--shift 28 must be smaller than the image side (--size 28)"),
    (["--select", "first"], "invalid choice: 'first'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_command_line_is_an_argparse_error(events, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main([*FLAGS, *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert events == [] and not (tmp_path / "runs").exists()  # nothing started


def test_resume_without_checkpoint_names_the_file(events, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="last.pt") as e:
        train.main(["--resume", str(empty), "--device", "cpu"])
    assert str(empty / "last.pt") in str(e.value)
    assert list(empty.iterdir()) == [] and events == []


def test_nan_loss_stops_with_last_good_checkpoint(monkeypatch, events, tmp_path):
    real_ce, real_epoch, at = F.cross_entropy, train.train_one_epoch, {"epoch": 0, "call": 0}

    def epoch(*a, **k):
        at["epoch"], at["call"] = at["epoch"] + 1, 0
        return real_epoch(*a, **k)

    def ce(*a, **k):
        at["call"] += 1
        loss = real_ce(*a, **k)
        return loss * float("nan") if (at["epoch"], at["call"]) == (2, 2) else loss

    monkeypatch.setattr(train, "train_one_epoch", epoch)
    monkeypatch.setattr(F, "cross_entropy", ce)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="last.pt") as e:
        fit(run, "--epochs", "3")
    assert "epoch 2/3" in str(e.value)
    assert [ev for ev in events if ev[0] == "save"] == [("save", "last.pt", 1), ("save", "best.pt", 1)]
    assert not any(ev[0] == "load" and "test" in ev[2] for ev in events)
    assert read_checkpoint(run / "last.pt")["epoch"] == 1
    load_checkpoint(run / "last.pt")
    assert [r["epoch"] for r in read_rows(run)[1]] == [1]
    # With the loss healthy again, the run resumes from the last good epoch.
    monkeypatch.setattr(F, "cross_entropy", real_ce)
    train.main(["--resume", str(run), "--epochs", "2", "--device", "cpu"])
    assert load(run / "last.pt")["epoch"] == 2 and [r["epoch"] for r in read_rows(run)[1]] == [1, 2]


def test_weight_average_follows_its_recurrence():
    """make_ema against the recurrence written out: a_1 = w_1, then a_t = a_(t-1) + (1 - d_t)(w_t - a_(t-1))
    with d_t = min(decay, t / (9 + t)), decay = 0.5 ** (1 / (half-life x steps per epoch))."""
    from training import Recipe, make_ema
    net = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(net, Recipe(ema=2.0), steps_per_epoch=5)
    decay, expected = 0.5 ** (1 / 10), None
    for t, w in enumerate([3.0, -1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0] * 5, start=1):
        net.weight.data.fill_(w)
        ema.update_parameters(net)
        expected = w if expected is None else expected + (1 - min(decay, t / (9 + t))) * (w - expected)
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert make_ema(net, Recipe(ema=0.0), 5) is None


def test_an_epoch_of_small_data_makes_at_least_epoch_steps_optimiser_steps(events, tmp_path):
    """97 images at batch 32 make 4 steps in a pass; --epoch-steps 10 makes each epoch 4 passes,
    388 images in 13 batches (the passes follow each other), so Adam has taken 26 steps after 2 epochs."""
    from training import Recipe, passes_per_epoch, seed_epoch, steps_per_epoch
    run = fit(tmp_path / "run", "--epochs", "2", "--epoch-steps", "10")
    state = load(run / "last.pt")["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {26}
    assert json.loads((run / "config.json").read_text())["epoch_steps"] == 10
    # Full PathMNIST is one pass an epoch at the defaults; a real CV fold's 459 images are 23.
    assert passes_per_epoch(89_996, Recipe()) == 1 and steps_per_epoch(89_996, Recipe()) == 704
    assert passes_per_epoch(459, Recipe()) == 23 and steps_per_epoch(459, Recipe()) >= Recipe().epoch_steps
    # Each pass is a permutation of its own; the first is the one-pass order, so old runs resume alike.
    order, _ = seed_epoch(0, 3, 50, passes=3)
    assert torch.equal(order[:50], seed_epoch(0, 3, 50)[0])
    assert all(sorted(order[k * 50:(k + 1) * 50].tolist()) == list(range(50)) for k in range(3))
    assert not torch.equal(order[:50], order[50:100])
    ranks = [seed_epoch(0, 3, 51, rank, 2, passes=2)[0] for rank in (0, 1)]
    for k in range(2):  # under torchrun, the ranks split every pass without overlap
        shares = [set(r[k * 25:(k + 1) * 25].tolist()) for r in ranks]
        assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 50


def test_clean_epochs_train_the_last_epochs_without_the_acquisition_jitter(tmp_path):
    """--clean-epochs N: the last N epochs train as a run without colour and sharpness jitter and
    erasing would (the stain jitter stays): all of them clean is exactly that run (as the default 3
    is on a 2-epoch run), and one of two is neither that run nor one jittered throughout."""
    weights = lambda run: torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    plain = weights(fit(tmp_path / "plain", "--epochs", "2", "--colour-jitter", "0", "--sharpness", "0", "--erase", "0"))
    jittered = weights(fit(tmp_path / "jittered", "--epochs", "2", "--clean-epochs", "0"))
    assert same(weights(fit(tmp_path / "all", "--epochs", "2", "--clean-epochs", "2")), plain)
    assert same(weights(fit(tmp_path / "default", "--epochs", "2")), plain)
    last = weights(fit(tmp_path / "last", "--epochs", "2", "--clean-epochs", "1"))
    assert not same(last, plain) and not same(last, jittered)
    recipe = training.Recipe(epochs=25, clean_epochs=3)
    assert training.epoch_recipe(recipe, 22) is recipe
    assert training.epoch_recipe(recipe, 23) == replace(recipe, colour_jitter=0, sharpness=0, erase=0)
