"""Evaluate a trained classifier (or a saved score file) on one MedMNIST split.

Reports MedMNIST's official ACC/AUC (identical to medmnist.evaluator.getACC/getAUC) plus per-class
precision/recall/F1, balanced accuracy, expected calibration error and NLL, and writes the metrics
JSON, MedMNIST's standard score file and figures (confusion matrix, ROC curves, sample predictions).

Usage:
    # a checkpoint from train.py, on its own test split; outputs go to the run folder
    python evaluate.py --checkpoint runs/latest/best.pt --split test
    # a model trained on real PathMNIST images, on another file of them
    python evaluate.py --checkpoint RUN/best.pt --data-dir ../shared/data/pathmnist28_real_test718.npz
    # a score CSV (save_results format with labels, or MedMNIST's headerless format + --dataset)
    python evaluate.py --predictions ../shared/data/reference_resnet_scores_test.csv --out eval/reference
    # ... and its accuracy under stain, colour, blur and JPEG changes (figures and JSON next to it)
    python evaluate.py --checkpoint RUN/best.pt --stain-shift
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data import SIZES, SPLITS, DataError
from figures import plot_perturbation_examples, plot_stain_shift
from metrics import as_label_vector
from model import CheckpointError
from report import score_checkpoint, score_file, write_report
from robustness import print_shift, stain_shift
from runtime import AMP_CHOICES, exit_with_one_line, exit_with_usage, parse_args, resolve_device
from scores import ScoresFileError


@dataclass
class EvalConfig:
    checkpoint: str = field(default="runs/latest/best.pt", metadata={
        "help": "checkpoint from train.py; the model and its data settings are rebuilt from it"})
    predictions: str = field(default="", metadata={
        "help": "score CSV to evaluate instead of a checkpoint (save_results or MedMNIST format)"})
    split: str = field(default="test", metadata={"help": "split to evaluate", "choices": SPLITS})
    data_dir: str = field(default="", metadata={
        "help": "data directory or .npz file; empty = the one recorded in the checkpoint"})
    dataset: str = field(default="pathmnist", metadata={
        "help": "MedMNIST flag, used with --predictions (task, class names, labels if the CSV has none)"})
    size: int = field(default=28, metadata={"help": "image size, used with --predictions", "choices": SIZES})
    batch_size: int = field(default=128, metadata={"min": 1, "help": "inference batch (128 stays in a CPU's cache)"})
    amp: str = field(default="auto", metadata={"help": "bf16 (CPU) / fp16 (CUDA) autocast; auto: where the hardware has it; off: float32", "choices": AMP_CHOICES})
    out: str = field(default="", metadata={
        "help": "output folder; empty = the checkpoint's run folder (with --predictions: eval)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    run: str = field(default="", metadata={
        "help": "run name in the MedMNIST score file name; empty = the output folder's name"})
    tta: bool = field(default=False, metadata={"help": "test-time augmentation: mean probability over the 8 flips and 90-degree rotations"})
    stain_shift: bool = field(default=False, metadata={"help": "also measure accuracy under 15 stain and acquisition changes (stain, each direction of brightness, contrast and saturation, hue, defocus and motion blur, pixelation, JPEG, ink and air bubbles) at severities 0-5, and their worst family (robustness.py)"})
    shift_seed: int = field(default=0, metadata={"min": 0, "help": "--stain-shift: seeds the perturbations"})

    def check(self) -> str | None:
        if self.predictions and (self.stain_shift or self.tta):
            return "--stain-shift and --tta need a model: pass --checkpoint, not --predictions"
        return None


def main(argv: list[str] | None = None) -> dict:
    cfg, given = parse_args(EvalConfig, argv, description=__doc__.split("\n")[0])
    if not cfg.predictions and given & {"size", "dataset"}:
        # A checkpoint carries its dataset and size; silently ignoring these would mislead.
        exit_with_usage(f"--size and --dataset describe a score file (--predictions); the checkpoint "
                        f"{cfg.checkpoint} carries its own: drop them, or pass a data file of the model's size")
    # Scores and labels: from a score file, or by running the checkpoint's model on the split.
    if cfg.predictions:
        scored = score_file(cfg.predictions, cfg.split, cfg.dataset, cfg.size, cfg.data_dir)
    else:
        scored = score_checkpoint(cfg.checkpoint, cfg.split, cfg.batch_size, cfg.amp, cfg.device, cfg.data_dir,
                                  tta=cfg.tta)
    # Metrics, MedMNIST's score file and the figures, next to the checkpoint unless --out says.
    out = Path(cfg.out) if cfg.out else scored.default_out
    metrics = write_report(scored, out, cfg.run, asdict(cfg))
    # Robustness: the same images under stain and acquisition changes.
    if cfg.stain_shift:
        write_stain_shift(cfg, scored, out)
    return metrics


def write_stain_shift(cfg: EvalConfig, scored, out: Path) -> dict:
    """{split}_stain_shift.json, images/stain_shift.png and images/stain_shift_examples.png."""
    result = stain_shift(scored.model, scored.images, as_label_vector(scored.labels), cfg.batch_size, resolve_device(cfg.device),
                         cfg.amp, cfg.shift_seed, cfg.tta, scored.stain)
    print_shift(result)
    path = out / f"{cfg.split}_stain_shift.json"
    path.write_text(json.dumps({"split": cfg.split, "source": scored.source, "config": asdict(cfg), **result}, indent=2) + "\n")
    what = f"{scored.name} {cfg.split} split"
    plot_stain_shift(result, out / "images" / "stain_shift.png", f"accuracy under stain and acquisition changes ({what})")
    first = [int(np.flatnonzero(as_label_vector(scored.labels) == c)[0]) for c in np.unique(as_label_vector(scored.labels))[:2]]
    plot_perturbation_examples(scored.images[first], result, out / "images" / "stain_shift_examples.png",
                               f"what each severity does: two {what} images")
    print(f"wrote {path} and {out / 'images'}/stain_shift*.png")
    return result


if __name__ == "__main__":
    exit_with_one_line(main, (DataError, CheckpointError, ScoresFileError))
