"""Run set-up shared by the scripts: config from the command line (and its Markdown flag tables),
seeding, device, mixed precision, processes (torchrun), signals and progress lines.

    from runtime import parse_config, set_seed, resolve_device
    cfg = parse_config(TrainConfig, argv)            # --help from the dataclass; bad values: one line
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import random
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Config from the command line


class _OneLineErrors(argparse.ArgumentParser):
    """A command-line mistake is one line on stderr, not a screenful of usage above it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser(cls, description: str | None, suppress: bool) -> _OneLineErrors:
    # allow_abbrev=False: a prefix such as --epoch is an unknown flag, not silently --epochs.
    p = _OneLineErrors(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       argument_default=argparse.SUPPRESS if suppress else None, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = str if "nargs" in f.metadata else hints[f.name]  # a list of strings: one flag, many values
        default = argparse.SUPPRESS if suppress else (
            f.default_factory() if f.default is dataclasses.MISSING else f.default)
        extra = {k: f.metadata[k] for k in ("choices", "type", "nargs") if k in f.metadata}
        if kind is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                           help=f.metadata.get("help", ""))
        else:
            p.add_argument(flag(f.name), type=extra.pop("type", kind), default=default,
                           help=f.metadata.get("help", ""), **extra)
    return p


def out_of_range(cfg) -> str | None:
    """The first field whose value breaks its metadata bound ("min": at least, "above": greater
    than), as the message the command line shows; None if all hold."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "min" in f.metadata and not value >= f.metadata["min"]:
            return f"{flag(f.name)} must be at least {f.metadata['min']}, got {value}"
        if "above" in f.metadata and not value > f.metadata["above"]:
            return f"{flag(f.name)} must be greater than {f.metadata['above']}, got {value}"
    return None


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """(config, the names of the fields given on the command line) from a dataclass: one --flag
    per field, its help and default in --help, `choices` from metadata; unknown flags and values
    out of their bounds ("min"/"above" metadata, then the class's check()) are one-line errors."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser(cls, description, suppress=False)
    cfg = cls(**vars(p.parse_args(argv)))
    problem = out_of_range(cfg) or (cfg.check() if hasattr(cfg, "check") else None)
    if problem:
        p.error(problem)
    return cfg, set(vars(_parser(cls, description, suppress=True).parse_args(argv)))


def exit_with_usage(message: str) -> typing.NoReturn:
    """A command-line mistake found after parsing: one line and exit status 2, as argparse's own."""
    _OneLineErrors(prog=os.path.basename(sys.argv[0])).error(message)


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """The config alone; see parse_args."""
    return parse_args(cls, argv, description)[0]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------
# Mixed precision

AMP_CHOICES = ("auto", "on", "off")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that --amp asks for on `device`; None means float32.

    on: float16 on CUDA (training adds gradient scaling), bfloat16 on CPU. auto: the same where the
    hardware computes in it natively (CUDA; CPUs with AMX or AVX512-BF16), float32 on other CPUs,
    which would convert bfloat16 in software. off: float32 everywhere.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    device = torch.device(device)
    if amp == "off" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        return torch.float16
    native = any(getattr(torch.cpu, check, lambda: False)()
                 for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return torch.bfloat16 if amp == "on" or native else None


def precision_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast in `dtype` on `device`, or nothing when dtype is None (float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# Processes: torchrun and signals

@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[tuple[torch.device, int, int]]:
    """(device, rank, world size) of this process: one plain process, or one of torchrun's.

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; its processes (even a single one) join one
    group, NCCL on CUDA and gloo on CPU, for as long as the block runs, each on GPU LOCAL_RANK of
    its machine.
    """
    dev = resolve_device(device)
    if "LOCAL_RANK" not in os.environ:
        yield dev, 0, 1
        return
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield dev, torch.distributed.get_rank(), torch.distributed.get_world_size()
        # All leave together: a rank that tore its group down while rank 0 still wrote the outputs
        # was seen to abort in gloo's shutdown (SIGABRT), failing the whole run. Rank 0's last
        # work (the test split, explain.py's --trust) may outlast the group's 30-minute timeout.
        if dev.type == "cuda":
            torch.distributed.barrier()
        else:
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(days=7))
    finally:
        torch.distributed.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place; itself in a single process."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def from_rank0(obj):
    """Rank 0's value of a picklable object, on every process (decisions all must take together)."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that both unwind the same way."""


@contextlib.contextmanager
def exit_on_interrupt(hint: Callable[[], str], quiet: bool = False) -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler pre-empting the job, torchrun stopping its
    processes) inside the block: stop where the process is, print hint() unless `quiet`, and exit
    with 128 + the signal number (130 for Ctrl-C). Nothing is saved here: checkpoints are written
    atomically, so the last complete one is what a resume starts from.
    """
    def terminate(signum, frame):
        raise _Terminated()

    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal's rule
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        yield
    except KeyboardInterrupt as e:
        if not quiet:
            print(hint(), file=sys.stderr, flush=True)
        raise SystemExit(128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def exit_with_one_line(main: Callable[[], object], errors: tuple[type[BaseException], ...]) -> None:
    """Run a script's main(); a user's mistake (one of `errors`) ends as one line on stderr, exit 1."""
    try:
        main()
    except errors as e:
        sys.exit(f"error: {e}")


# ------------------------------------------------------------------------------------------------
# Progress

def progress(items, total: int, desc: str, unit: str, every_s: float = 15.0):
    """Iterate `items` (`total` units of work in all; each item yields how many it did) with a
    progress display on stderr: tqdm's bar on a terminal; in a log file, where a bar's redraws
    would pile up in one line, a plain line after the first item (with the time left), then at
    most every `every_s` seconds, and one at the end."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        with tqdm(total=total, desc=desc, unit=unit) as bar:
            for done in items:
                bar.update(done)
        return
    start = last = time.perf_counter()
    count = 0
    for done in items:
        count += done
        now = time.perf_counter()
        if now - last >= every_s or count >= total or count == done:
            rate = count / max(now - start, 1e-9)
            left = f", about {(total - count) / rate:.0f} s left" if count < total else ""
            print(f"{desc}: {count}/{total} {unit} ({now - start:.0f} s{left})", file=sys.stderr, flush=True)
            last = now


# ------------------------------------------------------------------------------------------------
# The script reference (docs/scripts.md), generated from the config dataclasses so it stays true

def flag_table(cls) -> str:
    """Every flag of a script's config dataclass as a Markdown table: flag, default, what it does
    (choices and bounds included), in the order --help lists them."""
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, bool):
            name, shown = f"{flag(f.name)} / --no-{flag(f.name)[2:]}", "on" if default else "off"
        else:
            name, shown = flag(f.name) + (" ..." if "nargs" in f.metadata else ""), repr(default) if default != "" else "(none)"
        notes = [f.metadata.get("help", "")]
        if "choices" in f.metadata:
            notes.append("one of: " + ", ".join(map(str, f.metadata["choices"])))
        if "min" in f.metadata:
            notes.append(f"at least {f.metadata['min']}")
        if "above" in f.metadata:
            notes.append(f"above {f.metadata['above']}")
        text = "; ".join(n for n in notes if n).replace("|", "\\|")
        rows.append(f"| `{name}` | `{shown}` | {text} |")
    return "\n".join(rows) + "\n"
