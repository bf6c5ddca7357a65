"""Bugs found by trying the pipeline as a new user would; each test here failed before its fix.

1. --data-dir was silently ignored for a model trained on synthetic data.
2. A bad value (evaluate.py --batch-size 0) ended in a traceback; all scripts now refuse it alike.
3. A --resume override equal to the flag's default was dropped.
4. Two data files with one stem shared database keys; a float16 overflow ended in a traceback.
5. SmoothGrad's noise depended on the chunk, so a sharded run stored other maps than a whole one.
6. Resuming a --pretrained run downloaded the ImageNet weights again.
7. Captum's "internal batch size" warning was printed once per chunk.
"""
import dataclasses
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import data as D
import evaluate
import explain
import model as M
import train
from db import DatabaseError, ExplanationDB
from runtime import exit_with_one_line, parse_args

REPO = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--dataset", "synthetic", "--epoch-steps", "1", "--synthetic-sizes", "40,18,18", "--device", "cpu", "--batch-size", "20",
               "--amp", "off"]

pytestmark = pytest.mark.usefixtures("one_thread")


def save(path: Path, net, **config) -> Path:
    """A checkpoint in train.py's layout (9 classes, RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    M.save_checkpoint(path, {"model": net.state_dict(), "epoch": 1, "best_metric": 0.0,
                             "config": {"model": "lightcnn", "size": 28, "seed": 0, **config},
                             "arch": {"in_channels": 3, "num_classes": 9}})
    return path


@pytest.fixture(scope="module")
def net(lightcnn_with_fitted_head):
    return lightcnn_with_fitted_head(200, 2e-2, 50)


@pytest.fixture(scope="module")
def real_halves(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """Two different 30-image files of real test-split images, both named test.npz."""
    real = np.load(shared_data / "pathmnist28_real_test718.npz")
    root = tmp_path_factory.mktemp("halves")
    paths = []
    for k, part in enumerate((slice(0, 30), slice(30, 60))):
        (root / "ab"[k]).mkdir()
        np.savez(root / "ab"[k] / "test.npz", test_images=real["test_images"][part], test_labels=real["test_labels"][part])
        paths.append(root / "ab"[k] / "test.npz")
    return tuple(paths)


# ----------------------------------------------------------------------------- 1. --data-dir

def test_data_dir_with_a_synthetic_model_is_refused_in_one_line(net, tmp_path, shared_data):
    ckpt = save(tmp_path / "run" / "best.pt", net, dataset="synthetic", data_dir="data", synthetic_sizes="10,10,20")
    real = shared_data / "pathmnist28_real_test718.npz"
    for script, extra in (("evaluate.py", []), ("explain.py", ["--db", str(tmp_path / "x.db")])):
        p = subprocess.run([sys.executable, str(REPO / script), "--checkpoint", str(ckpt), "--data-dir", str(real),
                            "--device", "cpu", *extra], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "was trained on synthetic data, whose classes are shapes, not tissue" in p.stderr
        assert str(real) in p.stderr and "drop --data-dir" in p.stderr
    assert sorted(f.name for f in (tmp_path / "run").iterdir()) == ["best.pt"]  # nothing written
    assert not (tmp_path / "x.db").exists()


def test_data_dir_is_the_data_a_tissue_model_is_scored_on(net, tmp_path, real_halves):
    a, b = real_halves
    ckpt = save(tmp_path / "run" / "best.pt", net, dataset="pathmnist", data_dir=str(a))
    own = evaluate.main(["--checkpoint", str(ckpt), "--device", "cpu", "--amp", "off", "--out", str(tmp_path / "a")])
    other = evaluate.main(["--checkpoint", str(ckpt), "--device", "cpu", "--amp", "off", "--data-dir", str(b),
                           "--out", str(tmp_path / "b")])
    labels_b = np.load(b)["test_labels"][:, 0]
    assert own["n"] == other["n"] == 30
    assert [other["per_class"][n]["support"] for n in D.PATHMNIST_CLASSES] == np.bincount(labels_b, minlength=9).tolist()


# ----------------------------------------------------------------------------- 2. bad values

@pytest.mark.parametrize("main", [train.main, evaluate.main, explain.main], ids=["train", "evaluate", "explain"])
@pytest.mark.parametrize("flag", ["--batch-size"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_every_script_refuses_a_bad_value_the_same_way(main, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.endswith(f"error: {flag} must be at least 1, got {value} (--help lists every flag)\n"), err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 3. resume overrides

def test_resume_takes_every_flag_given_even_at_its_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train.main([*TRAIN_FLAGS, "--epochs", "1", "--lr", "3e-3", "--patience", "2", "--out", str(tmp_path / "run")])
    defaults = train.TrainConfig()
    cfg, given = parse_args(train.TrainConfig, ["--resume", str(run), "--epochs", str(defaults.epochs),
                                                "--lr", str(defaults.lr)])
    resumed, _ = train.resume_config(cfg, given)
    assert (resumed.epochs, resumed.lr) == (defaults.epochs, defaults.lr)  # typed, so taken, though default
    assert resumed.patience == 2 and resumed.batch_size == 20  # not typed: the run's own
    cfg, given = parse_args(train.TrainConfig, ["--resume", str(run)])
    resumed, _ = train.resume_config(cfg, given)
    assert (resumed.epochs, resumed.lr, resumed.patience) == (1, 3e-3, 2)


# ----------------------------------------------------------------------------- 4. dataset keys

def test_two_files_with_one_stem_are_two_datasets_and_a_copy_is_the_same(net, tmp_path, real_halves, capsys):
    a, b = real_halves
    ckpt = save(tmp_path / "run" / "best.pt", net, dataset="pathmnist", data_dir=str(a))
    db = tmp_path / "x.db"
    args = ["--checkpoint", str(ckpt), "--db", str(db), "--device", "cpu", "--no-figures", "--methods", "gradcam",
            "--n", "5"]
    for path in (a, b):
        explain.main([*args, "--data-dir", str(path)])
    with ExplanationDB(db) as d:
        datasets = sorted({r["dataset"] for r in d.summary()})
        labels = {ds: d.maps(dataset=ds)["label"] for ds in datasets}
    assert len(datasets) == 2 and all(ds.startswith("test-") for ds in datasets)
    assert sorted(labels[ds].tolist() for ds in datasets) == sorted(
        np.load(p)["test_labels"][:5, 0].tolist() for p in (a, b))
    copy = tmp_path / "elsewhere" / "test.npz"  # the same bytes under the same name elsewhere
    copy.parent.mkdir()
    shutil.copy(a, copy)
    capsys.readouterr()
    explain.main([*args, "--data-dir", str(copy)])
    assert f"gradcam: 0 maps written, 5 already in {db}" in capsys.readouterr().out


def test_float16_overflow_is_one_line_and_keeps_what_was_stored(net, tmp_path, monkeypatch):
    ckpt = save(tmp_path / "run" / "best.pt", net, dataset="synthetic", data_dir="data", synthetic_sizes="10,10,20")
    real, calls = explain.METHODS["gradcam"], []

    def huge_second_chunk(*a, **k):
        out = real.attribute(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            out.maps = out.maps * 0 + 1e6  # beyond float16's 65504
        return out

    monkeypatch.setitem(explain.METHODS, "gradcam", dataclasses.replace(real, attribute=huge_second_chunk))
    db = tmp_path / "x.db"
    args = ["--checkpoint", str(ckpt), "--db", str(db), "--device", "cpu", "--no-figures", "--methods", "gradcam",
            "--n", "8", "--batch-size", "4"]
    with pytest.raises(DatabaseError) as e:
        explain.main(args)
    assert "\n" not in str(e.value) and "--store-dtype float32" in str(e.value)
    with ExplanationDB(db) as d:
        assert d.maps()["index"].tolist() == [0, 1, 2, 3]  # the first chunk stays
    # As the command runs it: the error is its one line on stderr, exit status 1.
    calls.clear()
    with pytest.raises(SystemExit) as e:
        exit_with_one_line(lambda: explain.main([*args, "--db", str(tmp_path / "y.db")]), (DatabaseError,))
    assert e.value.code.startswith("error: maps has non-finite values") and "\n" not in e.value.code


# ----------------------------------------------------------------------------- 5. SmoothGrad and shards

def test_smoothgrad_maps_do_not_depend_on_shards_or_batches(net, tmp_path):
    ckpt = save(tmp_path / "run" / "best.pt", net, dataset="synthetic", data_dir="data", synthetic_sizes="10,10,20")
    args = ["--checkpoint", str(ckpt), "--device", "cpu", "--no-figures", "--methods", "smoothgrad", "--n", "6",
            "--ig-steps", "4", "--nt-samples", "2"]
    # The same batches of 3 in all runs (float sums may differ between batch sizes): before the fix,
    # the second batch's noise was seeded by its place in the work list, 3 in the whole run, 0 in shard 2.
    explain.main([*args, "--db", str(tmp_path / "whole.db"), "--batch-size", "3"])
    for k in (1, 2):
        explain.main([*args, "--db", str(tmp_path / f"s{k}.db"), "--batch-size", "3", "--shard", f"{k}/2"])
    out = explain.main(["--db", str(tmp_path / "whole.db"), "--merge-from",
                        f"{tmp_path / 's1.db'},{tmp_path / 's2.db'}"])
    counts = [out["merged"][str(tmp_path / f"s{k}.db")] for k in (1, 2)]
    assert [c["maps_present"] for c in counts] == [3, 3] and [c["map_conflicts"] for c in counts] == [0, 0]
    with ExplanationDB(tmp_path / "whole.db") as w, ExplanationDB(tmp_path / "s2.db") as s:
        whole, shard = w.maps(indices=[3, 4, 5]), s.maps()
    assert whole["maps"].tobytes() == shard["maps"].tobytes()


def test_smoothgrad_noise_of_a_map_depends_on_its_seed_alone(net):
    import attribution as A
    split = D.load_data("synthetic", 28, splits=("test",), synthetic_sizes=(10, 10, 20)).splits["test"]
    x, t = D.normalize(split.images[:3]), torch.tensor([0, 4, 8])
    cfg = explain.ExplainConfig(ig_steps=4, nt_samples=3)
    together = A.smoothgrad(net, None, x, t, cfg, np.array([11, 22, 33])).maps
    alone = A.smoothgrad(net, None, x[2:], t[2:], cfg, np.array([33])).maps
    torch.testing.assert_close(alone[0], together[2], rtol=1e-4, atol=1e-6)  # the same noise, up to float sums
    other = A.smoothgrad(net, None, x[2:], t[2:], cfg, np.array([34])).maps
    assert (other[0] - together[2]).abs().max() > 100 * (alone[0] - together[2]).abs().max()


# ----------------------------------------------------------------------------- 6. --pretrained resume

def test_resuming_a_pretrained_run_does_not_download_weights(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.chdir(tmp_path)
    flags = ["--dataset", "synthetic", "--epoch-steps", "1", "--synthetic-sizes", "20,9,9", "--device", "cpu", "--batch-size", "10",
             "--model", "resnet50", "--amp", "off", "--eval-batch-size", "9"]
    run = train.main([*flags, "--epochs", "1", "--out", str(tmp_path / "run")])
    state = torch.load(run / "last.pt", weights_only=True)
    state["config"]["pretrained"] = True  # as if trained from ImageNet weights
    M.save_checkpoint(run / "last.pt", state)

    def offline(*a, **k):
        raise OSError("no network here")
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(M.CheckpointError, match="could not download ImageNet weights"):
        M.build_model("resnet50", pretrained=True)  # the download really is unavailable
    train.main(["--resume", str(run), "--epochs", "2"])
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


# ----------------------------------------------------------------------------- 7. Captum's warnings

def test_explaining_in_large_chunks_prints_no_captum_warning(net, tmp_path, capfd):
    ckpt = save(tmp_path / "run" / "best.pt", net, dataset="synthetic", data_dir="data", synthetic_sizes="10,10,20")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explain.main(["--checkpoint", str(ckpt), "--db", str(tmp_path / "x.db"), "--device", "cpu", "--no-figures",
                      "--methods", "ig,smoothgrad", "--ig-steps", "4", "--nt-samples", "2", "--batch-size", "20",
                      "--ig-internal-batch", "8"])  # 20 images per chunk, internal batch 8: Captum warned here
    assert not [w for w in caught if "nternal batch size" in str(w.message)], [str(w.message) for w in caught]
    assert "nternal batch size" not in capfd.readouterr().err
