"""train.py under faults: SIGKILL and Ctrl-C at any moment, then --resume, end with exactly the weights and
metrics of a run never stopped; a run stopped between writing last.pt and best.pt is repaired; a diverging
run keeps its last good checkpoint; bad checkpoints and bad command lines are one-line errors that write
nothing.

Subprocesses run `python train.py` as a user would, on one thread and tiny synthetic data (96/48/48
images, batches of 16); the in-process runs (the uninterrupted reference among them) use the same
flags and one thread too, so their arithmetic is the subprocesses' bit for bit.
"""
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from model import CheckpointError, LightCNN, load_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset", "synthetic", "--epoch-steps", "1", "--synthetic-sizes", "96,48,48", "--device", "cpu", "--batch-size", "16",
         "--eval-batch-size", "64"]
TIMING = {"seconds", "images_per_s"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
VALIDATE = train.validate


pytestmark = pytest.mark.usefixtures("one_thread")


def start(cwd: Path, *args: str, log: str = "log") -> subprocess.Popen:
    """`python train.py ARGS` in the background; stdout and stderr go to cwd/LOG.out and LOG.err."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=ENV,
        stdout=open(cwd / f"{log}.out", "w"), stderr=open(cwd / f"{log}.err", "w"),
        # Ctrl-C must reach Python even when this test runs where SIGINT is ignored (nohup, `cmd &`).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_until(p: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    """Poll every millisecond until ready(); fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert p.poll() is None, f"train.py ended (exit {p.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def finish(p: subprocess.Popen, cwd: Path, log: str = "log") -> tuple[int, str, str]:
    p.wait(timeout=180)
    return p.returncode, (cwd / f"{log}.out").read_text(), (cwd / f"{log}.err").read_text()


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rows_without_timing(run: Path) -> list[dict]:
    """metrics.csv as written (strings, so bit-exact), minus the wall-clock columns."""
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_run(a: Path, b: Path, epochs: int) -> None:
    """Same final weights, optimiser state, selection and metrics, bit for bit."""
    la, lb = load(a / "last.pt"), load(b / "last.pt")
    assert la["epoch"] == lb["epoch"] == epochs
    assert_same_tensors(la["model"], lb["model"])
    assert la["optimizer"]["param_groups"] == lb["optimizer"]["param_groups"]
    for k, st in la["optimizer"]["state"].items():
        assert_same_tensors(st, lb["optimizer"]["state"][k])
    assert (la["best_metric"], la["stale_epochs"]) == (lb["best_metric"], lb["stale_epochs"])
    ba, bb = load(a / "best.pt"), load(b / "best.pt")
    assert ba["epoch"] == bb["epoch"]
    assert_same_tensors(ba["model"], bb["model"])
    assert rows_without_timing(a) == rows_without_timing(b) and len(rows_without_timing(a)) == epochs
    if (a / "test_metrics.json").exists() or (b / "test_metrics.json").exists():
        strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k not in ("source", "config")}
        assert strip(a / "test_metrics.json") == strip(b / "test_metrics.json")


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under root with a hash of its bytes (or its link target)."""
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


# ----------------------------------------------------------------------------- kill -9 and Ctrl-C

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A 3-epoch run never stopped, in this process (same thread count, same arithmetic)."""
    root = tmp_path_factory.mktemp("reference")
    return train.main([*FLAGS, "--epochs", "3", "--out", str(root / "run")])


def test_killed_and_interrupted_run_resumes_to_the_uninterrupted_result(reference, tmp_path):
    run = tmp_path / "run"

    # 1. SIGKILL in the middle of writing epoch 2's last.pt: its .tmp has its first bytes (of ~10 MB).
    p = start(tmp_path, *FLAGS, "--epochs", "3", "--out", str(run), log="killed")
    writing = lambda: (run / "last.pt").exists() and size(run / "last.pt.tmp") > 0
    wait_until(p, writing, "last.pt was being written after epoch 1")
    p.kill()
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert read_checkpoint(run / "last.pt")["epoch"] in (1, 2)  # whole, whatever the moment

    # 2. Ctrl-C in the resumed run, during its first epoch: exit 130, a resume hint, no traceback.
    p = start(tmp_path, "--resume", str(run), log="interrupted")
    wait_until(p, lambda: "resumed " in (tmp_path / "interrupted.out").read_text(), "the resumed run started")
    time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    code, out, err = finish(p, tmp_path, "interrupted")
    assert code == 130, err
    assert err.strip().splitlines()[-1] == f"interrupted: resume with python train.py --resume {run}"
    assert "Traceback" not in err and not (run / "test_metrics.json").exists()
    read_checkpoint(run / "last.pt")

    # 3. Resumed to the end: identical to the run that was never stopped.
    code, out, err = finish(start(tmp_path, "--resume", str(run), log="finished"), tmp_path, "finished")
    assert code == 0, err
    assert_same_run(reference, run, epochs=3)


def scripted_val_acc(monkeypatch, accs: dict) -> None:
    """Validation accuracy by epoch number (loss and AUC stay real), so the best epoch is known."""
    epoch = iter(sorted(accs))

    def validate(*a, **k):
        return {**VALIDATE(*a, **k), "acc": accs[next(epoch)]}
    monkeypatch.setattr(train, "validate", validate)


def test_stop_between_last_and_best_checkpoint_is_repaired_on_resume(monkeypatch, tmp_path, capsys):
    """Epoch 2 improves, and the run stops after its last.pt but before its best.pt is written: only
    the repair on resume can give best.pt the weights of epoch 2 (the resume has no epoch left to run)."""
    scripted_val_acc(monkeypatch, {1: 0.3, 2: 0.5})
    real_save = train.save_checkpoint

    def save(path, state):
        if Path(path).name == "best.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) at this moment amounts to
        real_save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", save)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main([*FLAGS, "--epochs", "2", "--out", str(run)])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == f"interrupted: resume with python train.py --resume {run}"
    last = load(run / "last.pt")
    assert last["epoch"] == 2 and last["stale_epochs"] == 0 and load(run / "best.pt")["epoch"] == 1

    monkeypatch.setattr(train, "save_checkpoint", real_save)
    train.main(["--resume", str(run)])
    best = load(run / "best.pt")
    assert best["epoch"] == 2 and best["best_metric"] == 0.5
    assert_same_tensors(best["model"], last["model"])
    assert json.loads((run / "test_metrics.json").read_text())["config"]["checkpoint"] == str(run / "best.pt")


def test_interrupted_first_epoch_says_there_is_nothing_to_resume(monkeypatch, tmp_path, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main([*FLAGS, "--epochs", "2", "--out", str(tmp_path / "run")])
    assert e.value.code == 130
    assert "nothing to resume" in capsys.readouterr().err and not (tmp_path / "run" / "last.pt").exists()


def test_sigterm_exits_like_ctrl_c(monkeypatch, tmp_path, capsys):
    """A scheduler's (or torchrun's) SIGTERM: the same hint, exit 128 + 15."""
    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    monkeypatch.setattr(train, "train_one_epoch", terminated)
    with pytest.raises(SystemExit) as e:
        train.main([*FLAGS, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert e.value.code == 143 and "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again


# ----------------------------------------------------------------------------- divergence

def test_nan_validation_loss_stops_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path):
    """Training loss still finite, but the last step of epoch 2 left NaN weights: nothing of epoch 2 is saved."""
    real, epochs = train.train_one_epoch, iter(range(1, 10))

    def poisoned(model, *a, **k):
        result = real(model, *a, **k)
        if next(epochs) == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(train, "train_one_epoch", poisoned)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="validation loss became nan after epoch 2; last.pt keeps"):
        train.main([*FLAGS, "--epochs", "3", "--out", str(run)])
    assert load(run / "last.pt")["epoch"] == load(run / "best.pt")["epoch"] == 1
    assert [r["epoch"] for r in rows_without_timing(run)] == ["1"]
    net, _, _ = load_checkpoint(run / "last.pt")
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ----------------------------------------------------------------------------- bad checkpoints

class _Payload:
    """Unpickling this creates a file: proof that the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _truncate(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def _rewrite(**changes):
    def write(path: Path) -> None:
        torch.save({**load(path), **changes}, path)
    return write


BAD_LAST = {
    "truncated": _truncate,
    "other_model": _rewrite(model=LightCNN(3, 4).state_dict()),  # a 4-class network's weights
    "config_of_another_model": lambda p: _rewrite(config={**load(p)["config"], "model": "resnet50"})(p),
    "untrusted_pickle": lambda p: _rewrite(extra=_Payload(p.parent / "pwned"))(p),
    "no_optimizer": lambda p: torch.save({k: v for k, v in load(p).items() if k != "optimizer"}, p),
    "config_not_a_dict": _rewrite(config="lightcnn"),
    "unknown_config_key": lambda p: _rewrite(config={**load(p)["config"], "learning_rate": 1.0})(p),
}


@pytest.mark.parametrize("damage", BAD_LAST.values(), ids=BAD_LAST.keys())
def test_resume_of_a_bad_checkpoint_is_one_line_and_writes_nothing(reference, tmp_path, monkeypatch, damage):
    root = tmp_path / "copy"
    shutil.copytree(reference.parent, root, symlinks=True)
    run = root / reference.name
    damage(run / "last.pt")
    monkeypatch.chdir(root)
    before = snapshot(root)
    with pytest.raises(CheckpointError) as e:
        train.main(["--resume", str(run)])
    assert "\n" not in str(e.value) and str(run / "last.pt") in str(e.value)
    assert snapshot(root) == before  # byte-identical, nothing added (no runs/latest either)
    assert not (run / "pwned").exists()


# ----------------------------------------------------------------------------- bad command lines

ARGPARSE_ERRORS = [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--size", "32"], "invalid choice: 32"),
    (["--dataset", "nosuchmnist"], "unknown dataset 'nosuchmnist'"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32)"),
    (["--synthetic-sizes", "96,48"], "--synthetic-sizes '96,48': give three positive integers"),
    (["--synthetic-sizes", "96,0,48"], "give three positive integers"),
    (["--batch-size", "x"], "invalid int value: 'x'"),
]


@pytest.mark.parametrize("argv, message", ARGPARSE_ERRORS)
def test_command_line_error_is_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main([*FLAGS, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


SCRIPT_ERRORS = {  # name: (arguments, exit code, text the one line must hold); the in-process test covers the rest
    "negative_epochs": (["--epochs", "-1"], 2, "train.py: error: --epochs must be at least 1"),
    "missing_data_file": (["--dataset", "pathmnist", "--data-dir", "/nonexistent/x.npz"], 1,
                          "error: /nonexistent/x.npz not found; check the --data-dir path"),
    "truncated_checkpoint": (["--resume", "RUN"], 1, "RUN/last.pt: not a readable checkpoint of this project"),
}


@pytest.fixture(scope="module")
def script_errors(reference, tmp_path_factory) -> dict:
    """Every SCRIPT_ERRORS command run at once (they only pay Python's start-up): name -> (cwd, exit, stderr)."""
    procs = {}
    for name, (argv, _, _) in SCRIPT_ERRORS.items():
        cwd = tmp_path_factory.mktemp(name)
        run = cwd / "run"
        if name == "truncated_checkpoint":
            shutil.copytree(reference, run)
            _truncate(run / "last.pt")
        flags = [] if name == "truncated_checkpoint" else [*FLAGS, "--out", str(run)]
        procs[name] = cwd, snapshot(cwd), start(cwd, *flags, *[str(run) if a == "RUN" else a for a in argv])
    results = {}
    for name, (cwd, before, p) in procs.items():
        code, out, err = finish(p, cwd)
        (cwd / "log.out").unlink()
        (cwd / "log.err").unlink()
        results[name] = cwd, before, code, err
    return results


@pytest.mark.parametrize("name", SCRIPT_ERRORS)
def test_script_error_is_one_line_without_traceback_and_writes_nothing(script_errors, name):
    cwd, before, code, err = script_errors[name]
    _, want_code, text = SCRIPT_ERRORS[name]
    assert code == want_code, err
    assert err.count("\n") == 1 and text.replace("RUN", str(cwd / "run")) in err, err
    assert "Traceback" not in err
    assert snapshot(cwd) == before  # no run folder, no runs/latest, a bad checkpoint's folder untouched
