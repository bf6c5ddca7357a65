"""The first seed's pipeline, kept as the reference the benchmarks compare against.

This is what users would run without this project: medmnist's PIL dataset with torchvision
transforms, a DataLoader (batch 64, no workers), one Integrated Gradients call per image with
Captum's defaults, and SQLite rows of base64 text committed one at a time. Do not "improve" it.

    import baseline
    loader = baseline.loader(root, "train", train=True)      # root holds pathmnist.npz
    baseline.train_epoch(model, loader, torch.optim.Adam(model.parameters(), lr=1e-3))
"""
from __future__ import annotations

import base64
import io
import sqlite3  # the seed's storage; the project itself keeps sqlite3 inside db.py

import medmnist
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms

BATCH = 64
NORMALIZE = transforms.Normalize(mean=[0.5], std=[0.5])


class PathMNIST(medmnist.PathMNIST):
    """medmnist's own PathMNIST, unchanged except __len__: the original asserts the official split
    sizes (89,996 / 10,004 / 7,180), and the benchmark's synthetic splits are smaller."""

    def __len__(self) -> int:
        return self.imgs.shape[0]


def loader(root: str, split: str, train: bool) -> DataLoader:
    """The seed's data path: PIL image -> (flip, rotation) -> ToTensor -> Normalize(0.5, 0.5)."""
    steps = [transforms.RandomHorizontalFlip(), transforms.RandomRotation(10)] if train else []
    tf = transforms.Compose(steps + [transforms.ToTensor(), NORMALIZE])
    return DataLoader(PathMNIST(split=split, transform=tf, root=root), batch_size=BATCH,
                      shuffle=train, num_workers=0)


def train_epoch(model, loader, optimizer) -> dict:
    model.train()
    seen = correct = 0
    for x, y in loader:
        y = y.squeeze(1).long()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
        correct += (logits.argmax(1) == y).sum().item()
    return {"images": seen, "acc": correct / seen}


@torch.no_grad()
def predict(model, loader) -> np.ndarray:
    """Class probabilities over a (non-augmenting) loader, as the seed's evaluation did."""
    model.eval()
    return torch.cat([torch.softmax(model(x), 1) for x, _ in loader]).numpy()


def explain(model, images: torch.Tensor):
    """One image at a time: a forward pass for the prediction, then IG with Captum's defaults
    (50 Gauss-Legendre steps, baseline = zeros in the normalised input space).

    images: normalised (N, C, H, W). Returns (maps (N,C,H,W), targets (N,), deltas (N,)).
    """
    from captum.attr import IntegratedGradients  # imported here: the training path never needs it
    model.eval()
    ig = IntegratedGradients(model)
    maps, targets, deltas = [], [], []
    for i in range(len(images)):
        x = images[i:i + 1]
        with torch.no_grad():
            pred = model(x).argmax(1).item()
        attr, delta = ig.attribute(x, target=pred, return_convergence_delta=True)
        maps.append(attr)
        targets.append(pred)
        deltas.append(delta)
    return torch.cat(maps), torch.tensor(targets), torch.cat(deltas)


class Store:
    """The seed's table: each map as base64 text of np.save(float32); SELECT, INSERT, COMMIT per row."""

    def __init__(self, path: str):
        self.conn = sqlite3.connect(path)  # default journal (DELETE) and synchronous (FULL)
        self.conn.execute("CREATE TABLE IF NOT EXISTS attributions "
                          "(id INTEGER PRIMARY KEY, key TEXT, attr TEXT)")
        self.conn.commit()

    def put(self, key: str, attr: np.ndarray) -> int:
        """Store one map; returns the length of the stored text."""
        buf = io.BytesIO()
        np.save(buf, attr.astype(np.float32))
        text = base64.b64encode(buf.getvalue()).decode("ascii")
        if self.conn.execute("SELECT id FROM attributions WHERE key = ?", (key,)).fetchone() is None:
            self.conn.execute("INSERT INTO attributions (key, attr) VALUES (?, ?)", (key, text))
            self.conn.commit()
        return len(text)

    def close(self) -> None:
        self.conn.close()
