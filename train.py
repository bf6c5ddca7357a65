"""Train a classifier on PathMNIST (or any 2D MedMNIST flag, or synthetic data) and evaluate it.

    python train.py                                        # LightCNN on PathMNIST 28x28
    python train.py --dataset synthetic --epochs 10        # offline, on generated data
    python train.py --model resnet50 --size 64             # ResNet-50 on PathMNIST 64x64
    python train.py --resume runs/latest                   # continue an interrupted run
    torchrun --nproc_per_node 4 train.py --model resnet50  # 4 GPUs; --batch-size is per GPU

best.pt holds the selected weights: by default the last epoch's, where the cosine schedule ends
(--select last), or the epoch with the best validation metric, with early stopping (--select best).
The test split is read only after training, to report the selected checkpoint once. A run folder
holds config.json, metrics.csv (a row per epoch), last.pt, best.pt, test metrics and images/.

Faults: checkpoints are written atomically at the end of each epoch, and every random draw of an
epoch is seeded from (seed, epoch, rank), so a run killed at any moment (Ctrl-C exits with 130
and says how to resume) and continued with --resume ends with the same weights and metrics as one
never stopped: bit for bit on CPU; on CUDA up to what non-deterministic kernels change.
Under torchrun each process trains on its own share of every epoch and DDP averages gradients;
BatchNorm statistics stay per process; rank 0 alone validates, prints and writes files.
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

import torch
from torch.nn.parallel import DistributedDataParallel

from data import BINARY, SIZES, TASKS, DataError, Remedies, dataset_choices, load_data, parse_split_sizes
from figures import plot_training_curves
from model import MODELS, CheckpointError, build_model, count_flops, read_checkpoint, save_checkpoint
from report import score_checkpoint, write_csv, write_report
from runtime import (AMP_CHOICES, amp_dtype, autocast, distributed, exit_on_interrupt, exit_with_one_line,
                     from_rank0, parse_args, precision_name, set_seed)
from stainnorm import fit as stain_fit
from stainnorm import normalise as normalise_stain
from training import (Recipe, epoch_recipe, make_ema, make_optimizer, make_scheduler, passes_per_epoch, resume_schedule,
                      seed_epoch, step_schedule, steps_per_epoch, train_one_epoch, validate)


@dataclass
class TrainConfig(Recipe):
    dataset: str = field(default="pathmnist", metadata={"help": "MedMNIST 2D flag, or 'synthetic' (offline, generated)"})
    synthetic_sizes: str = field(default="10000,2000,2000", metadata={"help": "train,val,test images of --dataset synthetic (tiny ones make quick tests)"})
    size: int = field(default=28, metadata={"help": "image side", "choices": SIZES})
    data_dir: str = field(default="data", metadata={"help": "folder with MedMNIST .npz files (downloaded if missing), or one .npz file"})
    task: str = field(default="classes", metadata={"help": "labels to learn: the flag's own classes, or tumor: PathMNIST's adenocarcinoma epithelium (cancer) vs the other eight classes (non-cancer; stroma included), a binary task", "choices": TASKS})
    model: str = field(default="lightcnn", metadata={"help": "network", "choices": MODELS})
    pretrained: bool = field(default=False, metadata={"help": "start resnet50 from ImageNet weights (downloads them)"})
    patience: int = field(default=6, metadata={"min": 1, "help": "with --select best, early stopping after this many epochs without validation improvement"})
    monitor: str = field(default="auto", metadata={"help": "validation metric that --select best selects best.pt on and stops early on; auto: AUC for a binary task (--task tumor: a model that calls everything non-cancer already scores 0.83 accuracy on the 718 real test images, so accuracy cannot tell a learning model from it), accuracy otherwise", "choices": ("auto", "acc", "auc")})
    seed: int = field(default=0, metadata={"min": 0, "help": "seeds weights, data order, augmentation and synthetic data"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ... (under torchrun: cuda:LOCAL_RANK)"})
    tta: bool = field(default=False, metadata={"help": "final test with test-time augmentation (mean over the 8 flips/rotations)"})
    out: str = field(default="", metadata={"help": "run folder (default runs/DATASET-MODEL-SIZE-TIME)"})
    resume: str = field(default="", metadata={"help": "run folder to continue from its last.pt (its config is reused; --epochs may extend it)"})

    def check(self) -> str | None:
        if not self.seed < 2**32:
            return "--seed must be in [0, 2**32)"
        if self.amp not in AMP_CHOICES:
            return f"--amp must be one of {', '.join(AMP_CHOICES)}"
        if parse_split_sizes(self.synthetic_sizes) is None:
            return f"--synthetic-sizes {self.synthetic_sizes!r}: give three positive integers, e.g. 10000,2000,2000"
        if self.shift >= self.size:
            return f"--shift {self.shift} must be smaller than the image side (--size {self.size})"
        if self.dataset not in dataset_choices():
            return f"unknown dataset {self.dataset!r}; choose one of {', '.join(dataset_choices())}"
        return None


# Flags that --resume takes from the command line rather than from the run's config.
RESUME_OVERRIDES = ("epochs", "lr", "patience", "amp", "device", "eval_batch_size")


def main(argv: list[str] | None = None) -> Path:
    cfg, given = parse_args(TrainConfig, argv, description=__doc__.split("\n")[0])
    resume_ckpt = None
    if cfg.resume:
        cfg, resume_ckpt = resume_config(cfg, given)
    set_seed(cfg.seed)
    with distributed(cfg.device) as (device, rank, world):
        log = print if rank == 0 else _silent
        # Data: train and validation only; the test split is not read until training is over.
        data, train, val = load_train_val(cfg, device, world, log)
        monitor = cfg.monitor if cfg.monitor != "auto" else "auc" if data.task == BINARY else "acc"
        if "patience" in given and cfg.select == "last":
            log("note: --patience stops early only with --select best; this run keeps its last epoch")

        # Model, optimiser, schedule; a resumed run's state. All checked before anything is written.
        net, optimizer, scheduler, mixed, scaler = build_training(cfg, data, device, pretrained=not resume_ckpt, log=log)
        # With --ema the average is what is validated, kept in best.pt and tested.
        passes = passes_per_epoch(len(train), cfg, world)
        if passes > 1:
            log(f"an epoch is {passes} passes over the {len(train)} training images: at least --epoch-steps "
                f"{cfg.epoch_steps} optimiser steps")
        ema = make_ema(net, cfg, steps_per_epoch(len(train), cfg, world))
        kept = net if ema is None else ema.module
        start, best, stale = 1, -math.inf, 0
        if resume_ckpt:
            start, best, stale = restore(resume_ckpt, Path(cfg.resume) / "last.pt", net, optimizer,
                                         scheduler, cfg.lr if "lr" in given else None, ema)
        run_dir, rows = open_run_folder(cfg, rank, resume_ckpt)
        with exit_on_interrupt(lambda: _resume_hint(run_dir), quiet=rank != 0):
            if resume_ckpt:
                log(f"resumed {run_dir} after epoch {resume_ckpt['epoch']} (best val {monitor} {best:.4f})")
            model = net
            if torch.distributed.is_initialized():  # torchrun: gradients averaged over all processes at every step
                model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

            if cfg.select == "best":
                log(f"* marks an epoch with a new best validation {monitor}: its weights are written to best.pt")
            for epoch in range(start, cfg.epochs + 1):
                if stale >= cfg.patience:
                    log(f"early stop: validation {monitor} has not improved for {stale} epochs")
                    break
                order, generator = seed_epoch(cfg.seed, epoch, len(train), rank, world, passes)
                tr = train_one_epoch(model, train, order, optimizer, scaler, mixed, generator,
                                     epoch_recipe(cfg, epoch), f"epoch {epoch}/{cfg.epochs}", progress=rank == 0, ema=ema)
                # Rank 0 validates; every rank takes its result, so all step and stop together.
                va, trained_loss = from_rank0(validation(net, kept, val, data, cfg, device) if rank == 0 else None)
                if not math.isfinite(va["loss"]):
                    raise FloatingPointError(f"validation loss became {va['loss']} after epoch {epoch}; last.pt "
                                             f"keeps the last good epoch: resume with a lower --lr, or without --amp")
                rows.append(epoch_row(epoch, tr, va, optimizer))  # with the rate this epoch trained at
                step_schedule(scheduler, trained_loss)
                score = va[monitor] if math.isfinite(va[monitor]) else -math.inf  # AUC is NaN if a class is absent
                improved = score > best or epoch == 1 or cfg.select == "last"
                best, stale = (score, 0) if improved else (best, stale + 1)
                if rank == 0:
                    state = {"model": kept.state_dict(), "optimizer": optimizer.state_dict(),
                             **({} if ema is None else {"trained_model": net.state_dict(), "ema_steps": int(ema.n_averaged)}),
                             "scheduler": scheduler.state_dict(), "epoch": epoch, "best_metric": best,
                             "stale_epochs": stale, "config": asdict(cfg), "arch": data_arch(data),
                             # A record only: the next epoch reseeds (seed_epoch), resumed or not.
                             "rng": {"torch": torch.get_rng_state(), "data": generator.get_state()}}
                    save_epoch(run_dir, rows, state, improved)
                log(f"epoch {epoch:3d} | train loss {tr['loss']:.4f} acc {tr['acc']:.4f} | val loss {va['loss']:.4f} "
                    f"acc {va['acc']:.4f} auc {va['auc']:.4f} | lr {rows[-1]['lr']:.1e} | "
                    f"{tr['seconds']:.1f}s {tr['images_per_s']:.0f} img/s{' *' if improved and cfg.select == 'best' else ''}")

            if rank == 0:
                plot_training_curves(rows, run_dir / "images" / "training_curves.png", f"{cfg.model} on {data.source}")
                # The one look at the test split: the selected checkpoint.
                print(f"selected checkpoint (--select {cfg.select}: val {monitor} {best:.4f}) on the test split:")
                checkpoint = str(run_dir / "best.pt")
                scored = score_checkpoint(checkpoint, "test", cfg.eval_batch_size, cfg.amp, str(device), tta=cfg.tta)
                write_report(scored, run_dir, "", {"checkpoint": checkpoint, "split": "test", "amp": cfg.amp, "tta": cfg.tta,
                                                   "batch_size": cfg.eval_batch_size, "device": str(device)})
    return run_dir


def validation(net, kept, val, data, cfg, device) -> tuple[dict, float]:
    """The kept weights' validation metrics, and the loss the schedule watches: the trained
    weights' own (the average's lags behind them, and would halve the rate too early)."""
    va = validate(kept, val, data, cfg, device)
    return va, va["loss"] if kept is net or cfg.schedule != "plateau" else validate(net, val, data, cfg, device)["loss"]


def load_train_val(cfg: TrainConfig, device, world: int, log):
    """(data, train split on the device, validation split) of the run's dataset."""
    remedies = Remedies(split=f"training needs train and val splits: make them from a one-split file with "
                              f"python data.py {cfg.data_dir} SPLIT.npz, then pass --data-dir SPLIT.npz",
                        size="pass the images' size with --size")
    data = load_data(cfg.dataset, cfg.size, cfg.data_dir, ("train", "val"), seed=cfg.seed,
                     synthetic_sizes=parse_split_sizes(cfg.synthetic_sizes), task=cfg.task, remedies=remedies)
    train, val = (data.splits[s] for s in ("train", "val"))
    if len(train) // world < 2:
        raise DataError(f"{data.source}: {len(train)} training images are too few for {world} "
                        f"process(es); use more images or fewer processes")
    if cfg.stain_norm != "none":  # fitted on the training images; validation is normalised as it is scored
        if data.n_channels != 3:
            raise DataError(f"{data.source}: --stain-norm needs RGB (H&E) images, these have {data.n_channels} "
                            "channel(s); leave it out")
        try:
            data.stain_norm = stain_fit(cfg.stain_norm, train.images, cfg.seed)
        except ValueError as e:
            raise DataError(f"{data.source}: {e}; train with --stain-norm reinhard or none") from None
        train.images = normalise_stain(train.images, data.stain_norm)
        log(f"stain: every image normalised to the training split's ({cfg.stain_norm})")
    train.images, train.labels = train.images.to(device), train.labels.to(device)
    log(f"data: {data.source}: {len(train)} train / {len(val)} val images, {data.num_classes} classes")
    return data, train, val


def build_training(cfg: TrainConfig, data, device, pretrained: bool, log):
    """Network, optimiser, schedule, autocast context and gradient scaler. A resumed run passes
    pretrained=False: its weights come from last.pt, so ImageNet's are not downloaded again."""
    net = build_model(cfg.model, data.n_channels, data.num_classes, cfg.size, cfg.pretrained and pretrained)
    log(f"model: {cfg.model}, {sum(p.numel() for p in net.parameters()):,} parameters, "
        f"{count_flops(net, (data.n_channels, cfg.size, cfg.size)) / 1e6:.1f} M MACs per image")
    net = net.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(net, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs)
    dtype = amp_dtype(cfg.amp, device)
    log(f"precision: {precision_name(dtype)} on {device} (--amp {cfg.amp})")
    return (net, optimizer, scheduler, autocast(device, dtype),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def data_arch(data) -> dict:
    """What a checkpoint records of its data, so that evaluate.py and explain.py rebuild the model."""
    return {"in_channels": data.n_channels, "num_classes": data.num_classes, "task": data.task,
            "class_names": data.class_names, "flag": data.flag, "data_source": data.source,
            **({"stain_norm": data.stain_norm} if data.stain_norm else {})}


def epoch_row(epoch: int, tr: dict, va: dict, optimizer) -> dict:
    """One metrics.csv row."""
    return {"epoch": epoch, **{f"train_{k}": v for k, v in tr.items() if k in ("loss", "acc")},
            **{f"val_{k}": v for k, v in va.items()}, "lr": optimizer.param_groups[0]["lr"],
            "seconds": tr["seconds"], "images_per_s": tr["images_per_s"]}


# ------------------------------------------------------------------------------------------------
# Resume, run folder, checkpoints

def resume_config(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict]:
    """The run's own config and its last.pt, with the RESUME_OVERRIDES that the command line
    gives (`given`: the flags typed, whatever their value). A checkpoint that does not fit is a
    CheckpointError."""
    path = Path(cfg.resume) / "last.pt"
    ckpt = read_checkpoint(path)
    overrides = {k: getattr(cfg, k) for k in RESUME_OVERRIDES if k in given}
    try:
        saved = {**ckpt["config"]}
        if isinstance(saved.get("amp"), bool):  # runs from before --amp auto
            saved["amp"] = "on" if saved["amp"] else "off"
        saved.setdefault("rotate", 10.0)  # runs from before --rotate rotated by up to 10 degrees ...
        saved.setdefault("stain_jitter", 0.0)  # ... and had no stain jitter, weight average or schedule choice
        saved.setdefault("ema", 0.0)
        saved.setdefault("schedule", "plateau")
        saved.setdefault("select", "best")  # ... and kept their best validation epoch, without shifts
        saved.setdefault("shift", 0)
        saved.setdefault("epoch_steps", 1)  # ... and made one pass per epoch however small the data
        saved.setdefault("stain_norm", "none")
        resumed = TrainConfig(**{**saved, **overrides, "resume": cfg.resume, "out": cfg.resume})
        problem = resumed.check()
    except (TypeError, ValueError) as e:
        problem = str(e)
    if problem:
        raise CheckpointError(f"{path}: its config does not describe a run of this train.py ({problem}); "
                              f"pass a run folder written by train.py")
    return resumed, ckpt


def restore(ckpt: dict, path: Path, net, optimizer, scheduler, lr: float | None, ema=None) -> tuple[int, float, int]:
    """Load last.pt into the model, its weight average, optimiser and schedule (a given `lr` wins
    over the saved one); returns (first epoch to run, best validation metric, epochs without
    improvement)."""
    try:
        net.load_state_dict(ckpt.get("trained_model", ckpt["model"]))
        if ema is not None:
            ema.module.load_state_dict(ckpt["model"])
            ema.n_averaged.fill_(int(ckpt.get("ema_steps", 1)))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start, best, stale = int(ckpt["epoch"]) + 1, float(ckpt["best_metric"]), int(ckpt["stale_epochs"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: does not fit the {type(net).__name__} its config describes ({first}); "
                              f"it is from another model or damaged: resume another run or start a new one") from None
    for group in optimizer.param_groups:
        group["lr"] = lr if lr is not None else group["lr"]
    resume_schedule(scheduler, optimizer, lr)
    return start, best, stale


def open_run_folder(cfg: TrainConfig, rank: int, resumed: dict | None) -> tuple[Path, list[dict]]:
    """Rank 0 creates (or reopens) the run folder, writes config.json and points runs/latest at it.
    Returns its path, on every rank, and on rank 0 the metrics rows of the epochs in last.pt."""
    run_dir, rows = None, []
    if rank == 0:
        run_dir = Path(cfg.out or _new_run_dir(f"runs/{cfg.dataset}-{cfg.model}-{cfg.size}-{time.strftime('%Y%m%d-%H%M%S')}"))
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=2))
        _point_latest(run_dir)
        if resumed:
            rows = _read_metrics(run_dir / "metrics.csv")[: resumed["epoch"]]  # drops rows written past it
            _catch_up_best(run_dir, resumed)
    return Path(from_rank0(str(run_dir))), rows


def save_epoch(run_dir: Path, rows: list[dict], state: dict, improved: bool) -> None:
    """metrics.csv, last.pt and, when validation improved, best.pt: each replaced atomically, in
    this order, so a kill between two of them leaves nothing that --resume cannot repair."""
    write_csv(run_dir / "metrics.csv", rows)  # a resume drops rows past last.pt's epoch
    save_checkpoint(run_dir / "last.pt", state)
    if improved:
        save_checkpoint(run_dir / "best.pt", state)  # a resume re-copies it when killed before this


def _catch_up_best(run_dir: Path, last: dict) -> None:
    """last.pt's epoch improved (no stale epochs) but best.pt is not that epoch: the run was
    stopped between writing the two, so best.pt gets the copy it was about to get."""
    if last["stale_epochs"] != 0:
        return
    with contextlib.suppress(CheckpointError):
        if read_checkpoint(run_dir / "best.pt").get("epoch") == last["epoch"]:
            return
    save_checkpoint(run_dir / "best.pt", last)


def _resume_hint(run_dir: Path) -> str:
    if (run_dir / "last.pt").exists():
        return f"interrupted: resume with python train.py --resume {run_dir}"
    return f"interrupted before the first epoch ended: nothing to resume in {run_dir}; start again"


def _silent(*args, **kwargs) -> None:
    """print() for processes other than rank 0."""


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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if k != "epoch" else int(v) for k, v in r.items()} for r in csv.DictReader(f)]


if __name__ == "__main__":
    try:
        exit_with_one_line(main, (DataError, CheckpointError, FloatingPointError))
    except KeyboardInterrupt:  # outside exit_on_interrupt: before the run folder was written
        print("interrupted before training started: run the same command again", file=sys.stderr)
        sys.exit(130)
