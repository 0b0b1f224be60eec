"""Resume cost: time to the first training batch after a restart at batch position P vs 0.

A restart builds the training iterator from nothing (the folder's JSON parsed and its images
header-checked again, the tf.data pipeline built) and takes one batch. At position P the
iterator starts at record index P · batch (the generated images all have boxes, so no example
is filtered), which the stream reaches without producing any record before it. The reference is
the same restart at position 0, alternated with it in the same process (median of `--reps`).
For scale, the time per batch of the running stream gives what replaying P batches (decoding and
augmenting them, as a resume by skipping would) costs.

Data: the generated dataset at its default size (2000 training images, 300×300), written once
into `--data_dir`; the recipe's batch 32.

    python bench/resume.py            # ~3 min on 2 cores (most of it writing the dataset once)
    python bench/resume.py --quick    # smoke test

Last line: `RESULT resume_first_batch_ratio=<at P / at 0> resume_first_batch_s=<at P>
resume_position=<P> replay_estimate_s=<P × time per batch>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def first_batch_seconds(config, start_index: int) -> float:
    from daipnet_jax import data
    from daipnet_jax.data import sources

    sources._load_folder.cache_clear()  # a restart parses and checks the folder again
    t0 = time.perf_counter()
    it = data.make_train_iterator(config, 0, 1, start_index=start_index)
    next(it)
    seconds = time.perf_counter() - t0
    it.close()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--position", type=int, default=10_000, help="batch position P")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "daipnet_resume"))
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from daipnet_jax import data
    from daipnet_jax.config import base_config

    c = base_config("daipnet300", "generated", width=0.0625)
    c.data.data_dir = args.data_dir
    if args.quick:
        c.data.generated_num_train, c.data.generated_num_val = 40, 4
        c.train.batch_size = 4
        args.position, args.reps = 100, 1
        c.data.data_dir = args.data_dir + "_quick"
    b = int(c.train.batch_size)
    t0 = time.perf_counter()
    n = data.num_examples(c, "train")  # writes the dataset on first use
    print(f"generated dataset: {n} training images ({time.perf_counter() - t0:.0f} s)")
    first_batch_seconds(c, 0)  # warm-up: imports, tf.data start-up
    at_zero, at_p = [], []
    for _ in range(args.reps):
        at_zero.append(first_batch_seconds(c, 0))
        at_p.append(first_batch_seconds(c, args.position * b))
        print(f"first batch: position 0 {at_zero[-1]:.2f} s, {args.position} {at_p[-1]:.2f} s")
    zero, pos = statistics.median(at_zero), statistics.median(at_p)
    # The running stream's time per batch (what replaying P batches would cost each).
    it = data.make_train_iterator(c, 0, 1)
    next(it)
    k = 5 if args.quick else 20
    t0 = time.perf_counter()
    for _ in range(k):
        next(it)
    per_batch = (time.perf_counter() - t0) / k
    it.close()
    print(
        f"time to the first batch: position {args.position} {pos:.2f} s, position 0 {zero:.2f} s"
        f" (ratio {pos / zero:.3f}); replaying {args.position} batches would take about"
        f" {args.position * per_batch / 60:.1f} min ({per_batch:.3f} s per batch of {b})"
    )
    print(
        f"RESULT resume_first_batch_ratio={pos / zero:.3f} resume_first_batch_s={pos:.2f}"
        f" resume_position={args.position} replay_estimate_s={args.position * per_batch:.0f}"
    )


if __name__ == "__main__":
    main()
