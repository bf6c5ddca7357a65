"""runtime.py: the command line built from a config dataclass (values, bounds, given flags, --help),
seeding, and the --amp choice."""
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from runtime import amp_dtype, parse_args, parse_config, set_seed


@dataclass
class _Cfg:
    model: str = field(default="lightcnn", metadata={"help": "which network", "choices": ["lightcnn", "resnet50"]})
    epochs: int = field(default=5, metadata={"help": "passes over the training split"})
    amp: bool = field(default=True, metadata={"help": "mixed precision on GPU"})
    lr_scale: float = field(default=0.5, metadata={"help": "multiplies the base rate"})
    batch: int = field(default=8, metadata={"min": 1, "help": "images per step"})
    rate: float = field(default=0.1, metadata={"above": 0, "help": "step size"})

    def check(self):
        return "--epochs must be at least 1" if self.epochs < 1 else None


def test_parse_config_values_and_types():
    assert parse_config(_Cfg, []) == _Cfg()
    cfg = parse_config(_Cfg, ["--model", "resnet50", "--epochs", "3", "--no-amp", "--lr-scale", "0.25"])
    assert cfg == _Cfg("resnet50", 3, False, 0.25) and type(cfg.epochs) is int


@pytest.mark.parametrize("argv, given", [([], set()), (["--epochs", "5"], {"epochs"}),  # 5 is the default
                                         (["--amp", "--lr-scale=0.5"], {"amp", "lr_scale"}),
                                         (["--no-amp", "--model", "lightcnn"], {"amp", "model"})])
def test_parse_args_names_the_flags_given_even_at_their_default(argv, given):
    cfg, found = parse_args(_Cfg, argv)
    assert found == given and cfg == parse_config(_Cfg, argv)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--batch", "-3"], "--batch must be at least 1, got -3"),
    (["--rate", "0"], "--rate must be greater than 0, got 0.0"),
    (["--rate", "nan"], "--rate must be greater than 0, got nan"),
])
def test_values_out_of_their_bounds_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_config(_Cfg, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


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


def test_amp_dtype_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("off", cpu) is None and amp_dtype("off", cuda) is None
    assert amp_dtype("on", cpu) == torch.bfloat16 and amp_dtype("on", cuda) == torch.float16
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert amp_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert amp_dtype("auto", cuda) == torch.float16 and amp_dtype("on", torch.device("meta")) is None
    with pytest.raises(ValueError, match="auto"):
        amp_dtype("bf16", cpu)
