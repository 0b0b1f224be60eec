"""`make demo`'s driver: a run that did not learn is reported as a failure, never as a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_gate_fails_an_untrained_detector(tmp_path):
    """Two training steps on 16 images cannot detect anything: the demo must run every stage,
    then exit non-zero with a plain message naming AP50 and the bar."""
    from daipnet_jax import demo

    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "daipnet_jax.demo", "--workdir", "w", "--num_train", "16"]
        + ["--num_val", "4", "--total_steps", "2", "--num_predictions", "1", "--seed", "3"],
        cwd=tmp_path,  # relative workdir, resolved against the caller's directory
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    metrics = json.loads((tmp_path / "w" / "eval" / "metrics.json").read_text())
    assert metrics["AP50"] < demo.AP50_BAR
    assert f"FAILED: AP50 {metrics['AP50']:.3f} is below the demo's bar of {demo.AP50_BAR}" in (
        out.stderr
    )
    # every stage ran: progress bar from train.py's step lines, the log, predictions
    assert "[" in out.stdout and "2/2 (100%)" in out.stdout
    assert (tmp_path / "w" / "train.log").stat().st_size > 0
    assert list((tmp_path / "w" / "predictions").glob("*.png"))
    # --seed is the data's seed too, and the saved config says so (a resume or an evaluation
    # of this workdir names the same dataset)
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    written = json.loads((tmp_path / "w" / "data" / "meta.json").read_text())
    assert saved["seed"] == saved["data"]["generated_seed"] == written["seed"] == 3
    assert "was written with" not in (tmp_path / "w" / "train.log").read_text()
