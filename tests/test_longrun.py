"""Long runs: O(1) resume by record index, checkpoint fallback, the workdir's saved config,
checks before compilation and one-line errors, each run as the user runs it (train.py,
evaluate.py, predict in a subprocess) on the real model at width 0.0625 and generated data.

Every failing command is checked for its exit code, its one `error:` line on stderr (no
traceback) and that no file of the workdir changed (hashes before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from daipnet_jax import data
from daipnet_jax.checkpoints import load_variables

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    env.pop("DAIPNET_TRACEBACK", None)
    return env


def _run(args, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    if args[0].endswith(".py"):
        args[0] = str(REPO / args[0])  # the script; `cwd` may be elsewhere (relative paths)
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed command (and no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _data_flags(gen: dict) -> list[str]:
    return [
        f"--config.data.data_dir={gen['dir']}",
        f"--config.data.generated_num_train={gen['num_train']}",
        f"--config.data.generated_num_val={gen['num_val']}",
    ]


TRAIN_FLAGS = [
    "--config=configs/generated.py:daipnet300,width=0.0625",
    "--config.train.batch_size=2",
    "--config.train.eval_batch_size=2",
    "--config.train.warmup_epochs=0",
    "--config.train.log_every_steps=2",
    "--config.train.checkpoint_every_steps=2",
    "--config.data.max_boxes=8",
]


@pytest.fixture(scope="module")
def trained(generated_data, tmp_path_factory):
    """One uninterrupted train.py run of 4 steps (checkpoints 2 and 4, evaluation at the end)."""
    workdir = tmp_path_factory.mktemp("longrun") / "run"
    start = time.perf_counter()
    proc = _run(
        [
            "train.py",
            *TRAIN_FLAGS,
            *_data_flags(generated_data),
            "--config.train.total_steps=4",
            f"--workdir={workdir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\ntrain.py, 4 steps: {time.perf_counter() - start:.1f} s")
    return dict(workdir=workdir, stdout=proc.stdout, data=generated_data)


def _copy(trained, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(trained["workdir"], out)
    return out


def _truncate_largest_array(step_dir: Path) -> None:
    files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    big = files[-1]
    big.write_bytes(big.read_bytes()[:100])


# ------------------------------------------------------------------ O(1) resume, in process
def test_resume_by_record_index_gives_the_same_batches_per_process(tmp_path):
    """Two simulated processes; images without a usable box are filtered (so batch position
    and record index differ): batches after a restart at the checkpointed record index equal
    the uninterrupted stream's, and the restart produces no record before that index."""
    from conftest import write_coco_folder

    from daipnet_jax.config import base_config

    sizes = [(100 + 7 * i, 120 + 5 * i) for i in range(12)]
    ann = write_coco_folder(tmp_path, "train", sizes, seed=3)
    gt = json.loads(Path(ann).read_text())
    no_box = {gt["images"][k]["id"] for k in (1, 4, 5, 10)}
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] not in no_box]
    Path(ann).write_text(json.dumps(gt))
    c = base_config("daipnet300", "coco_folder", width=0.0625)
    c.data.source = "coco_folder"
    c.model.num_classes = 4
    c.data.annotation_file, c.data.image_dir = ann, str(tmp_path / "images" / "train")
    c.train.batch_size = 4
    for pi in range(2):
        it = data.make_train_iterator(c, pi, 2)
        reference = [next(it) for _ in range(9)]  # 4.5 epochs of the shard's 4 usable images
        it.close()
        for k in (1, 4, 7):
            start = it.next_index(k)
            # 2 examples per local batch; the 2 no-box images of the shard are skipped
            assert start >= 2 * k
            resumed = data.make_train_iterator(c, pi, 2, start_index=start)
            for j in range(k, 9):
                got = next(resumed)
                for key in got:
                    np.testing.assert_array_equal(got[key], reference[j][key], err_msg=key)
            resumed.close()
        assert it.next_index(9) > 18  # filtered examples were consumed


def test_index_stream_is_a_permutation_per_epoch_and_starts_anywhere():
    """Epoch e of the record stream is a permutation of the shard; starting at i yields the
    same (i, record) pairs as the stream from 0 does from i on."""
    from daipnet_jax.data.pipeline import _index_stream

    n = 7
    full = [(int(i), int(r)) for i, r in _index_stream(n, 5, 0).take(4 * n).as_numpy_iterator()]
    assert [i for i, _ in full] == list(range(4 * n))
    for e in range(4):
        assert sorted(r for _, r in full[e * n : (e + 1) * n]) == list(range(n))
    assert [r for _, r in full[:n]] != [r for _, r in full[n : 2 * n]]  # reshuffled per epoch
    for start in (3, 7, 19):
        got = [(int(i), int(r)) for i, r in _index_stream(n, 5, start).take(5).as_numpy_iterator()]
        assert got == full[start : start + 5]


# ------------------------------------------------------------------ resume through train.py
@pytest.mark.slow
def test_interrupted_run_with_damaged_checkpoint_resumes_exactly(trained, tmp_path):
    """train.py stopped after 3 steps (checkpoints 2, 3); step 3 is damaged (truncated array
    file). The rerun without --config (the saved one) moves step 3 aside with a one-line
    warning, resumes from 2 and ends with exactly the params of the uninterrupted run."""
    workdir = tmp_path / "interrupted"
    common = [*TRAIN_FLAGS, *_data_flags(trained["data"])]
    proc = _run(["train.py", *common, "--config.train.total_steps=3", f"--workdir={workdir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]
    _truncate_largest_array(workdir / "checkpoints" / "3")
    damaged = _hashes(workdir / "checkpoints" / "3")
    start = time.perf_counter()
    proc = _run(
        ["train.py", "--workdir=interrupted", "--config.train.total_steps=4"], cwd=tmp_path
    )  # a relative --workdir, the saved config
    print(f"\nresumed train.py: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "does not restore" in line]
    assert len(warnings) == 1 and "checkpoints/3 does not restore" in warnings[0], proc.stderr
    assert "checkpoints_unreadable/3" in warnings[0]
    assert _hashes(workdir / "checkpoints_unreadable" / "3") == damaged  # kept, unchanged
    assert "resumed from" in proc.stdout and "checkpoints/2 (data position 2, record 4)" in (
        proc.stdout
    )
    # The resumed run starts its stream at record 4 (not by replaying from 0), so the record
    # index it stores counts from the start of the stream: 4 steps of 2 usable images = 8.
    meta = json.loads((workdir / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["data_position"] == 4 and meta["record_index"] == [4 * 2]
    want = jax.tree_util.tree_leaves_with_path(load_variables(trained["workdir"], step=4))
    got = jax.tree_util.tree_leaves_with_path(load_variables(workdir, step=4))
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, x), (_, y) in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    # Not vacuous: steps 3 and 4 moved the parameters.
    before = jax.tree_util.tree_leaves(load_variables(workdir, step=2))
    assert max(float(np.max(np.abs(a - b))) for (_, a), b in zip(got, before, strict=True)) > 1e-4


# ------------------------------------------------------------------ evaluation fallback
@pytest.mark.slow
def test_evaluate_falls_back_and_partial_metrics(trained, tmp_path):
    """evaluate.py without --config or --step on a workdir whose newest step is damaged (a
    truncated array file): a one-line warning names step 4, step 2 is evaluated, step 4 stays
    on disk unchanged. --max_images writes metrics_partial.json only. A step's folder works as
    --checkpoint. A relative --checkpoint works for predict, which also reads the saved
    config."""
    workdir = _copy(trained, tmp_path)
    _truncate_largest_array(workdir / "checkpoints" / "4")
    before = _hashes(workdir)
    proc = _run(["evaluate.py", "--workdir=copy", "--max_images=3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "does not restore" in line]
    assert len(warnings) == 1 and "checkpoints/4 does not restore" in warnings[0], proc.stderr
    after = _hashes(workdir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed
    new = sorted(set(after) - set(before))
    assert [k for k in new if not k.startswith("events.out")] == ["eval/metrics_partial.json"]
    metrics = json.loads((workdir / "eval" / "metrics_partial.json").read_text())
    assert metrics["step"] == 2 and metrics["partial"] is True and metrics["num_images"] == 3
    # One step's folder as --checkpoint: that step, the workdir's config, outputs in the
    # workdir's eval/ (never inside the orbax step folder).
    (workdir / "eval" / "metrics_partial.json").unlink()
    proc = _run(["evaluate.py", "--checkpoint=copy/checkpoints/2", "--max_images=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((workdir / "eval" / "metrics_partial.json").read_text())
    assert metrics["step"] == 2 and metrics["num_images"] == 2
    assert {k: v for k, v in _hashes(workdir).items() if k.startswith("checkpoints")} == {
        k: v for k, v in after.items() if k.startswith("checkpoints")
    }
    # predict: relative checkpoint path, config from the workdir.
    img = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).save(img)
    proc = _run(
        ["-m", "daipnet_jax.predict", "--checkpoint=copy", "--out=pred", "--step=2", "in.png"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "pred" / "in.json").exists()


@pytest.mark.slow  # shares the trained workdir
def test_evaluate_errors_name_the_step(trained, tmp_path):
    """--step that does not exist lists the saved steps; when no step restores (a truncated
    array file in 4, a missing _METADATA in 2) both are named and nothing is evaluated."""
    workdir = _copy(trained, tmp_path)
    before = _hashes(workdir)
    line = _error_line(_run(["evaluate.py", f"--workdir={workdir}", "--step=3"]))
    assert line.endswith("no step 3 in " + str(workdir / "checkpoints") + "; saved steps: 2, 4")
    assert _hashes(workdir) == before
    _truncate_largest_array(workdir / "checkpoints" / "4")
    (workdir / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    before = _hashes(workdir)
    proc = _run(["evaluate.py", f"--workdir={workdir}"])
    line = _error_line(proc)
    assert "none of the steps 2, 4" in line and "restores" in line
    warned = [x for x in proc.stderr.splitlines() if "does not restore" in x]
    assert len(warned) == 2 and "checkpoints/4 " in warned[0] and "checkpoints/2 " in warned[1]
    assert _hashes(workdir) == before


_FILE_SIZE_LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _run_file_size_limited(limit: int, script: str, *args: str) -> subprocess.CompletedProcess:
    """`script args` in a process whose files may not grow past `limit` bytes (a full disk
    without root; Python ignores SIGXFSZ, so a write fails with EFBIG). The limit is set by the
    child itself: a `preexec_fn` would fork this multithreaded process."""
    return subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMITED, str(limit), str(REPO / script), *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # shares the trained workdir
def test_checkpoint_that_cannot_be_written_is_one_line_and_resumable(trained, tmp_path):
    """A resume whose checkpoint 6 cannot be written (files capped at 100 kB: the array files
    are larger) ends with one line naming step 6, the file and the newest complete
    checkpoint, exit 2; no unfinished folder is left, steps 2 and 4 are unchanged, and the
    next run without the cap resumes from 4 and saves 6."""
    workdir = _copy(trained, tmp_path)
    kept = {k: v for k, v in _hashes(workdir).items() if k.startswith("checkpoints/")}
    proc = _run_file_size_limited(
        100_000, "train.py", f"--workdir={workdir}", "--config.train.total_steps=6"
    )
    line = _error_line(proc)
    ck = workdir / "checkpoints"
    assert line.startswith(f"error: checkpoint {ck}/6 could not be written (File too large: "), line
    assert f"{ck}/6.orbax-checkpoint-tmp" in line  # the file
    assert line.endswith(f"the newest complete checkpoint is {ck}/4"), line
    assert sorted(p.name for p in ck.iterdir()) == ["2", "4"]
    assert {k: v for k, v in _hashes(workdir).items() if k.startswith("checkpoints/")} == kept
    proc = _run(["train.py", f"--workdir={workdir}", "--config.train.total_steps=6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ck}/4 " in proc.stdout
    assert sorted(p.name for p in ck.iterdir()) == ["2", "4", "6"]


@pytest.mark.slow  # shares the trained workdir
def test_checkpoints_path_that_is_a_file_is_refused_before_compiling(trained, tmp_path):
    """A workdir whose `checkpoints` is a file (not a folder): one line naming it, before
    anything is compiled (it used to fail at the first save, after the first steps)."""
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints")
    (workdir / "checkpoints").write_text("not a folder")
    proc = _run(["train.py", f"--workdir={workdir}", "--config.train.total_steps=6"])
    assert _error_line(proc) == f"error: {workdir / 'checkpoints'} is not a folder"
    assert "first step" not in proc.stdout


@pytest.mark.slow
def test_second_training_on_a_workdir_is_refused_and_sigkill_releases_it(generated_data, tmp_path):
    """While train.py A trains, train.py B on the same workdir is refused in one line naming
    A's pid, before it reads or writes anything. A killed with SIGKILL leaves no stale lock:
    the next run resumes from A's newest complete checkpoint."""
    workdir = tmp_path / "w"
    common = [*TRAIN_FLAGS, *_data_flags(generated_data), f"--workdir={workdir}"]
    log = tmp_path / "a.out"
    with open(log, "w") as out:
        a = subprocess.Popen(
            [sys.executable, "train.py", *common, "--config.train.total_steps=5000"],
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    try:
        start = time.time()
        while "first step" not in log.read_text():
            assert a.poll() is None and time.time() - start < 300
            time.sleep(0.1)
        b = _run(["train.py", *common, "--config.train.total_steps=3"])  # short if not refused
        assert a.poll() is None, "A ended before B was refused: the test proves nothing"
        line = _error_line(b)
        assert line.startswith(f"error: --workdir: {workdir} is in use by another training ")
        assert f"(pid {a.pid} on " in line
        assert "resumed from" not in b.stdout and "first step" not in b.stdout
        while not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]:
            assert a.poll() is None and time.time() - start < 300
            time.sleep(0.1)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == -signal.SIGKILL
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    proc = _run(["train.py", f"--workdir={workdir}", f"--config.train.total_steps={steps[-1] + 2}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/{steps[-1]} " in proc.stdout
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


def test_resume_of_a_finished_run_says_so(trained, tmp_path):
    """train.py on a workdir already at its last step trains nothing, says so, and leaves the
    checkpoints as they were."""
    workdir = _copy(trained, tmp_path)
    before = {k: v for k, v in _hashes(workdir).items() if k.startswith("checkpoints")}
    proc = _run(["train.py", "--workdir=copy"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4 already reaches the run's 4 steps: nothing to train" in proc.stdout
    assert "step 5" not in proc.stdout
    after = {k: v for k, v in _hashes(workdir).items() if k.startswith("checkpoints")}
    assert after == before


# ------------------------------------------------------------------ the saved config
@pytest.mark.slow  # shares the trained workdir
def test_saved_config_refuses_a_conflicting_config(trained, tmp_path):
    """config.json is the resolved config (readable JSON). A resume or evaluation with another
    model is refused in one line naming the keys; nothing in the workdir changes."""
    workdir = trained["workdir"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["width"] == 0.0625 and saved["train"]["total_steps"] == 4
    assert saved["data"]["data_dir"] == trained["data"]["dir"]
    before = _hashes(workdir)
    proc = _run(
        [
            "train.py",
            "--config=configs/generated.py:daipnet300,width=0.125",
            f"--workdir={workdir}",
            *_data_flags(trained["data"]),
        ]
    )
    line = _error_line(proc)
    assert "model.width=0.125 (saved 0.0625)" in line and "train.batch_size=32 (saved 2)" in line
    line = _error_line(
        _run(["evaluate.py", f"--workdir={workdir}", "--config.model.num_classes=5"])
    )
    assert "model.num_classes=5 (saved 4)" in line
    line = _error_line(
        _run(
            [
                "-m",
                "daipnet_jax.export",
                f"--checkpoint={workdir}",
                "--out=/nonexistent/x",
                "--config.priors.variances=(0.2,0.2)",
            ]
        )
    )
    assert "priors.variances" in line
    assert _hashes(workdir) == before
    # Without a workdir config, --config is required: one line.
    line = _error_line(_run(["evaluate.py", f"--workdir={tmp_path}"]))
    assert "--config is required" in line and "config.json" in line


# ------------------------------------------------------------------ checked before compiling
def test_unknown_config_key_is_one_line(tmp_path):
    line = _error_line(
        _run(
            [
                "train.py",
                "--config=configs/generated.py:lrf300",
                f"--workdir={tmp_path / 'w'}",
                "--config.train.batch_sise=4",
            ]
        )
    )
    assert (
        line
        == "error: --config.train.batch_sise: no such config key; did you mean --config.train.batch_size?"
    )
    assert not (tmp_path / "w").exists()


def test_unloadable_config_file_is_one_line(tmp_path):
    """A missing config file, and a config file whose `get_config` refuses its argument (an
    unknown variant, a typo'd or malformed argument): one line naming the file or argument and
    the reason, exit 2, nothing created; the same through evaluate.py."""
    workdir = tmp_path / "w"
    cases = [
        ("configs/nothere.py", "No such file or directory: 'configs/nothere.py'"),
        ("configs/generated.py:daipnet3000", "unknown model variant 'daipnet3000'"),
        ("configs/generated.py:lrf300,widht=2", "config argument 'widht'"),
        ("configs/generated.py:lrf300,width=abc", "width='abc'"),
    ]
    for config, reason in cases:
        line = _error_line(_run(["train.py", f"--config={config}", f"--workdir={workdir}"]))
        assert line.startswith("error: ") and reason in line, (config, line)
        assert "--config" in line
    line = _error_line(_run(["evaluate.py", "--config=configs/nothere.py", f"--workdir={workdir}"]))
    assert "No such file or directory: 'configs/nothere.py'" in line
    # no --config, and a workdir that does not exist: said so
    line = _error_line(_run(["evaluate.py", f"--workdir={workdir}"]))
    assert f"--config is required (--workdir {workdir} does not exist)" in line
    assert not workdir.exists()


def test_help_needs_no_config(tmp_path):
    """`--help` answers without `--config` (it used to say --config is required), exit 0; a
    stray positional argument is one line."""
    for script, flag in (("train.py", "--workdir"), ("evaluate.py", "--checkpoint")):
        proc = _run([script, "--help"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert flag in proc.stdout + proc.stderr and "error:" not in proc.stderr
    proc = _run(["-m", "daipnet_jax.export", "--helpshort"], cwd=REPO)
    assert proc.returncode == 0 and "--out" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    # a stray argument: one line (absl printed the whole usage text), exit 2
    args = ["train.py", "--config=configs/generated.py:lrf300", "--workdir=w", "stray"]
    line = _error_line(_run(args, cwd=tmp_path))
    assert line == "error: unexpected arguments: ['stray'] (--helpshort lists the flags)"
    assert not (tmp_path / "w").exists()


def test_evaluate_checks_the_checkpoint_before_the_data(tmp_path):
    """A checkpoint that does not exist is refused before the evaluation data is read: the
    data folder named in the config does not exist either, and the error names the checkpoint."""
    line = _error_line(
        _run(
            [
                "evaluate.py",
                "--config=configs/generated.py:lrf300",
                f"--workdir={tmp_path / 'none'}",
                f"--config.data.data_dir={tmp_path / 'no_data'}",
            ]
        )
    )
    assert line == f"error: checkpoint path {str(tmp_path / 'none')!r} does not exist"
    assert not (tmp_path / "no_data").exists()


def _folder_flags(ann: Path, img_dir: Path, *, num_classes: int = 4) -> list[str]:
    return [
        "--config=configs/coco.py:daipnet300,width=0.0625",
        "--config.data.source=coco_folder",
        f"--config.model.num_classes={num_classes}",
        f"--config.data.annotation_file={ann}",
        f"--config.data.image_dir={img_dir}",
        f"--config.data.eval_annotation_file={ann}",
        f"--config.data.eval_image_dir={img_dir}",
        "--config.train.batch_size=2",
    ]


def test_bad_training_data_fails_before_compiling(coco_folder_data, tmp_path):
    """A missing annotation file, an image folder without the listed images, a folder where
    no image has a usable box (it used to hang) and a wrong num_classes: one line each, exit
    2, before any compilation, nothing written (a workdir the run made is removed again)."""
    ann, img_dir = Path(coco_folder_data["annotation_file"]), Path(coco_folder_data["image_dir"])
    workdir = tmp_path / "w"
    cases = []
    missing = tmp_path / "nope.json"
    cases.append(
        (_folder_flags(missing, img_dir), f"data.annotation_file: {missing} does not exist")
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(
        (
            _folder_flags(ann, empty),
            f"data.image_dir: no image was found: {ann} lists 7 images, none readable in {empty}",
        )
    )
    gt = json.loads(ann.read_text())
    gt["annotations"] = [dict(a, iscrowd=1) for a in gt["annotations"]]
    crowd_only = tmp_path / "crowd_only.json"
    crowd_only.write_text(json.dumps(gt))
    cases.append(
        (
            _folder_flags(crowd_only, img_dir),
            "train.batch_size: 2 exceeds the 0 usable training images",
        )
    )
    cases.append(
        (
            _folder_flags(ann, img_dir, num_classes=81),
            "model.num_classes: 81 does not match the 3 categories of",
        )
    )
    for flags, message in cases:
        start = time.perf_counter()
        proc = _run(["train.py", *flags, f"--workdir={workdir}"], timeout=300)
        line = _error_line(proc)
        assert message in line, (message, line)
        assert "first step" not in proc.stdout
        assert not workdir.exists()  # not even an empty workdir is left behind
        print(f"\n{message[:40]}: {time.perf_counter() - start:.1f} s")
    # an existing (empty) workdir is the user's: it stays
    workdir.mkdir()
    _error_line(_run(["train.py", *cases[0][0], f"--workdir={workdir}"], timeout=300))
    assert workdir.is_dir()


@pytest.mark.slow  # shares the trained workdir
def test_evaluation_errors_keep_earlier_metrics(trained, tmp_path):
    """An empty evaluation image folder and an unwritable eval folder fail before evaluating,
    in one line; metrics written earlier are not touched."""
    workdir = _copy(trained, tmp_path)
    (workdir / "eval").mkdir(exist_ok=True)  # training's final evaluation may have made it
    (workdir / "eval" / "metrics.json").write_text('{"AP": 0.25, "step": 4}')
    before = _hashes(workdir)
    ann = Path(trained["data"]["dir"]) / "instances_val.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _error_line(
        _run(
            [
                "evaluate.py",
                f"--workdir={workdir}",
                "--config.data.source=coco_folder",
                f"--config.data.annotation_file={ann}",
                f"--config.data.image_dir={empty}",
                f"--config.data.eval_annotation_file={ann}",
                f"--config.data.eval_image_dir={empty}",
            ]
        )
    )
    assert f"data.eval_image_dir: no image was found: {ann} lists" in line and str(empty) in line
    assert _hashes(workdir) == before
    # A workdir whose eval folder cannot be written (a file in its place; chmod does not stop
    # root): refused before evaluating.
    blocked = _copy(trained, tmp_path, "blocked")
    shutil.rmtree(blocked / "eval", ignore_errors=True)
    (blocked / "eval").write_text("not a folder")
    before = _hashes(blocked)
    line = _error_line(_run(["evaluate.py", f"--workdir={blocked}"]))
    assert line.startswith("error: --workdir: ") and "is not writable" in line
    assert _hashes(blocked) == before
    if os.geteuid() != 0:
        readonly = _copy(trained, tmp_path, "readonly")
        for p in [readonly, *readonly.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        try:
            line = _error_line(_run(["evaluate.py", f"--workdir={readonly}"]))
            assert "is not writable" in line
        finally:
            for p in [readonly, *readonly.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)


@pytest.mark.slow  # shares the trained workdir
def test_evaluation_outputs_that_cannot_be_written_keep_earlier_ones(trained, tmp_path):
    """evaluate.py whose detections file cannot be written (files capped at 50 kB, the file is
    larger): one line naming the file and the step, exit 2; every file in eval/ is as the
    training's final evaluation left it, and no temporary file stays."""
    workdir = _copy(trained, tmp_path)
    before = {k: v for k, v in _hashes(workdir).items() if k.startswith("eval/")}
    assert "eval/metrics.json" in before and "eval/metrics_4.json" in before
    proc = _run_file_size_limited(50_000, "evaluate.py", f"--workdir={workdir}")
    line = _error_line(proc)
    results = [k for k in before if k.startswith("eval/detections_")]
    assert line == (
        f"error: {workdir / results[0]}: File too large (writing the evaluation of step 4)"
    )
    assert {k: v for k, v in _hashes(workdir).items() if k.startswith("eval/")} == before


@pytest.mark.slow
def test_sigterm_before_the_first_step_ends_at_once(generated_data, tmp_path):
    """SIGTERM while train.py reads data and compiles (before the step loop's handler) ends
    the process at once, not after compilation."""
    workdir = tmp_path / "w"
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *TRAIN_FLAGS,
            *_data_flags(generated_data),
            "--config.train.total_steps=4",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.time()
    while not (workdir / "config.json").exists():  # written just before compilation
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    out, _ = proc.communicate(timeout=60)
    assert time.time() - sent < 5, "SIGTERM was not honoured at once"
    assert proc.returncode == -signal.SIGTERM
    assert "first step" not in out
