"""Time explain.py --trust on the README's first-run models (python bench/bench.py trust).

Each checkpoint's maps are computed once (`explain.py` without --trust, timed as "maps"); then two
copies of that database get --trust alone, the maps already stored: the shipped adaptive checks
(default flags) and the fixed sample of before (--trust-halfwidth 0: every check on --trust-n 256
images). Both in this run, on this machine, so their ratio is the measured saving. The README's
step times are another figure: the commands exactly as written, from a fresh clone (docs/benchmarks.md).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"step 1 (synthetic)": ("runs/synthetic/best.pt", ["--n", "500"]),
         "step 2 (real tissue)": ("runs/real-lightcnn/best.pt", [])}


def explain(checkpoint: str, db: Path, *flags: str) -> tuple[float, str]:
    """Seconds one explain.py run took (from start to exit) and what it wrote to stderr."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "explain.py"), "--checkpoint", checkpoint, "--db", str(db),
                          "--no-figures", *flags], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"explain.py {' '.join(flags)} failed: {out.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - t0, out.stderr


def run(quick: bool = False, tmp: str = "") -> dict:
    """Per first-run step whose checkpoint exists: seconds for the maps, for the adaptive --trust and
    for the fixed one, and each check's line (images used, intervals, seconds)."""
    results = {}
    for step, (checkpoint, flags) in STEPS.items():
        if not (ROOT / checkpoint).exists():
            print(f"{step}: {checkpoint} is missing; run the README's first run first", flush=True)
            continue
        flags = [*flags[:1], "64"] if quick and flags else flags
        cap = ["--trust-n", "32"] if quick else []
        with tempfile.TemporaryDirectory(dir=tmp or None) as folder:
            maps_db = Path(folder) / "maps.db"
            row = {"maps": explain(checkpoint, maps_db, *flags)[0]}
            for name, extra in (("adaptive", []), ("fixed", ["--trust-halfwidth", "0"])):
                db = Path(folder) / f"{name}.db"
                shutil.copy(maps_db, db)
                row[name], err = explain(checkpoint, db, *flags, "--trust", *cap, *extra)
                row[f"{name} checks"] = [line[len("--trust: "):] for line in err.splitlines()
                                         if re.match(r"--trust: \w+ of ", line)]
        results[step] = row
        print(f"{step}: maps {row['maps']:.0f} s; --trust adaptive {row['adaptive']:.0f} s, fixed sample "
              f"{row['fixed']:.0f} s ({row['fixed'] / row['adaptive']:.1f}x)", flush=True)
        for name in ("adaptive", "fixed"):
            for line in row[f"{name} checks"]:
                print(f"    {name}: {line}")
    return results
