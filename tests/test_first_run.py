"""What a new user hit following the README from a fresh clone; each test here failed before its fix.

1. A text file as --data-dir ended in a FileExistsError traceback.
2. (README commands: tests/test_docs.py parses every one of them.)
3. Flag prefixes were accepted: --epoch ran as --epochs.
4. A second --images run replaced the first run's predictions.csv.
5. Errors that did not help: a run folder as --checkpoint, a test-only file for train.py (which has no
   --split), a 64 px file for a 28 px model ("check --size", which evaluate.py ignored). The pickled
   module and the text file as checkpoints are in test_model.py's table of bad checkpoints.
6. Figures: the tile grid carried the last row's title, IG had no colour scale, the sanity check's x
   axis showed module names, Grad-CAM's padding frame on blank tissue went unexplained.
7. The report's trust part spoke in identifiers and was titled after the runs/latest link.
8. explain.py was silent for minutes in a log, every epoch ended in an unexplained `*`, image files
   filled the summary one line each, and Grad-CAM printed `mean|delta| nan`.
9. Ctrl-C inside torch.save ended in a traceback (found by .ci/run, not by a user).
"""
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import evaluate
import explain
import figures
import gallery
import model as M
import runtime
import train
from attribution import METHODS, AttributionSettings
from db import ExplanationDB

TRAIN = ["--dataset", "synthetic", "--epoch-steps", "1", "--synthetic-sizes", "40,18,18", "--device", "cpu", "--batch-size", "20",
         "--amp", "off"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, lightcnn_with_fitted_head) -> Path:
    """A LightCNN checkpoint 'trained' on real 28 px PathMNIST images (the file holds 40 of them)."""
    net = lightcnn_with_fitted_head(300, 1e-2, 200)
    root = tmp_path_factory.mktemp("run-2026")
    path = root / "best.pt"
    cfg = {"dataset": "pathmnist", "size": 28, "data_dir": str(root / "none.npz"), "model": "lightcnn", "seed": 0}
    arch = {"in_channels": 3, "num_classes": 9, "task": "multi-class", "class_names": list(D.PATHMNIST_CLASSES)}
    M.save_checkpoint(path, {"model": net.state_dict(), "epoch": 1, "config": cfg, "arch": arch})
    return path


def one_line(capsys_err: str) -> str:
    assert capsys_err.count("\n") == 1 and "Traceback" not in capsys_err, capsys_err
    return capsys_err


# ----------------------------------------------------------------------------- 1, 5: data errors

def test_a_text_file_as_data_dir_is_one_line(tmp_path, monkeypatch):
    text = tmp_path / "README.md"
    text.write_text("# not data\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(D.DataError) as e:
        train.main(["--data-dir", str(text), "--epochs", "1", "--out", str(tmp_path / "run")])
    assert str(e.value) == (f"{text}: is a file but not an .npz; --data-dir takes a folder of MedMNIST files "
                            "(e.g. data, where pathmnist.npz is downloaded) or one .npz file")
    assert not (tmp_path / "run").exists() and text.read_text() == "# not data\n"


def test_training_on_a_test_only_file_names_data_py_not_split(shared_data, tmp_path):
    real = shared_data / "pathmnist28_real_test718.npz"
    with pytest.raises(D.DataError) as e:
        train.main(["--data-dir", str(real), "--epochs", "1", "--out", str(tmp_path / "run")])
    msg = str(e.value)
    assert "has no 'train' split" in msg and f"python data.py {real} SPLIT.npz" in msg and "--split" not in msg


def test_a_64px_file_for_a_28px_model_says_what_to_do(ckpt, shared_data, capsys):
    p64 = shared_data / "pathmnist64_real_132.npz"
    with pytest.raises(D.DataError) as e:
        evaluate.main(["--checkpoint", str(ckpt), "--data-dir", str(p64), "--device", "cpu"])
    msg = str(e.value)
    assert msg.startswith(f"{p64}: test_images are 64x64, not 28x28; the model in {ckpt} was trained on 28x28")
    assert "check --size" not in msg and "train a model on this one" in msg
    # --size belongs to score files; with a checkpoint it used to be silently ignored.
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--checkpoint", str(ckpt), "--data-dir", str(p64), "--size", "64"])
    assert stop.value.code == 2 and "--size and --dataset describe a score file" in one_line(capsys.readouterr().err)


def test_a_data_file_recorded_relative_to_another_folder_says_so(ckpt, capsys):
    with pytest.raises(D.DataError) as e:
        evaluate.main(["--checkpoint", str(ckpt), "--device", "cpu"])
    assert str(e.value) == (f"{ckpt.parent / 'none.npz'} not found: {ckpt} records its data file as train.py was "
                            "given it; run from the folder you trained in, or pass --data-dir PATH")


def test_a_run_folder_as_checkpoint_points_at_its_best_pt(ckpt):
    with pytest.raises(M.CheckpointError) as e:
        M.load_checkpoint(ckpt.parent)
    assert str(e.value) == f"{ckpt.parent}: is a folder, not a checkpoint; pass {ckpt}"


# ----------------------------------------------------------------------------- 3: flags

@pytest.mark.parametrize("config", [train.TrainConfig, evaluate.EvalConfig, explain.ExplainConfig])
def test_a_flag_prefix_is_an_unknown_flag(config, capsys):
    prefix = {"TrainConfig": "--epoch", "EvalConfig": "--check", "ExplainConfig": "--meth"}[config.__name__]
    with pytest.raises(SystemExit) as e:
        runtime.parse_args(config, [prefix, "1"])
    assert e.value.code == 2 and f"unrecognized arguments: {prefix} 1" in one_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- 4, 8: image files

def test_a_second_images_run_keeps_the_first_runs_rows(ckpt, shared_data, tmp_path, capsys):
    tiles = shared_data / "crc_val_he_7k_tiles"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for name in ("TUM-TCGA-AAHIDTWA.jpg", "MUS-TCGA-AASRLCCT.jpg"):
        shutil.copy(tiles / name, a / name)
    shutil.copy(tiles / "STR-TCGA-ADIHSKPL.jpg", b / "STR-TCGA-ADIHSKPL.jpg")
    out, db = tmp_path / "out", tmp_path / "x.db"
    common = ["--checkpoint", str(ckpt), "--db", str(db), "--device", "cpu", "--files-out", str(out), "--no-figures"]
    explain.main([*common, "--images", str(a)])
    explain.main([*common, "--images", str(b)])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(Path(r["path"]).name for r in rows) == ["MUS-TCGA-AASRLCCT.jpg", "STR-TCGA-ADIHSKPL.jpg",
                                                          "TUM-TCGA-AAHIDTWA.jpg"]
    printed = capsys.readouterr().out
    assert "(1 rows from this run, 2 kept from earlier runs)" in printed
    # Explained again: its own row is replaced, not doubled.
    explain.main([*common, "--images", str(a / "TUM-TCGA-AAHIDTWA.jpg")])
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 3
    # Image files are one line of the database summary per default method, and a missing delta
    # (the default Blur IG x Grad-CAM has none) is a dash.
    explain.print_summary(ExplanationDB(db).summary())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" " * 17 + "lightcnn")]
    defaults = sorted(explain.ExplainConfig().methods.split(","))
    assert len(lines) == len(defaults) and all(" files " in line for line in lines) and "nan" not in " ".join(lines)
    assert "sha256:" not in " ".join(lines) and [line.split()[2] for line in lines] == defaults
    assert any(line.split()[-1] == "-" for line in lines)


def test_another_models_predictions_csv_is_left_alone(tmp_path):
    out = tmp_path / "files"
    first, kept = explain.write_predictions(out, [{"path": "a.png", "predicted": "x", "score_x": 1.0}])
    assert (first.name, kept) == ("predictions.csv", 0)
    other, kept = explain.write_predictions(out, [{"path": "b.png", "predicted": "y", "score_y": 1.0}])
    assert (other.name, kept) == ("predictions-2.csv", 0)
    assert [r["path"] for r in csv.DictReader(open(first))] == ["a.png"]


# ----------------------------------------------------------------------------- 6: figures

def test_the_tile_grid_keeps_its_own_title_and_every_map_has_a_colour_scale(monkeypatch, tmp_path):
    saved = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, title=None: saved.update(fig=fig, title=title))
    rng = np.random.default_rng(0)
    rows = [{"full": rng.integers(0, 256, (56, 56, 3), dtype=np.uint8), "small": np.zeros((28, 28, 3), np.uint8),
             "title": f"tile{k}.png\npred: debris (0.50)", "wrong": False,
             "maps": {"ig": (rng.normal(size=(3, 28, 28)), "debris"), "gradcam": (rng.random((14, 14)), "debris")}}
            for k in range(2)]
    figures.plot_tiles(rows, tmp_path / "grid.png", "LightCNN: 2 image files")
    assert saved["title"] == "LightCNN: 2 image files"
    fig = saved["fig"]
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 4  # IG and Grad-CAM, both rows
    assert fig.axes[0].get_title().startswith("tile0.png")


def test_the_sanity_axis_counts_blocks_instead_of_naming_modules():
    labels = figures.sanity_stage_labels(7)
    assert labels[0] == "none" and labels[1].startswith("1") and labels[-1] == "6\n(all)"
    assert not any("." in label for label in labels)
    assert len([t for t in figures.sanity_stage_labels(54) if t]) <= 15  # ResNet-50's stages stay legible


def test_gradcam_on_blank_tissue_is_flagged_as_a_padding_frame(shared_data, lightcnn_with_fitted_head):
    net = M.inference_copy(lightcnn_with_fitted_head(300, 1e-2, 200))
    layer = M.gradcam_layer(net, "lightcnn")
    real = torch.from_numpy(np.load(shared_data / "pathmnist28_real_test718.npz")["test_images"][:8]).permute(0, 3, 1, 2)
    blank = torch.full((2, 3, 28, 28), 240, dtype=torch.uint8)  # background: nothing varies inside
    x = D.normalize(torch.cat([blank, real]))
    with torch.no_grad():
        predicted = net(x).argmax(1)
    out = METHODS["gradcam"].attribute(net, layer, x, predicted, AttributionSettings(), np.zeros(len(x), np.int64))
    flags = [figures.padding_frame(m) for m in out.raw.detach().numpy()]
    assert flags[:2] == [True, True] and not any(flags[2:]), flags


# ----------------------------------------------------------------------------- 7: the report

def test_report_speaks_in_words_and_names_the_run_not_the_link(tmp_path):
    rows = [{"method": "ig", "name": "deletion_auc", "value": 0.1, "n": 5, "detail": {"random": 0.2}},
            {"method": None, "name": "agreement_ig_gradcam", "value": 0.3, "n": 5, "detail": {}}]
    table = gallery.summary_table(rows)
    assert "agreement_ig_gradcam" not in table and "deletion_auc" not in table
    assert "IG vs Grad-CAM agreement" in table and "↓ lower is better" in table and "↑ higher is better" in table
    run = tmp_path / "synthetic-lightcnn-28-20261202"
    run.mkdir()
    (tmp_path / "latest").symlink_to(run.name)
    assert explain.run_name(str(tmp_path / "latest" / "best.pt")) == run.name


# ----------------------------------------------------------------------------- 8: quiet and noisy

def test_progress_in_a_log_file_is_plain_lines(capsys):
    runtime.progress(iter([10, 10, 5]), 25, "ig", "maps", every_s=0.0)
    err = capsys.readouterr().err
    assert not sys.stderr.isatty() and "\r" not in err
    assert err.splitlines()[-1].startswith("ig: 25/25 maps (") and len(err.splitlines()) == 3
    runtime.progress(iter([10, 10, 5]), 25, "ig", "maps", every_s=1e6)  # the first chunk, then the end
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("ig: 10/25 maps (") and "s left)" in lines[0]


@pytest.mark.parametrize("select", ["last", "best"])
def test_the_epoch_star_only_marks_a_selection(select, tmp_path, capsys):
    train.main([*TRAIN, "--epochs", "2", "--select", select, "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    if select == "last":
        assert not any(line.endswith("*") for line in epochs) and "* marks" not in out
    else:
        assert epochs[0].endswith("*") and "* marks an epoch with a new best validation acc" in out


def test_ctrl_c_inside_torch_save_stays_an_interrupt(tmp_path, monkeypatch):
    """Found by .ci/run: a Ctrl-C landing inside torch.save made its zip writer raise RuntimeError on
    the way out, so the run ended in a traceback instead of exit 130 and a resume hint."""
    def interrupted_save(obj, f):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    monkeypatch.setattr(M.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert list(tmp_path.iterdir()) == []  # no half-written file left behind

