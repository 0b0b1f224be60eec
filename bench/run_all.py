"""Run every benchmark in `bench/` and write `bench/RESULTS.md`.

Each bench script prints human-readable lines and, last, one or more machine-readable lines
`RESULT key=value key=value ...`. This collects them into one table together with the machine,
the date and the package versions.

    python bench/run_all.py --out bench/RESULTS.md          # full run (tens of minutes on 2 cores)
    python bench/run_all.py --quick --out /tmp/results.md   # tiny sizes: checks the scripts run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import parse_results

BENCH_DIR = Path(__file__).resolve().parent
SCRIPTS = [
    "postprocess.py",
    "input_pipeline.py",
    "model_latency.py",
    "train_step.py",
    "eval.py",
    "conv_backward.py",
    "accelerator.py",
    "resume.py",
    "batchnorm_grad.py",
]
PACKAGES = [
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "tensorflow-cpu",
    "torch",
    "numpy",
    "opencv-python-headless",
]


def run_script(name: str, quick: bool, timeout: float) -> tuple[dict[str, str], str, float]:
    cmd = [sys.executable, str(BENCH_DIR / name)] + (["--quick"] if quick else [])
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH_DIR.parent, check=False
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return parse_results(proc.stdout), proc.stdout, elapsed


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def versions() -> str:
    out = []
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out.append(f"{pkg} {importlib.metadata.version(pkg)}")
    return ", ".join(out)


#: Heading of the hand-recorded runs on other machines (accelerators), kept by every rewrite.
RECORDED = "## Recorded on other machines"


def recorded_section(text: str) -> str:
    """The `RECORDED` section of an existing results file, to its end ('' if none)."""
    at = text.find(RECORDED)
    return text[at:].rstrip() + "\n" if at >= 0 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of scripts")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per script, seconds")
    args = parser.parse_args()

    rows = []
    for name in args.only or SCRIPTS:
        if not (BENCH_DIR / name).exists():
            print(f"[bench] {name}: missing, skipped", flush=True)
            continue
        print(f"[bench] running {name} ...", flush=True)
        results, _, elapsed = run_script(name, args.quick, args.timeout)
        print(f"[bench] {name}: {results} ({elapsed:.0f} s)", flush=True)
        rows.extend((name, key, value) for key, value in results.items())

    lines = [
        "# Benchmark results",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {machine_line()}",
        f"- versions: {versions()}",
        f"- mode: {'quick (tiny sizes, not meaningful)' if args.quick else 'full'}",
        "- produced by `make bench` (bench/run_all.py); each ratio is against a reference run"
        " in the same process (see each script's docstring)",
        "",
        "| script | measure | value |",
        "|---|---|---|",
    ]
    lines += [f"| {script} | {key} | {value} |" for script, key, value in rows]
    out = Path(args.out)
    recorded = recorded_section(out.read_text() if out.exists() else "")
    out.write_text("\n".join(lines) + "\n" + (f"\n{recorded}" if recorded else ""))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
