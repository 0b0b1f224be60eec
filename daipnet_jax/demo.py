"""The quick start behind `make demo`: generate data, train, evaluate, draw predictions.

Runs the project's own command lines one after another, exactly as a user would type them:

1. `python -m daipnet_jax.data.generated --out WORKDIR/data` writes the built-in dataset;
2. `python train.py --config configs/generated.py:demo --workdir WORKDIR ...` trains a
   width-reduced DAIPNet300 for a bounded wall time (checkpoints, TensorBoard logs);
3. `python evaluate.py --config ... --workdir WORKDIR` scores it with pycocotools;
4. `python -m daipnet_jax.predict ...` draws the detections of a few validation images.

    python -m daipnet_jax.demo --workdir runs/demo [--train_minutes 11] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    from daipnet_jax import platform

    platform.setup()  # before JAX starts

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--train_minutes", type=float, default=11.0, help="training wall time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_predictions", type=int, default=6, help="images to draw")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    data_dir = workdir / "data"
    config = "configs/generated.py:demo"
    overrides = [f"--config.data.data_dir={data_dir}", f"--config.seed={args.seed}"]
    py = sys.executable
    start = time.perf_counter()

    run([py, "-m", "daipnet_jax.data.generated", "--out", str(data_dir), "--seed", str(args.seed)])
    run(
        [py, "train.py", f"--config={config}", f"--workdir={workdir}", *overrides]
        + [f"--config.train.max_train_seconds={args.train_minutes * 60:.0f}"]
    )
    run([py, "evaluate.py", f"--config={config}", f"--workdir={workdir}", *overrides])
    images = sorted((data_dir / "images" / "val").glob("*"))[: args.num_predictions]
    predictions = workdir / "predictions"
    run(
        [py, "-m", "daipnet_jax.predict", f"--config={config}", f"--checkpoint={workdir}"]
        + [*overrides, f"--out={predictions}", "--score_threshold=0.3"]
        + [str(p) for p in images]
    )

    metrics_file = workdir / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    print(f"\n=== daipnet_jax demo finished in {(time.perf_counter() - start) / 60:.1f} min ===")
    for key in ("AP", "AP50", "AP75"):
        if key in metrics:
            print(f"  {key:5s} {metrics[key]:.3f}")
    print(f"  dataset:      {data_dir}")
    print(f"  checkpoints:  {workdir / 'checkpoints'}")
    print(f"  metrics:      {metrics_file}")
    print(f"  predictions:  {predictions} (PNG + JSON)")
    print(f"  TensorBoard:  tensorboard --logdir {workdir}")


if __name__ == "__main__":
    main()
