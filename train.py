"""Train a classifier on PathMNIST (or any 2D MedMNIST flag, or synthetic data) and evaluate it.

    python train.py                                        # LightCNN on PathMNIST 28x28
    python train.py --dataset synthetic --epochs 10        # offline, on generated data
    python train.py --model resnet50 --size 64 --amp       # ResNet-50 on PathMNIST 64x64
    python train.py --resume runs/latest                   # continue an interrupted run

The model is selected on the validation split (early stopping, best checkpoint); the test split is
read only after training, to report the selected checkpoint once. A run folder holds config.json,
metrics.csv (a row per epoch), last.pt, best.pt, test metrics and images/.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
from data import SIZES, DataError, augment, batches, dataset_choices, load_data, normalize
from model import (MODELS, CheckpointError, build_model, count_flops, parse_config, read_checkpoint,
                   resolve_device, save_checkpoint, set_seed)


@dataclass
class TrainConfig:
    dataset: str = field(default="pathmnist", metadata={"help": "MedMNIST 2D flag, or 'synthetic' (offline, generated)"})
    size: int = field(default=28, metadata={"help": "image side", "choices": SIZES})
    data_dir: str = field(default="data", metadata={"help": "folder with MedMNIST .npz files (downloaded if missing), or one .npz file"})
    model: str = field(default="lightcnn", metadata={"help": "network", "choices": MODELS})
    pretrained: bool = field(default=False, metadata={"help": "start resnet50 from ImageNet weights (downloads them)"})
    epochs: int = field(default=25, metadata={"help": "maximum epochs (the seed's 25)"})
    batch_size: int = field(default=128, metadata={"help": "training batch; 128 keeps BatchNorm statistics stable and CPUs busy"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (the seed's)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "Adam L2 penalty; small, the network already has dropout"})
    patience: int = field(default=6, metadata={"help": "early stopping: epochs without validation improvement"})
    monitor: str = field(default="acc", metadata={"help": "validation metric that selects best.pt", "choices": ("acc", "auc")})
    augment: bool = field(default=True, metadata={"help": "flips, 90-degree and small rotations on each batch"})
    seed: int = field(default=0, metadata={"help": "seeds weights, data order, augmentation and synthetic data"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    amp: bool = field(default=False, metadata={"help": "mixed precision: fp16 on CUDA, bf16 on CPU"})
    eval_batch_size: int = field(default=512, metadata={"help": "batch for validation and test inference"})
    out: str = field(default="", metadata={"help": "run folder (default runs/DATASET-MODEL-SIZE-TIME)"})
    resume: str = field(default="", metadata={"help": "run folder to continue from its last.pt (its config is reused; --epochs may extend it)"})

    def check(self) -> str | None:
        if self.dataset not in dataset_choices():
            return f"unknown dataset {self.dataset!r}; choose one of {', '.join(dataset_choices())}"
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                return f"--{name.replace('_', '-')} must be at least 1"
        if not (self.lr > 0 and self.weight_decay >= 0 and self.patience >= 1):
            return "--lr must be > 0, --weight-decay >= 0 and --patience >= 1"
        return None


# Flags that --resume takes from the command line rather than from the run's config.
RESUME_OVERRIDES = ("epochs", "lr", "patience", "amp", "device", "eval_batch_size")


def train_one_epoch(model, split, optimizer, scaler, autocast, generator, cfg, device, desc) -> dict:
    """One pass over the training split in a random order; returns loss, accuracy and speed."""
    model.train()
    multilabel = split.labels.ndim == 2
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, t0 = 0, time.perf_counter()
    for idx in tqdm(batches(len(split), cfg.batch_size, True, generator), desc=desc, leave=False, disable=None):
        if len(idx) < 2:  # a one-image batch would make BatchNorm's batch statistics pure noise
            continue
        idx = idx.to(device)
        x = normalize(split.images[idx])
        if cfg.augment:
            x = augment(x, generator)
        y = split.labels[idx]
        with autocast:
            logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = (F.binary_cross_entropy_with_logits(logits.float(), y.float()) if multilabel
                else F.cross_entropy(logits.float(), y))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at {desc}; last.pt keeps the last good "
                                     f"epoch: resume with a lower --lr, or without --amp")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(idx)
        pred = logits.detach() > 0 if multilabel else logits.detach().argmax(1)
        correct += (pred == y).float().mean(-1).sum() if multilabel else (pred == y).sum()
        seen += len(idx)
    seconds = time.perf_counter() - t0
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen, "seconds": seconds,
            "images_per_s": seen / seconds}


def validate(model, split, data, cfg, device) -> dict:
    """Loss, accuracy and AUC on a held-out split, from the same predict() evaluate.py uses."""
    scores = evaluate.predict(model, split.images, cfg.eval_batch_size, device, data.task)
    y = split.labels.numpy()
    m = evaluate.compute_metrics(y, scores, data.task, data.class_names)
    p = np.clip(scores, 1e-12, 1 - 1e-7)
    loss = (-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean() if y.ndim == 2
            else -np.log(p[np.arange(len(y)), y]).mean())
    return {"loss": float(loss), "acc": m["acc"], "auc": m["auc"]}


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, training vs validation."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "acc")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label="train (augmented)")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel({"loss": "cross-entropy loss", "acc": "accuracy"}[key])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(TrainConfig, argv, description=__doc__.split("\n")[0])
    resume_ckpt = None
    if cfg.resume:
        resume_ckpt = read_checkpoint(Path(cfg.resume) / "last.pt")
        # The run's own config, except the knobs that may change mid-run when given on the command line.
        given = {k: getattr(cfg, k) for k in RESUME_OVERRIDES if getattr(cfg, k) != getattr(TrainConfig(), k)}
        cfg = TrainConfig(**{**resume_ckpt["config"], **given, "resume": cfg.resume, "out": cfg.resume})
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.out or _new_run_dir(f"runs/{cfg.dataset}-{cfg.model}-{cfg.size}-{time.strftime('%Y%m%d-%H%M%S')}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    _point_latest(run_dir)

    # Data: train and validation only; the test split is not read until training is over.
    data = load_data(cfg.dataset, cfg.size, cfg.data_dir, ("train", "val"), seed=cfg.seed)
    train, val = (data.splits[s] for s in ("train", "val"))
    train.images, train.labels = train.images.to(device), train.labels.to(device)
    print(f"data: {data.source}: {len(train)} train / {len(val)} val images, {data.num_classes} classes")

    # Model, optimiser, schedule.
    model = build_model(cfg.model, data.n_channels, data.num_classes, cfg.size, cfg.pretrained)
    print(f"model: {cfg.model}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{count_flops(model, (data.n_channels, cfg.size, cfg.size)) / 1e6:.1f} M MACs per image")
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    autocast = torch.autocast(device.type, dtype=amp_dtype) if cfg.amp else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation
    arch = {"in_channels": data.n_channels, "num_classes": data.num_classes, "task": data.task,
            "class_names": data.class_names, "flag": data.flag, "data_source": data.source}

    start, best, stale, rows = 1, -math.inf, 0, []
    if resume_ckpt:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        for group in optimizer.param_groups:  # a --lr given on resume wins over the saved one
            group["lr"] = cfg.lr if "lr" in given else group["lr"]
        torch.set_rng_state(resume_ckpt["rng"]["torch"])
        generator.set_state(resume_ckpt["rng"]["data"])
        start, best, stale = resume_ckpt["epoch"] + 1, resume_ckpt["best_metric"], resume_ckpt["stale_epochs"]
        rows = _read_metrics(run_dir / "metrics.csv")[: resume_ckpt["epoch"]]
        print(f"resumed {run_dir} after epoch {resume_ckpt['epoch']} (best val {cfg.monitor} {best:.4f})")

    for epoch in range(start, cfg.epochs + 1):
        if stale >= cfg.patience:
            print(f"early stop: validation {cfg.monitor} has not improved for {stale} epochs")
            break
        tr = train_one_epoch(model, train, optimizer, scaler, autocast, generator, cfg, device,
                             f"epoch {epoch}/{cfg.epochs}")
        va = validate(model, val, data, cfg, device)
        scheduler.step(va["loss"])
        score = va[cfg.monitor] if math.isfinite(va[cfg.monitor]) else -math.inf  # AUC is NaN if a class is absent
        improved = score > best or not (run_dir / "best.pt").exists()
        best, stale = (score, 0) if improved else (best, stale + 1)
        rows.append({"epoch": epoch, **{f"train_{k}": v for k, v in tr.items() if k in ("loss", "acc")},
                     **{f"val_{k}": v for k, v in va.items()}, "lr": optimizer.param_groups[0]["lr"],
                     "seconds": tr["seconds"], "images_per_s": tr["images_per_s"]})
        _write_metrics(run_dir / "metrics.csv", rows)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "best_metric": best,
                 "stale_epochs": stale, "config": asdict(cfg), "arch": arch,
                 "rng": {"torch": torch.get_rng_state(), "data": generator.get_state()}}
        save_checkpoint(run_dir / "last.pt", state)
        if improved:
            save_checkpoint(run_dir / "best.pt", state)
        print(f"epoch {epoch:3d} | train loss {tr['loss']:.4f} acc {tr['acc']:.4f} | val loss {va['loss']:.4f} "
              f"acc {va['acc']:.4f} auc {va['auc']:.4f} | lr {rows[-1]['lr']:.1e} | "
              f"{tr['seconds']:.1f}s {tr['images_per_s']:.0f} img/s{' *' if improved else ''}")

    plot_curves(rows, run_dir / "images" / "training_curves.png",
                f"{cfg.model} on {data.source}")
    # The one look at the test split: the checkpoint selected on validation.
    print(f"best checkpoint (val {cfg.monitor} {best:.4f}) on the test split:")
    evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--device", str(device),
                   "--batch-size", str(cfg.eval_batch_size)])
    return run_dir


def _new_run_dir(name: str) -> Path:
    """A run folder no other run uses, even one started in the same second."""
    path, n = Path(name), 1
    while path.exists():
        n += 1
        path = Path(f"{name}-{n}")
    return path


def _point_latest(run_dir: Path) -> None:
    """runs/latest -> the newest run, so `python evaluate.py` finds it without arguments."""
    link = run_dir.parent / "latest"
    with contextlib.suppress(OSError):
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            link.symlink_to(run_dir.name)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if k != "epoch" else int(v) for k, v in r.items()} for r in csv.DictReader(f)]


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
