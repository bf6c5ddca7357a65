"""model.py: output and Grad-CAM shapes at every size, LightCNN's size and cost by hand, checkpoints that
round-trip and refuse every bad file (an untrusted pickle included) with a clear error, parse_config,
the inference copy (BatchNorm folded) against the model itself, and the --amp choice."""
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from model import (AdaptiveAvgPool7, CheckpointError, LightCNN, amp_dtype, build_model, count_flops,
                   gradcam_layer, inference_copy, load_checkpoint, parse_config, read_checkpoint,
                   save_checkpoint, set_seed)

# (model, size, batch, expected Grad-CAM map side). ResNet-50 below 224 has a stride-1 stem and no
# max-pool, so layer4 is size/8 rounded up; at 224 the ImageNet stem gives the usual 7x7.
SHAPES = [("lightcnn", 28, 2, 14), ("lightcnn", 64, 2, 32), ("lightcnn", 128, 2, 64),
          ("lightcnn", 224, 2, 112), ("resnet50", 28, 1, 4), ("resnet50", 64, 1, 8),
          ("resnet50", 128, 1, 16), ("resnet50", 224, 1, 7)]


def _forward_with_cam(name, size, batch, in_channels=3, num_classes=7):
    torch.manual_seed(0)
    net = build_model(name, in_channels, num_classes, size).eval()
    maps = []
    handle = gradcam_layer(net, name).register_forward_hook(lambda m, i, o: maps.append(o))
    try:
        with torch.no_grad():
            logits = net(torch.randn(batch, in_channels, size, size))
    finally:
        handle.remove()
    return logits, maps


@pytest.mark.parametrize("name,size,batch,side", SHAPES, ids=[f"{m}-{s}" for m, s, _, _ in SHAPES])
def test_logits_and_gradcam_map_shape(name, size, batch, side):
    logits, maps = _forward_with_cam(name, size, batch)
    assert logits.shape == (batch, 7) and torch.isfinite(logits).all()
    assert len(maps) == 1  # the hook layer runs once per forward
    assert maps[0].shape[0] == batch and maps[0].shape[2:] == (side, side)


# Below 224 ResNet-50's conv1 is built for in_channels anyway; at 224 the ImageNet stem is averaged.
@pytest.mark.parametrize("name,size", [("lightcnn", 28), ("resnet50", 224)])
def test_grayscale_input(name, size):
    logits, maps = _forward_with_cam(name, size, 1, in_channels=1, num_classes=4)
    assert logits.shape == (1, 4) and maps[0].shape[2] > 1


def test_unknown_model_and_pretrained_lightcnn():
    with pytest.raises(ValueError, match="vgg"):
        build_model("vgg")
    with pytest.raises(CheckpointError, match="resnet50"):
        build_model("lightcnn", pretrained=True)


def test_lightcnn_parameter_count_by_hand():
    conv = 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 64 * 64 * 9  # 3x3 convolutions, no bias
    bn = 2 * (32 + 32 + 64 + 64)                                 # BatchNorm weight and bias
    fc = (64 * 7 * 7 * 256 + 256) + (256 * 9 + 9)
    assert conv + bn + fc == 871_145
    assert sum(p.numel() for p in LightCNN(3, 9).parameters()) == 871_145


def test_count_flops_by_hand():
    macs = (28 * 28 * 32 * (3 * 9)      # conv 3->32 at 28x28
            + 28 * 28 * 32 * (32 * 9)   # conv 32->32 at 28x28
            + 14 * 14 * 64 * (32 * 9)   # conv 32->64 at 14x14, after the first pool
            + 14 * 14 * 64 * (64 * 9)   # conv 64->64 at 14x14
            + 64 * 7 * 7 * 256          # FC 3136->256
            + 256 * 9)                  # FC 256->9
    assert macs == 19_545_856
    assert count_flops(LightCNN(3, 9), (3, 28, 28)) == macs
    # torchvision's ResNet-50 at 224 is the well-known 4,089,184,256 MACs with a 1000-way head.
    assert count_flops(build_model("resnet50", 3, 9, 224), (3, 224, 224)) == 4_089_184_256 - 2048 * (1000 - 9)


# ------------------------------------------------------------------------------------------------
# Checkpoints

def _state(model="lightcnn", in_channels=3, num_classes=9):
    torch.manual_seed(0)
    net = build_model(model, in_channels, num_classes, 28)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that buffers must round-trip too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net, {"model": net.state_dict(), "epoch": 3, "best_metric": 0.75,
                 "config": {"model": model, "size": 28, "seed": 1},
                 "arch": {"in_channels": in_channels, "num_classes": num_classes}}


def test_checkpoint_round_trip(tmp_path):
    net, state = _state(in_channels=1, num_classes=4)
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temp file was moved
    torch.load(path, weights_only=True)  # plain types only
    ckpt = read_checkpoint(path)
    assert ckpt["format"] == 1 and ckpt["epoch"] == 3 and ckpt["config"] == state["config"]
    assert ckpt["model"].keys() == state["model"].keys()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in state["model"].items())

    model, cfg, _ = load_checkpoint(path)
    assert not model.training and cfg == state["config"]
    x = torch.randn(3, 1, 28, 28)
    net.eval()
    with torch.no_grad():
        assert torch.equal(model(x), net(x)) and model(x).shape == (3, 4)


class _Payload:
    """Unpickling this calls open(marker, "w"), creating the file: proof that the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_untrusted_pickle_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    _, state = _state()
    torch.save({**state, "extra": _Payload(marker)}, path)
    assert not marker.exists()
    # Positive control: a plain unpickle does run the payload.
    torch.load(path, weights_only=False)["extra"].close()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def _valid_file(path):
    save_checkpoint(path, _state()[1])


def _truncated(path):
    _valid_file(path)
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def _save(obj):
    return lambda path: torch.save(obj, path)


def _with_config(**cfg):
    def write(path):
        _, state = _state()
        torch.save({**state, "config": cfg}, path)
    return write


BAD = {
    "missing": lambda path: None,
    "truncated": _truncated,
    "random_bytes": lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
    "zip_magic_then_garbage": lambda p: p.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4),
    "a_list": _save([1, 2, 3]),
    "no_config": _save({"model": {}}),
    "other_model": _with_config(model="resnet50", size=28),  # lightcnn weights, config says resnet50
    "other_classes": lambda p: torch.save({**_state(num_classes=4)[1], "arch": {"num_classes": 9}}, p),
    "empty_file": lambda p: p.write_bytes(b""),
    "unknown_model_name": _with_config(model="vgg16", size=28),
    "config_without_size": _with_config(model="lightcnn"),
}


@pytest.mark.parametrize("make", BAD.values(), ids=BAD.keys())
def test_bad_checkpoint_is_a_one_line_error_naming_it(tmp_path, make):
    path = tmp_path / "best.pt"
    make(path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg


# ------------------------------------------------------------------------------------------------
# Config and seeding

@dataclass
class _Cfg:
    model: str = field(default="lightcnn", metadata={"help": "which network", "choices": ["lightcnn", "resnet50"]})
    epochs: int = field(default=5, metadata={"help": "passes over the training split"})
    amp: bool = field(default=True, metadata={"help": "mixed precision on GPU"})
    lr_scale: float = field(default=0.5, metadata={"help": "multiplies the base rate"})

    def check(self):
        return "--epochs must be at least 1" if self.epochs < 1 else None


def test_parse_config_values_and_types():
    assert parse_config(_Cfg, []) == _Cfg()
    cfg = parse_config(_Cfg, ["--model", "resnet50", "--epochs", "3", "--no-amp", "--lr-scale", "0.25"])
    assert cfg == _Cfg("resnet50", 3, False, 0.25) and type(cfg.epochs) is int


@pytest.mark.parametrize("argv,needle", [(["--bogus", "1"], "unrecognized arguments: --bogus"),
                                         (["--model", "vgg"], "invalid choice: 'vgg'"),
                                         (["--epochs", "three"], "invalid int value"),
                                         (["--lr_scale", "1"], "unrecognized arguments"),
                                         (["--epochs", "0"], "--epochs must be at least 1")])
def test_parse_config_rejects(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        parse_config(_Cfg, argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_parse_config_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(_Cfg, ["--help"], description="demo")
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0
    for text in ["which network (default: lightcnn)", "{lightcnn,resnet50}",
                 "passes over the training split (default: 5)", "--amp, --no-amp",
                 "mixed precision on GPU (default: True)", "--lr-scale", "(default: 0.5)"]:
        assert text in out, text


def test_set_seed_covers_random_numpy_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()
    set_seed(7)
    a = draw()
    set_seed(7)
    assert draw() == a
    set_seed(8)
    assert all(x != y for x, y in zip(draw(), a))


# ----------------------------------------------------------------------------- inference copy, precision

def _with_batchnorm_statistics(net: torch.nn.Module) -> torch.nn.Module:
    """Running statistics and affine parameters far from the defaults, so folding has work to do."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -1, 1), (m.running_var, 0.2, 3), (m.weight, 0.5, 2), (m.bias, -1, 1)):
                t.data.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=g))
    return net.eval()


@pytest.mark.parametrize("name,size", [("lightcnn", 28), ("lightcnn", 64), ("resnet50", 28)])
def test_inference_copy_is_the_same_function_and_gradient(name, size):
    torch.manual_seed(0)
    net = _with_batchnorm_statistics(build_model(name, size=size))
    fast = inference_copy(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules() if type(m).__name__ == "BatchNorm2d")
    assert not any(p.requires_grad for p in fast.parameters()) and all(p.requires_grad for p in net.parameters())
    x = torch.randn(3, 3, size, size, requires_grad=True)
    y = net(x)
    (g,) = torch.autograd.grad(y[:, 1].sum(), x)
    x2 = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y2 = fast(x2)
    (g2,) = torch.autograd.grad(y2[:, 1].sum(), x2)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(y2, y) < 1e-5  # BatchNorm folded: the same logits up to float rounding
    # Input gradients, which IG and Grad-CAM use. ResNet-50's (with these large BatchNorm gains) are
    # ill-conditioned: rounding flips ReLUs that sit on their kink, and channels_last alone, unfolded,
    # moves them by 2% (measured), so its bound only catches a wrong fold.
    assert rel(g2, g) < (1e-5 if name == "lightcnn" else 0.05)
    # The Grad-CAM layer is found in the copy under the same name.
    assert gradcam_layer(fast, name) is fast.get_submodule(dict(lightcnn="features.4", resnet50="layer4")[name])


def test_adaptive_pool_passes_7x7_through():
    pool, x = AdaptiveAvgPool7(), torch.randn(2, 4, 7, 7)
    assert pool(x) is x
    x16 = torch.randn(2, 4, 16, 16)
    assert torch.equal(pool(x16), torch.nn.AdaptiveAvgPool2d(7)(x16))


def test_amp_dtype_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("off", cpu) is None and amp_dtype("off", cuda) is None
    assert amp_dtype("on", cpu) == torch.bfloat16 and amp_dtype("on", cuda) == torch.float16
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert amp_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert amp_dtype("auto", cuda) == torch.float16 and amp_dtype("on", torch.device("meta")) is None
    with pytest.raises(ValueError, match="auto"):
        amp_dtype("bf16", cpu)
