"""The bench scripts keep running (tiny sizes), and their RESULT lines are collected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import run_all  # noqa: E402


def test_parse_results_collects_every_pair():
    output = "warm-up\nRESULT a=1.5 b=2\nnoise RESULT c=3\n  RESULT d=x=y\n"
    assert run_all.parse_results(output) == {"a": "1.5", "b": "2", "d": "x=y"}


@pytest.mark.slow
def test_every_bench_script_runs_quick(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert "quick" in table
    rows = [line.split("|")[1:4] for line in table.splitlines() if line.startswith("| ")][1:]
    scripts = {r[0].strip() for r in rows}
    assert scripts == set(run_all.SCRIPTS), scripts
    for _script, key, value in rows:
        number = value.strip().rstrip("x")
        if key.strip() != "best":  # names the fastest conv variant
            float(number)  # every measure is a number
