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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from data import SIZES, SPLITS, DataError
from model import CheckpointError
from report import score_checkpoint, score_file, write_report
from runtime import AMP_CHOICES, exit_with_one_line, parse_config
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


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(EvalConfig, argv, description=__doc__.split("\n")[0])
    # Scores and labels: from a score file, or by running the checkpoint's model on the split.
    if cfg.predictions:
        scored = score_file(cfg.predictions, cfg.split, cfg.dataset, cfg.size, cfg.data_dir)
    else:
        scored = score_checkpoint(cfg.checkpoint, cfg.split, cfg.batch_size, cfg.amp, cfg.device, cfg.data_dir)
    # Metrics, MedMNIST's score file and the figures, next to the checkpoint unless --out says.
    return write_report(scored, Path(cfg.out) if cfg.out else scored.default_out, cfg.run, asdict(cfg))


if __name__ == "__main__":
    exit_with_one_line(main, (DataError, CheckpointError, ScoresFileError))
