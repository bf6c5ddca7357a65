"""One epoch of training and what it needs: the recipe's knobs, the epoch's seeding and data order,
the optimiser and validation. train.py composes these into a run; bench/ times them.

    from training import Recipe, make_optimizer, passes_per_epoch, seed_epoch, train_one_epoch
    recipe = Recipe(batch_size=64)
    order, generator = seed_epoch(seed=0, epoch=1, n=len(split), passes=passes_per_epoch(len(split), recipe))
    stats = train_one_epoch(net, split, order, make_optimizer(net, recipe), scaler, nullcontext(),
                            generator, recipe, "epoch 1")
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import augment, translate
from data import MEAN, STD, normalize
from metrics import compute_metrics
from model import predict
from runtime import AMP_CHOICES, all_reduce_sum
from stain import colour_jitter, hed_jitter, lab_style, randstainna, random_erase, sharpness_jitter


@dataclass
class Recipe:
    """How the network is trained (train.py's config extends this class, so each is a flag)."""
    epochs: int = field(default=25, metadata={"min": 1, "help": "epochs (the seed's 25), each of at least --epoch-steps optimiser steps; the cosine schedule anneals over them"})
    epoch_steps: int = field(default=80, metadata={"min": 1, "help": "at least this many optimiser steps per epoch: an epoch is one pass over the training images, or several passes where one pass makes fewer steps, so the default budget trains as long on 500 images as on 90,000 (full PathMNIST at batch 128: 704 steps in one pass; the 459 training images of a real cross-validation fold: 23 passes; 80 measured better than 40 on real tissue, docs/robustness.md); 1: always one pass"})
    batch_size: int = field(default=128, metadata={"min": 1, "help": "training batch per process; 128 keeps BatchNorm statistics stable and CPUs busy"})
    lr: float = field(default=1e-3, metadata={"above": 0, "help": "Adam learning rate (the seed's)"})
    weight_decay: float = field(default=1e-4, metadata={"min": 0, "help": "Adam L2 penalty; small, the network already has dropout"})
    augment: bool = field(default=True, metadata={"help": "random flips and transposes on each batch (all 8 exact dihedral transforms)"})
    rotate: float = field(default=0.0, metadata={"min": 0, "help": "with --augment, also rotate by up to this many degrees; 0 (measured best on real tissue): exact flips only, since a rotation resamples and blurs every 28 px image while test images stay sharp"})
    shift: int = field(default=1, metadata={"min": 0, "help": "with --augment, also move each image by up to this many whole pixels along each axis, borders reflected (augment.translate): exact, nothing is resampled; 1 measured best on real tissue; 0: off"})
    stain_jitter: float = field(default=0.5, metadata={"min": 0, "help": "HED stain augmentation: each image's H and E concentrations scaled by 1 + U(-this, this) (stain.hed_jitter); 0.5 measured most robust to another centre's stain; RGB images only; 0: off"})
    label_smoothing: float = field(default=0.0, metadata={"min": 0, "help": "cross-entropy label smoothing (single-label tasks); 0: off"})
    stain_aug: str = field(default="hed", metadata={"help": "the stain augmentation: hed: --stain-jitter and --stain-offset in HED space (Tellez et al., 2019); randstainna: RandStainNA (Shen et al., 2022): half the images Reinhard-transferred to a stain style drawn from the training split's own spread of L*a*b* statistics (stain.randstainna; --stain-jitter and --stain-offset unused)", "choices": ("hed", "randstainna")})
    stain_offset: float = field(default=0.05, metadata={"min": 0, "help": "with the HED stain augmentation, also shift each image's H and E concentrations by U(-this, this) in optical-density units (Tellez et al., 2019), whatever the image's own amount of stain; 0: off"})
    colour_jitter: float = field(default=0.3, metadata={"min": 0, "help": "brightness, contrast and saturation each by 1 + U(-this, this) per image, in both directions (0.3 covers the benchmark's darker and brighter images); 0: off"})
    jitter_share: float = field(default=0.35, metadata={"min": 0, "help": "the share of training images (0-1) that get the colour and sharpness jitter; the others keep their brightness, contrast, saturation and focus (0.35 with --clean-epochs 3 measured best on real tissue, docs/robustness.md)"})
    erase: float = field(default=0.25, metadata={"min": 0, "help": "random erasing: the share of images (0-1) that get one rectangle of a fiftieth to a fifth of the image painted in a random colour (stain.random_erase), against ink, bubbles and debris on the slide; 0: off"})
    sharpness: float = field(default=1.0, metadata={"min": 0, "help": "each image blurred or sharpened: moved toward its Gaussian blur (sigma 1.5 px at 28 px) by U(-this, this), negative values sharpening (stain.sharpness_jitter), so that an out-of-focus scan is not new to the model; 0: off"})
    clean_epochs: int = field(default=3, metadata={"min": 0, "help": "the last this many epochs train without the colour and sharpness jitter and random erasing (the stain jitter stays), so that the weights and BatchNorm statistics settle on images as scanned (3 with --jitter-share 0.35: +1.2 points of clean CV accuracy, docs/robustness.md); 0: off"})
    schedule: str = field(default="cosine", metadata={"help": "learning rate: cosine anneals it to 0 over --epochs (measured best on real tissue: it does not react to the noise of a small validation split); plateau halves it after 2 epochs without a lower validation loss", "choices": ("cosine", "plateau")})
    select: str = field(default="last", metadata={"help": "the weights best.pt keeps and the test reads: last: the last epoch's, where the schedule ends, with no early stopping (measured best on real tissue: picking the best of 40 epochs on a 115-image validation split picks its noise); best: the epoch with the best validation --monitor, stopping early after --patience epochs without improvement", "choices": ("last", "best")})
    ema: float = field(default=0.0, metadata={"min": 0, "help": "weight EMA (torch.optim.swa_utils) with this half-life in epochs, so it means the same on 500 images as on 90,000; validation, best.pt and the test use the averaged weights; 0: off"})
    amp: str = field(default="auto", metadata={"help": "mixed precision: fp16 on CUDA, bf16 on CPU; auto: where the hardware has it (CUDA, CPUs with AMX/AVX512-BF16)", "choices": AMP_CHOICES})
    stain_norm: str = field(default="none", metadata={"help": "normalise every image to the training split's stain before the model sees it (stainnorm.py, fitted on the training images, kept in the checkpoint, applied by evaluate.py and explain.py): Reinhard's colour transfer or Macenko's stain vectors; none: off", "choices": ("none", "reinhard", "macenko")})
    eval_batch_size: int = field(default=128, metadata={"min": 1, "help": "batch for validation and test inference (128 stays in a CPU's cache)"})


def jittered(images: torch.Tensor, cfg: Recipe, generator: torch.Generator, style: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images -> model input, with the recipe's stain, colour and sharpness jitter and random
    erasing (none: normalize). They are defined for RGB (H&E) images; grayscale MedMNIST flags
    train without them. style: the training split's stain style (stain.lab_style), for
    --stain-aug randstainna."""
    randstain = cfg.stain_aug == "randstainna"
    if not (randstain or cfg.stain_jitter or cfg.stain_offset or cfg.colour_jitter or cfg.sharpness or cfg.erase) \
            or images.shape[1] != 3:
        return normalize(images)
    x = (randstainna(images.float() / 255, style, generator) if randstain else
         hed_jitter(images.float() / 255, cfg.stain_jitter, generator, offset=cfg.stain_offset))
    acquired = sharpness_jitter(colour_jitter(x, cfg.colour_jitter, generator), cfg.sharpness, generator)
    if cfg.jitter_share < 1:  # the rest keep the acquisition as it was
        keep = torch.rand(len(x), generator=generator).to(x.device) >= cfg.jitter_share
        acquired = torch.where(keep.view(-1, 1, 1, 1), x, acquired)
    x = random_erase(acquired, cfg.erase, generator)
    return (x - MEAN) / STD


def epoch_recipe(cfg: Recipe, epoch: int) -> Recipe:
    """The recipe epoch `epoch` (1-based) trains with: without the acquisition jitter and random
    erasing in the last cfg.clean_epochs epochs."""
    if epoch <= cfg.epochs - cfg.clean_epochs:
        return cfg
    return replace(cfg, colour_jitter=0.0, sharpness=0.0, erase=0.0)


def passes_per_epoch(n: int, cfg: Recipe, world: int = 1) -> int:
    """Passes over the n training images (n // world per process) in one epoch: enough for at least
    cfg.epoch_steps optimiser steps (the passes follow each other, so batches do not restart)."""
    return max(1, math.ceil(cfg.epoch_steps * cfg.batch_size / max(1, n // world)))


def steps_per_epoch(n: int, cfg: Recipe, world: int = 1) -> int:
    return math.ceil(passes_per_epoch(n, cfg, world) * (n // world) / cfg.batch_size)


def seed_epoch(seed: int, epoch: int, n: int, rank: int = 0, world: int = 1,
               passes: int = 1) -> tuple[torch.Tensor, torch.Generator]:
    """This process's share of an epoch's data order and its augmentation generator; also seeds
    torch's global generator, which dropout draws from.

    Every draw of an epoch is seeded from (seed, epoch, rank), never from state carried over from
    the epoch before, so a resumed run draws exactly what an uninterrupted one does. Each pass's
    order is one permutation, the same on every rank; after dropping its last n % world images,
    rank r takes order[r::world] (DistributedSampler with drop_last=True), so ranks run equal
    batches and see each image at most once per pass. Augmentation and dropout differ between ranks.
    The passes of a multi-pass epoch (passes_per_epoch) follow each other in one order.
    """
    augment_seed, dropout_seed = np.random.SeedSequence([seed, epoch, 1, rank]).generate_state(2)
    torch.manual_seed(int(dropout_seed))
    shares = []
    for p in range(passes):
        order_seed = np.random.SeedSequence([seed, epoch, 0] + ([p] if p else [])).generate_state(1)[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(order_seed)))
        shares.append(order[: n - n % world][rank::world])
    return torch.cat(shares), torch.Generator().manual_seed(int(augment_seed))


def train_one_epoch(model, split, order, optimizer, scaler, autocast, generator, cfg, desc,
                    progress: bool = True, ema=None) -> dict:
    """One pass over this process's share `order` of the training split; returns loss, accuracy
    and speed over all processes. `ema` (make_ema) is updated after every step."""
    model.train()
    device = split.images.device
    multilabel = split.labels.ndim == 2
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, t0 = 0, time.perf_counter()
    if cfg.stain_aug == "randstainna" and split.stain_style is None and split.images.shape[1] == 3:
        split.stain_style = lab_style(split.images.cpu())  # once per split: RandStainNA's distribution
    for idx in tqdm(order.split(cfg.batch_size), desc=desc, leave=False, disable=None if progress else True):
        if len(idx) < 2:  # a one-image batch would make BatchNorm's batch statistics pure noise
            continue
        idx = idx.to(device)
        x = jittered(split.images[idx], cfg, generator, split.stain_style)
        if cfg.augment:
            x = translate(augment(x, generator, cfg.rotate), generator, cfg.shift)
        y = split.labels[idx]
        with autocast:
            logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = (F.binary_cross_entropy_with_logits(logits.float(), y.float()) if multilabel
                else F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at {desc}; last.pt keeps the last good "
                                     f"epoch: resume with a lower --lr, or without --amp")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.detach() * len(idx)
        pred = logits.detach() > 0 if multilabel else logits.detach().argmax(1)
        correct += (pred == y).float().mean(-1).sum() if multilabel else (pred == y).sum()
        seen += len(idx)
    seconds = time.perf_counter() - t0
    totals = all_reduce_sum(torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)]))
    loss_total, correct_total, seen_total = totals.tolist()
    return {"loss": loss_total / seen_total, "acc": correct_total / seen_total, "seconds": seconds,
            "images_per_s": seen_total / seconds}


def make_optimizer(net, cfg: Recipe) -> torch.optim.Optimizer:
    """Adam; fused: one kernel for all parameters, over 10x faster per step on CPU than the default."""
    return torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(optimizer, cfg: Recipe, epochs: int):
    """The learning-rate schedule, stepped once per epoch by step_schedule. Cosine in closed form
    (lr x (1 + cos(pi e / epochs)) / 2 after epoch e), so a run resumed with more --epochs anneals
    over the new budget from where it is."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / max(1, epochs))))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)


def resume_schedule(scheduler, optimizer, lr: float | None = None) -> None:
    """After loading a schedule's state: the cosine rate of the epoch reached under this run's
    --epochs (the checkpoint's optimiser holds the rate of the budget it was saved under), from a
    new peak rate `lr` if given."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [lr if lr is not None else base for base in scheduler.base_lrs]
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)


def step_schedule(scheduler, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


def make_ema(net, cfg: Recipe, steps_per_epoch: int):
    """An exponential moving average of `net`'s weights and BatchNorm statistics, or None.

    The decay per step gives a half-life of cfg.ema epochs at this many steps per epoch. It warms
    up as timm's ModelEmaV2 does, decay_t = min(decay, (1 + t) / (10 + t)) at step t, so the first
    steps, when the weights move fastest, do not stay in the average for long."""
    if not cfg.ema:
        return None
    from torch.optim.swa_utils import AveragedModel
    decay = 0.5 ** (1 / (cfg.ema * max(1, steps_per_epoch)))

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        t = float(n_averaged)
        weight = 1 - min(decay, (1 + t) / (10 + t))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, weight)
        else:  # BatchNorm's num_batches_tracked: the model's own count
            torch._foreach_copy_(averaged, current)

    return AveragedModel(net, multi_avg_fn=update, use_buffers=True)


def validate(model, split, data, cfg, device) -> dict:
    """Loss, accuracy and AUC on a held-out split, from the same predict() evaluate.py uses."""
    scores = predict(model, split.images, cfg.eval_batch_size, device, data.task, cfg.amp, stain=data.stain_norm)
    if not np.isfinite(scores).all():  # diverged weights: main() stops the run on the NaN loss
        return {"loss": math.nan, "acc": math.nan, "auc": math.nan}
    y = split.labels.numpy()
    m = compute_metrics(y, scores, data.task, data.class_names)
    p = np.clip(scores, 1e-12, 1 - 1e-7)
    loss = (-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean() if y.ndim == 2
            else -np.log(p[np.arange(len(y)), y]).mean())
    return {"loss": float(loss), "acc": m["acc"], "auc": m["auc"]}
