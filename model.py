"""Networks, `build_model`, their Grad-CAM layers, what runs them (inference copy, predict) and
checkpoints.

    from model import build_model, gradcam_layer, load_checkpoint
    net = build_model("resnet50", in_channels=3, num_classes=9, size=28)
    layer = gradcam_layer(net, "resnet50")               # layer4: 4x4 at 28, 7x7 at 224
    net, cfg, ckpt = load_checkpoint("runs/latest/best.pt")
    probs = predict(net, images_uint8, batch_size=128, device="cpu", task="multi-class")
"""
from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from data import MULTI_LABEL, normalize
from runtime import amp_dtype, autocast
from stainnorm import normalise as normalise_stain

MODELS = ("lightcnn", "resnet50")
CHECKPOINT_FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint is missing, damaged or does not fit; the message names the file and the remedy."""


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class AdaptiveAvgPool7(nn.AdaptiveAvgPool2d):
    """AdaptiveAvgPool2d(7) that hands a 7x7 input back untouched: the same function, without the
    copy forward and backward that the pooling kernel makes of it at 28x28 (3% of a training step)."""

    def __init__(self):
        super().__init__(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-2:] == (7, 7) else super().forward(x)


class LightCNN(nn.Module):
    """The first seed's network: [conv32, conv32, pool, conv64, conv64, pool], dropout 0.3, FC 256.

    Two changes keep it light and make it work at every size: convolutions feeding BatchNorm carry
    no bias (BatchNorm's shift makes it redundant), and an adaptive average pool to 7x7 before the
    classifier, an identity at 28x28, keeps the classifier at 3136 inputs for 64-224 inputs too.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 9, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, 32), _block(32, 32), nn.MaxPool2d(2),
            _block(32, 64), _block(64, 64),  # features[4]: the Grad-CAM layer, 14x14 at 28
            nn.MaxPool2d(2), AdaptiveAvgPool7())
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(64 * 7 * 7, 256), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet50(in_channels: int = 3, num_classes: int = 9, size: int = 28,
             pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet-50. Below 224 the stem is a 3x3 stride-1 conv without max-pool (as in
    MedMNIST's experiments), so layer4 is 4x4 at 28 rather than 1x1 and Grad-CAM can localise."""
    import torchvision  # here, not at the top: it adds seconds to every script's start-up
    weights = None
    if pretrained:
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
        try:
            weights.get_state_dict(progress=True)
        except Exception as e:  # no network: urllib raises several types
            raise CheckpointError(
                f"could not download ImageNet weights from {weights.url} ({e}); put "
                f"{Path(weights.url).name} in {torch.hub.get_dir()}/checkpoints or drop --pretrained") from None
    net = torchvision.models.resnet50(weights=weights)
    if size < 224:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        w = net.conv1.weight.detach().mean(1, keepdim=True).repeat(1, in_channels, 1, 1)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        net.conv1.weight.data.copy_(w)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


GRADCAM_LAYERS = {"lightcnn": "features.4", "resnet50": "layer4"}


def build_model(name: str, in_channels: int = 3, num_classes: int = 9, size: int = 28,
                pretrained: bool = False) -> nn.Module:
    """A network by name, for inputs (N, in_channels, size, size)."""
    if name == "lightcnn":
        if pretrained:
            raise CheckpointError("--pretrained exists for resnet50 only")
        return LightCNN(in_channels, num_classes)
    if name == "resnet50":
        return resnet50(in_channels, num_classes, size, pretrained)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def gradcam_layer(model: nn.Module, name: str) -> nn.Module:
    """The layer Grad-CAM should use: the last convolutional block of `model`."""
    return model.get_submodule(GRADCAM_LAYERS[name])


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass through conv and linear layers."""
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            macs += out.numel() // out.shape[0] * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            macs += mod.in_features * mod.out_features
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return macs


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference only: eval mode, no parameter gradients, channels_last, and
    every BatchNorm folded into the convolution that feeds it. The same function up to float
    rounding, with one pass over memory less per layer (input gradients, for IG and Grad-CAM, still
    flow). Folded pairs: neighbours in an nn.Sequential (LightCNN's blocks, ResNet's downsample) and
    torchvision's convK -> bnK (ResNet's stem and bottlenecks)."""
    net = copy.deepcopy(model).eval()
    for parent in list(net.modules()):
        names = list(parent._modules)
        pairs = zip(names, names[1:]) if isinstance(parent, nn.Sequential) else \
            ((f"conv{k}", f"bn{k}") for k in (1, 2, 3))
        for conv_name, bn_name in pairs:
            conv, bn = parent._modules.get(conv_name), parent._modules.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return net.requires_grad_(False).to(memory_format=torch.channels_last)


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and 90-degree rotations of a batch (N, C, H, W), identity first: exact pixel
    permutations, which change no tissue label."""
    turns = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


@torch.inference_mode()
def predict(model: nn.Module, images_uint8: torch.Tensor, batch_size: int, device, task: str,
            amp: str = "off", tta: bool = False, stain: dict | None = None) -> np.ndarray:
    """Class probabilities (softmax; sigmoid for multi-label) for uint8 (N, C, H, W) images, in the
    training split's stain first where the model was trained with --stain-norm (`stain`: its
    reference, stain_reference(checkpoint); after any change the stain benchmark makes).

    Runs an inference_copy of the model (BatchNorm folded, channels_last) under --amp's autocast;
    probabilities are computed in float32 from the logits either way. tta: the mean probability over
    the 8 dihedral transforms of each image (test-time augmentation)."""
    device = torch.device(device)
    net, dtype = inference_copy(model), amp_dtype(amp, device)
    activation = torch.sigmoid if task == MULTI_LABEL else (lambda z: torch.softmax(z, dim=1))
    probs = []
    for start in range(0, len(images_uint8), batch_size):
        x = normalize(normalise_stain(images_uint8[start:start + batch_size], stain).to(device, non_blocking=True))
        views = dihedral(x) if tta else [x]
        total = 0
        for view in views:
            with autocast(device, dtype):
                logits = net(view.contiguous(memory_format=torch.channels_last))
            total = total + activation(logits.float())
        probs.append((total / len(views)).cpu())
    return torch.cat(probs).numpy()


# ------------------------------------------------------------------------------------------------
# Checkpoints: plain types only, so torch.load(..., weights_only=True) reads them

def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write atomically: a crash mid-write never leaves a half-written checkpoint behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a machine crash cannot empty it either
    except BaseException as e:  # Ctrl-C or a full disk mid-write: leave no half file behind
        tmp.unlink(missing_ok=True)
        if isinstance(e.__context__, KeyboardInterrupt) and not isinstance(e, KeyboardInterrupt):
            # Ctrl-C (or SIGTERM) inside torch.save: its zip writer fails closing the cut-off archive
            # ("unexpected pos"), which would hide the interrupt behind a traceback.
            raise e.__context__ from None
        raise
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with weights_only=True (an untrusted pickle is never executed)."""
    path = Path(path)
    if path.is_dir():
        inside = [str(path / n) for n in ("best.pt", "last.pt") if (path / n).is_file()]
        hint = f"pass {inside[0]}" if inside else "pass the best.pt or last.pt that train.py wrote"
        raise CheckpointError(f"{path}: is a folder, not a checkpoint; {hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train one with train.py or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint of this project ({_why_unreadable(path, e)}); "
                              "pass a best.pt or last.pt written by train.py, or retrain") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model/config entries); "
                              f"pass a best.pt or last.pt written by train.py")
    return ckpt


def _why_unreadable(path: Path, exc: Exception) -> str:
    """What torch.load's refusal means, in words (its own text is pages long, with ANSI codes)."""
    if "Weights only load failed" in str(exc) or isinstance(exc, pickle.UnpicklingError):
        return ("it holds pickled Python objects, e.g. a whole nn.Module saved with torch.save(model), which "
                "are never unpickled since that can run code; train.py saves plain state dicts")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return "a damaged or truncated zip archive"
    return "neither a zip archive nor a legacy torch file: not a checkpoint at all"


def stain_reference(ckpt: dict) -> dict | None:
    """The stain normalisation a checkpoint was trained with (train.py --stain-norm), or None."""
    return ckpt.get("arch", {}).get("stain_norm")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint was trained as, from the config inside it alone.

    Returns (model in eval mode on `device`, config dict, the checkpoint dict).
    """
    ckpt = read_checkpoint(path)
    cfg, arch = ckpt["config"], ckpt.get("arch", {})
    try:
        model = build_model(cfg["model"], arch.get("in_channels", 3), arch.get("num_classes", 9), cfg["size"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config does not describe a model of this project ({e!r}); "
                              f"pass a checkpoint written by train.py") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0][:160]
        raise CheckpointError(f"{path}: weights do not fit a {cfg['model']} at size {cfg['size']} ({first}); "
                              f"the checkpoint is from another model, or damaged") from None
    return model.to(device).eval(), cfg, ckpt
