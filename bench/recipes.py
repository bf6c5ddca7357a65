"""The two training recipes, as objects whose epochs advance a chunk at a time (for interleaved
timing), and as a script that runs one in a fresh process so that its peak RSS is its own:

    python bench/recipes.py seed ROOT                  # medmnist + DataLoader(64), as the first seed
    python bench/recipes.py ours ROOT --set amp=off batch_size=256 --epochs 3 --test

ROOT holds pathmnist.npz (MedMNIST layout). The script prints one JSON line: images/s per epoch,
test accuracy if asked, and peak RSS (VmHWM). Each recipe imports only its own modules.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from itertools import islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def rss_mib(key: str = "VmRSS") -> float:
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def parse_sets(items: list[str], cls) -> dict:
    """['amp=off', 'batch_size=256'] -> dataclass kwargs converted to the fields' types."""
    types = {f.name: type(f.default) for f in dataclasses.fields(cls)}
    out = {}
    for key, value in (item.split("=", 1) for item in items):
        if key not in types:
            raise SystemExit(f"unknown {cls.__name__} field {key!r}")
        out[key] = value.lower() in ("1", "true", "yes") if types[key] is bool else types[key](value)
    return out


class Seed:
    """The first seed: medmnist's PathMNIST + transforms, DataLoader(64, shuffle), Adam 1e-3."""

    def __init__(self, root: str, seed: int = 0):
        import torch
        import baseline
        from model import build_model
        self.baseline, self.root = baseline, root
        torch.manual_seed(seed)
        self.loader = baseline.loader(root, "train", train=True)
        self.n = len(self.loader.dataset)
        self.model = build_model("lightcnn")  # "same model": our LightCNN
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def epoch(self, epoch: int, chunk: int = 0):
        """One epoch; yields after every `chunk` images (0: once, at the end)."""
        batches = iter(self.loader)
        for _ in range(0, self.n, chunk or self.n):
            self.baseline.train_epoch(self.model, islice(batches, -(-(chunk or self.n) // self.baseline.BATCH)),
                                      self.optimizer)
            yield

    def test_accuracy(self) -> float:
        test = self.baseline.loader(self.root, "test", train=False)
        return float((self.baseline.predict(self.model, test).argmax(1) == test.dataset.labels[:, 0]).mean())


class Ours:
    """train.py's recipe: uint8 tensors, batch augmentation, training.Recipe defaults (or `sets`)."""

    def __init__(self, root: str, seed: int = 0, sets: list[str] = ()):
        import torch
        import training
        from data import load_data
        from model import build_model
        from runtime import amp_dtype, autocast, set_seed
        self.training, self.root, self.seed = training, root, seed
        self.cfg = training.Recipe(**parse_sets(list(sets), training.Recipe))
        set_seed(seed)  # as train.main: seed -> data -> model -> optimizer -> epochs
        self.split = load_data("pathmnist", 28, root, ("train",), download_missing=False).splits["train"]
        self.n = len(self.split)
        self.model = build_model("lightcnn").to(memory_format=torch.channels_last)
        self.optimizer = training.make_optimizer(self.model, self.cfg)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.autocast = autocast(torch.device("cpu"), amp_dtype(self.cfg.amp, torch.device("cpu")))

    def epoch(self, epoch: int, chunk: int = 0):
        order, generator = self.training.seed_epoch(self.seed, epoch, self.n)
        for part in order.split(chunk or self.n):
            self.training.train_one_epoch(self.model, self.split, part, self.optimizer, self.scaler, self.autocast,
                                       generator, self.cfg, "bench", progress=False)
            yield

    def test_accuracy(self) -> float:
        from data import load_data
        from model import predict
        test = load_data("pathmnist", 28, self.root, ("test",), download_missing=False).splits["test"]
        scores = predict(self.model, test.images, self.cfg.eval_batch_size, "cpu", "multi-class", self.cfg.amp)
        return float((scores.argmax(1) == test.labels.numpy()).mean())


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("side", choices=("seed", "ours"))
    p.add_argument("root", help="folder holding pathmnist.npz")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", action="store_true", help="also report test accuracy")
    p.add_argument("--set", nargs="*", default=[], help="training.Recipe overrides for ours, KEY=VALUE")
    args = p.parse_args()
    recipe = Seed(args.root, args.seed) if args.side == "seed" else Ours(args.root, args.seed, args.set)
    speeds = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        for _ in recipe.epoch(epoch):
            pass
        speeds.append(recipe.n / (time.perf_counter() - t0))
    out = {"images_per_s": speeds, "peak_rss_mib": rss_mib("VmHWM")}
    print(json.dumps(out | ({"test_acc": recipe.test_accuracy()} if args.test else {})))


if __name__ == "__main__":
    main()
