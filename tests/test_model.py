"""model.py: output and Grad-CAM shapes at every size, LightCNN's size and cost by hand, checkpoints that
round-trip and refuse every bad file (an untrusted pickle included) with its reason and remedy, and
the inference copy (BatchNorm folded) against the model itself."""

import numpy as np
import pytest
import torch

from model import (AdaptiveAvgPool7, CheckpointError, LightCNN, build_model, count_flops, gradcam_layer,
                   inference_copy, load_checkpoint, read_checkpoint, save_checkpoint)

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


NOT_OURS = ("not a readable checkpoint of this project", "pass a best.pt or last.pt written by train.py")
NO_ENTRIES = ("no model/config entries", "pass a best.pt or last.pt written by train.py")
NO_MODEL = ("its config does not describe a model of this project", "pass a checkpoint written by train.py")
# name -> (what makes the file bad, the reason the message must give, the remedy it must name)
BAD = {
    "missing": (lambda path: None, "checkpoint not found", "train one with train.py or pass --checkpoint"),
    "truncated": (_truncated, *NOT_OURS),
    "random_bytes": (lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
                     *NOT_OURS),
    "zip_magic_then_garbage": (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4), *NOT_OURS),
    "empty_file": (lambda p: p.write_bytes(b""), *NOT_OURS),
    "a_list": (_save([1, 2, 3]), *NO_ENTRIES),
    "no_config": (_save({"model": {}}), *NO_ENTRIES),
    # lightcnn weights, config says resnet50
    "other_model": (_with_config(model="resnet50", size=28), "weights do not fit a resnet50 at size 28",
                    "from another model, or damaged"),
    "other_classes": (lambda p: torch.save({**_state(num_classes=4)[1], "arch": {"num_classes": 9}}, p),
                      "weights do not fit a lightcnn at size 28", "from another model, or damaged"),
    "unknown_model_name": (_with_config(model="vgg16", size=28), *NO_MODEL),
    # a whole nn.Module, as torch.save(model) writes it: never unpickled, said in words
    "pickled_module": (lambda p: torch.save(build_model("lightcnn"), p), "holds pickled Python objects",
                       "pass a best.pt or last.pt written by train.py"),
    "text_file": (lambda p: p.write_text("hello\n"), "not a checkpoint at all", "pass a best.pt or last.pt"),
    "a_folder": (lambda p: p.mkdir(), "is a folder, not a checkpoint", "pass the best.pt or last.pt"),
    "config_without_size": (_with_config(model="lightcnn"), *NO_MODEL),
}


@pytest.mark.parametrize("make, reason, remedy", BAD.values(), ids=BAD.keys())
def test_bad_checkpoint_is_a_one_line_error_with_its_reason(tmp_path, make, reason, remedy):
    path = tmp_path / "best.pt"
    make(path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg and msg.startswith(f"{path}: "), msg
    assert reason in msg and remedy in msg, msg
    if path.is_file():
        before = path.read_bytes()
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        assert path.read_bytes() == before  # reading never changes the file


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
