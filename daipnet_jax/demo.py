"""The quick start behind `make demo`: generate data, train, evaluate, draw predictions.

Runs the user's command lines in turn (data.generated, train.py for a fixed number of steps with
a progress bar, evaluate.py, predict); an AP50 below `AP50_BAR` exits 1.

    python -m daipnet_jax.demo --workdir runs/demo [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    from daipnet_jax import platform

    platform.setup()  # before JAX starts

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/generated.py:demo"
# The quick start's AP50 on the generated validation split, lowest and highest of the runs in the
# README (two seeds); an untrained or broken detector scores ~0.
MEASURED_AP50 = (0.64, 0.84)
AP50_BAR = 0.5
_STEP = re.compile(r"^step (\d+)/(\d+)")


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def _show(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)


def run(cmd: list[str]) -> float:
    _show(cmd)
    start = time.perf_counter()
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise DemoError(f"command failed: {shlex.join(cmd)}")
    seconds = time.perf_counter() - start
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def _bar(done: int, total: int, elapsed: float, first: tuple[int, float] | None) -> str:
    """`[#####.....] 150/600 (25%) 1:30 elapsed, ETA 4:30` (ETA from after the first step)."""
    width = 30
    fill = int(width * done / max(total, 1))
    eta = "ETA ?"
    if first is not None and done > first[0]:
        rate = (elapsed - first[1]) / (done - first[0])
        eta = f"ETA {_clock((total - done) * rate)}"
    pct = 100 * done / max(total, 1)
    return f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} ({pct:.0f}%) {_clock(elapsed)} elapsed, {eta}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


def train_with_progress(cmd: list[str], log_path: Path) -> float:
    """Run train.py with its `step N/T` lines as a progress bar, output to `log_path`; wall time."""
    _show(cmd)
    tty = sys.stdout.isatty()
    start = time.perf_counter()
    first: tuple[int, float] | None = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            m = _STEP.match(line)
            if not m:
                continue
            done, total = int(m.group(1)), int(m.group(2))
            elapsed = time.perf_counter() - start
            if first is None:
                first = (done, elapsed)
            bar = _bar(done, total, elapsed, first)
            print(("\r" + bar) if tty else bar, end="" if tty else "\n", flush=True)
        code = proc.wait()
    if tty:
        print(flush=True)
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise DemoError(f"training failed (exit {code}); last lines of {log_path}:\n{tail}")
    seconds = time.perf_counter() - start
    print(f"  ({seconds:.0f} s, log in {log_path})", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of training")
    parser.add_argument("--num_predictions", type=int, default=6, help="images to draw")
    # For tests and experiments: a smaller run (the gate still applies).
    parser.add_argument("--num_train", type=int, default=2000, help=argparse.SUPPRESS)
    parser.add_argument("--num_val", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--total_steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    data_dir = workdir / "data"
    overrides = [
        f"--config.data.data_dir={data_dir}",
        f"--config.data.generated_num_train={args.num_train}",
        f"--config.data.generated_num_val={args.num_val}",
        f"--config.data.generated_seed={args.seed}",
        f"--config.seed={args.seed}",
    ]
    train_overrides = [f"--config.train.total_steps={args.total_steps}"] if args.total_steps else []
    py = sys.executable
    start = time.perf_counter()
    try:
        run(
            [py, "-m", "daipnet_jax.data.generated", "--out", str(data_dir)]
            + ["--seed", str(args.seed), "--num_train", str(args.num_train)]
            + ["--num_val", str(args.num_val)]
        )
        workdir.mkdir(parents=True, exist_ok=True)
        train_with_progress(
            [py, "train.py", f"--config={CONFIG}", f"--workdir={workdir}", *overrides]
            + train_overrides,
            workdir / "train.log",
        )
        run([py, "evaluate.py", f"--config={CONFIG}", f"--workdir={workdir}", *overrides])
        images = sorted((data_dir / "images" / "val").glob("*"))[: args.num_predictions]
        predictions = workdir / "predictions"
        run(
            [py, "-m", "daipnet_jax.predict", f"--config={CONFIG}", f"--checkpoint={workdir}"]
            + [*overrides, f"--out={predictions}", "--score_threshold=0.3"]
            + [str(p) for p in images]
        )
    except DemoError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1

    metrics_file = workdir / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    minutes = (time.perf_counter() - start) / 60
    ap50 = float(metrics.get("AP50", 0.0))
    print(f"\n=== daipnet_jax demo: {minutes:.1f} min ===")
    for key in ("AP", "AP50", "AP75"):
        if key in metrics:
            print(f"  {key:5s} {metrics[key]:.3f}")
    print(f"  dataset:      {data_dir}")
    print(f"  checkpoints:  {workdir / 'checkpoints'}")
    print(f"  metrics:      {metrics_file} (+ per_class_ap.png, pr_curves.png)")
    print(f"  predictions:  {workdir / 'predictions'} (PNG + JSON)")
    print(f"  TensorBoard:  tensorboard --logdir {workdir}")
    if ap50 < AP50_BAR:
        print(
            f"\nFAILED: AP50 {ap50:.3f} is below the demo's bar of {AP50_BAR} (measured runs: "
            f"{MEASURED_AP50[0]}-{MEASURED_AP50[1]}). "
            f"The detector did not learn; see {workdir / 'train.log'}.",
            file=sys.stderr,
        )
        return 1
    print(f"\nOK: AP50 {ap50:.3f} >= {AP50_BAR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # platform.setup() ran at import, above
