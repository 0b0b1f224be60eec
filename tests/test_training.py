"""Training: schedule, optimiser, config validation, NaN guard, loop, overfitting."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
from training_support import (
    optax_and_torch_steps,
    synthetic_batches,
    tiny_detector,
    tiny_train_config,
)

from daipnet_jax import config as config_lib
from daipnet_jax.checkpoints import Checkpointer, load_variables
from daipnet_jax.config import ConfigError, base_config
from daipnet_jax.training import NonFiniteError
from daipnet_jax.training import schedule as schedule_lib
from daipnet_jax.validate import validate_config

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ schedule
def recipe_lr(step, *, peak, init, warmup, boundaries, factor=0.1):
    """The recipe in words (paper Section 4.2), written independently of schedule.py."""
    if step < warmup:
        return init + (peak - init) * step / warmup
    lr = peak
    for b in boundaries:
        if step >= b:
            lr *= factor
    return lr


@pytest.mark.parametrize("dataset", ["coco", "voc"])
def test_schedule_matches_recipe(dataset):
    c = base_config("daipnet300", dataset)
    c.train.batch_size = 64  # lr scales linearly: 4e-3 · 64/32
    examples = 117_266 if dataset == "coco" else 16_551
    spe = config_lib.steps_per_epoch(c, examples)
    assert spe == examples // 64
    decay = [90, 120, 140] if dataset == "coco" else [150, 200]
    end = 160 if dataset == "coco" else 250
    assert config_lib.total_steps(c, spe) == end * spe
    sched = schedule_lib.learning_rate_schedule(c, spe)
    ref = dict(peak=8e-3, init=1e-6, warmup=6 * spe, boundaries=[e * spe for e in decay])
    steps = [0, 1, 3 * spe, 6 * spe - 1, 6 * spe, 50 * spe]
    for e in decay:
        steps += [e * spe - 1, e * spe, e * spe + 1]
    steps.append(end * spe - 1)
    for s in steps:
        np.testing.assert_allclose(float(sched(s)), recipe_lr(s, **ref), rtol=2e-6, err_msg=f"{s}")
    # hand-worked values: start, mid warm-up, peak, after the last decay
    assert float(sched(0)) == pytest.approx(1e-6, rel=1e-6)
    assert float(sched(3 * spe)) == pytest.approx((1e-6 + 8e-3) / 2, rel=1e-6)
    assert float(sched(6 * spe)) == pytest.approx(8e-3, rel=1e-6)
    assert float(sched(end * spe - 1)) == pytest.approx(8e-3 * 0.1 ** len(decay), rel=1e-5)


def test_schedule_switches():
    c = base_config("lrf300", "coco")
    c.train.batch_size = 8
    c.train.scale_lr_with_batch = False
    c.train.total_steps = 500
    spe = config_lib.steps_per_epoch(c, 800)  # 100 steps per epoch
    assert spe == 100
    assert config_lib.total_steps(c, spe) == 500  # overrides 160 epochs
    sched = schedule_lib.learning_rate_schedule(c, spe)
    assert float(sched(600)) == pytest.approx(4e-3, rel=1e-6)  # no scaling with batch 8
    assert float(sched(300)) == pytest.approx(1e-6 + (4e-3 - 1e-6) / 2, rel=1e-6)
    c.train.train_examples = 1600  # config override of the epoch size
    assert config_lib.steps_per_epoch(c, 800) == 200
    c.train.batch_size = 4000
    with pytest.raises(ValueError, match="batch_size"):
        config_lib.steps_per_epoch(c, 800)


def test_optimizer_is_pytorch_sgd_with_weight_decay():
    """optax chain == torch.optim.SGD(momentum=0.9, weight_decay=5e-4) over steps with varying lr."""
    torch = pytest.importorskip("torch")
    c = base_config("daipnet300", "coco")
    c.train.weight_decay = 5e-4
    lrs = [0.1, 0.05, 0.2, 0.01]
    tx = schedule_lib.make_optimizer(c, lambda step: jax.numpy.asarray(lrs)[step])
    ours, theirs = optax_and_torch_steps(
        tx, lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=5e-4), lrs
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ validation
BAD_VALUES = [
    ("model.family", "yolo"),
    ("model.aux", "fpn"),
    ("model.topdown", "bifpn"),
    ("model.image_size", 320),
    ("model.num_classes", 21),  # COCO has 80 + background
    ("model.dtype", "float16"),
    ("model.width", 0.0),
    ("data.source", "imagenet"),
    ("model.dtype", "float64"),  # without jax_enable_x64 (the tests run without it)
    ("train.batch_size", 0),
    ("train.base_lr", -0.1),
    ("train.momentum", 1.5),
    ("train.weight_decay", -5e-4),
    ("train.decay_epochs", (120, 90)),
    ("train.total_steps", 0),
    ("train.match_iou", 0.0),
    ("train.transfer_guard", "sometimes"),
    ("train.optimizer", "adamw"),
    ("postprocess.nms_iou", 1.5),
    ("postprocess.nms_iou", 0.0),
    ("postprocess.score_threshold", -1.0),
    ("postprocess.score_threshold", 1.0),
    ("postprocess.max_detections", 0),
    ("postprocess.pre_nms_top_k", -1),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_config_value_names_key(key, value):
    c = base_config("daipnet300", "coco")
    validate_config(c, device_count=1)  # the defaults are valid
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError) as err:
        validate_config(c, device_count=1)
    assert err.value.key == key
    assert str(err.value).startswith(key)
    assert isinstance(err.value, ValueError)


def test_inconsistent_configs_name_key():
    c = base_config("daipnet300", "coco")
    c.train.batch_size = 6
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 6 is not divisible by the 4"):
        validate_config(c, device_count=4)
    validate_config(c, device_count=3)
    # Every process reads its own share of each batch, the evaluation's included.
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 6 is not divisible by the 4 pro"):
        validate_config(c, device_count=2, process_count=4)
    c.train.batch_size = 12
    with pytest.raises(ConfigError, match=r"^train\.eval_batch_size: 8 is not divisible by the 3"):
        validate_config(c, device_count=6, process_count=3)
    c.train.eval_batch_size = 6
    validate_config(c, device_count=2, process_count=2)
    c = base_config("daipnet300", "voc")
    c.model.num_classes = 81
    with pytest.raises(ConfigError, match=r"^model.num_classes"):
        validate_config(c, device_count=1)
    c = base_config("daipnet512", "coco")
    c.model.image_size = 300  # priors still those of 512
    with pytest.raises(ConfigError, match=r"^priors.feature_maps"):
        validate_config(c, device_count=1)
    c = base_config("daipnet300", "coco")
    c.data.source = "coco_folder"
    with pytest.raises(ConfigError, match=r"^data.annotation_file"):
        validate_config(c, device_count=1)


def test_cli_refuses_unknown_and_bad_keys(tmp_path):
    """train.py: ml_collections refuses an unknown key; validation a bad value, exit code 2."""

    def train(*flags):
        return subprocess.run(
            [sys.executable, "train.py", "--config=configs/generated.py:lrf300", *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    r = train(f"--workdir={tmp_path}", "--config.train.no_such_key=1")
    assert r.returncode != 0
    assert "no_such_key" in r.stderr
    r = train(f"--workdir={tmp_path}", "--config.train.base_lr=-1.0")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "train.base_lr" in r.stderr
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------ loop
def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    """A NaN image at batch 3: the run stops naming step 3, checkpoint 2 stays the latest."""
    from daipnet_jax.training import train_and_evaluate

    c = tiny_train_config(batch_size=2, total_steps=8, checkpoint_every_steps=2)
    c.train.log_every_steps = 5  # caught before the step-4 checkpoint, not at a log step
    with pytest.raises(NonFiniteError, match=r"non-finite .*conf loss.* at step 3 ") as err:
        train_and_evaluate(
            c,
            str(tmp_path),
            model=tiny_detector(c),
            train_iter_fn=lambda cfg, pi, pc: synthetic_batches(cfg, pi, pc, nan_at=3),
            eval_fn=lambda cfg, v, s: {},
        )
    assert "checkpoints/2" in str(err.value)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]
    variables = load_variables(tmp_path)
    for leaf in jax.tree_util.tree_leaves(variables):
        assert np.all(np.isfinite(leaf))


def test_loop_checkpoints_eval_and_resume(tmp_path):
    """Periodic + final checkpoints, evaluation calls, the best step by AP kept apart, and a
    second call that only resumes."""
    import json

    from daipnet_jax.training import train_and_evaluate

    c = tiny_train_config(batch_size=2, total_steps=4, checkpoint_every_steps=2)
    c.train.eval_every_steps = 3
    calls = []

    def eval_fn(cfg, variables, step):
        calls.append((step, sorted(variables)))
        return {"AP": {3: 0.5, 4: 0.4, 5: 0.6}[step]}

    it = lambda cfg, pi, pc: synthetic_batches(cfg, pi, pc)  # noqa: E731
    state = train_and_evaluate(
        c, str(tmp_path), model=tiny_detector(c), train_iter_fn=it, eval_fn=eval_fn
    )
    assert int(state.step) == 4
    assert calls == [(3, ["batch_stats", "params"]), (4, ["batch_stats", "params"])]
    ck = Checkpointer(tmp_path / "checkpoints")
    assert ck.all_steps() == [2, 3, 4]  # 3: the evaluated step, saved to be kept as the best
    assert json.loads((tmp_path / "best.json").read_text()) == dict(step=3, metric="AP", value=0.5)
    assert Checkpointer(tmp_path / "checkpoints_best").all_steps() == [3]
    np.testing.assert_array_equal(
        jax.tree_util.tree_leaves(load_variables(tmp_path / "checkpoints_best")["params"])[0],
        jax.tree_util.tree_leaves(load_variables(tmp_path, step=3)["params"])[0],
    )
    _, meta = ck.restore(
        jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), 4
    )
    assert meta["data_position"] == 4
    np.testing.assert_array_equal(
        jax.tree_util.tree_leaves(load_variables(tmp_path, step=4)["params"])[0],
        np.asarray(jax.tree_util.tree_leaves(state.params)[0]),
    )
    assert list((tmp_path).glob("events.out.tfevents*")), "no TensorBoard file"
    # Same workdir again: resumes at step 4 = total, trains nothing more.
    c.train.total_steps = 5
    state2 = train_and_evaluate(
        c, str(tmp_path), model=tiny_detector(c), train_iter_fn=it, eval_fn=eval_fn
    )
    assert int(state2.step) == 5
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 3, 4, 5]
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 5  # AP 0.6 > 0.5
    assert Checkpointer(tmp_path / "checkpoints_best").all_steps() == [5]


def test_best_checkpoint_copy_that_fails_keeps_the_previous_best(tmp_path, monkeypatch):
    """AP improves at step 4 but copying it to checkpoints_best/ fails half-way (no space
    left): an OSError names checkpoints_best and step 4; best.json and checkpoints_best/ still
    hold step 2 (restorable, equal to checkpoint 2) and nothing staged is left."""
    import json
    import shutil

    from daipnet_jax.training import train_and_evaluate

    c = tiny_train_config(batch_size=2, total_steps=4, checkpoint_every_steps=2)
    c.train.eval_every_steps = 2
    real_copytree = shutil.copytree

    def copytree(src, dst, *args, **kwargs):
        if str(dst).endswith("/4"):
            real_copytree(src, dst, *args, **kwargs)  # the copy is written, then space runs out
            raise shutil.Error([(str(src), str(dst), "[Errno 28] No space left on device")])
        return real_copytree(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copytree)
    with pytest.raises(OSError) as err:
        train_and_evaluate(
            c,
            str(tmp_path),
            model=tiny_detector(c),
            train_iter_fn=lambda cfg, pi, pc: synthetic_batches(cfg, pi, pc),
            eval_fn=lambda cfg, v, s: {"AP": {2: 0.5, 4: 0.6}[s]},
        )
    assert err.value.filename == str(tmp_path / "checkpoints_best")
    assert "No space left on device (copying the best checkpoint, step 4;" in str(err.value)
    assert json.loads((tmp_path / "best.json").read_text()) == dict(step=2, metric="AP", value=0.5)
    assert Checkpointer(tmp_path / "checkpoints_best").all_steps() == [2]
    np.testing.assert_array_equal(
        jax.tree_util.tree_leaves(load_variables(tmp_path / "checkpoints_best")["params"])[0],
        jax.tree_util.tree_leaves(load_variables(tmp_path, step=2)["params"])[0],
    )
    assert sorted(p.name for p in tmp_path.iterdir() if "best" in p.name) == [
        "best.json",
        "checkpoints_best",
    ]


def test_best_bookkeeping_killed_between_renames_is_repaired_on_resume(tmp_path):
    """A run killed while it swapped in a new best (after moving the previous best aside; or
    after the folder, before best.json): the next run restores the previous best, or completes
    the swap, so that best.json names the step in checkpoints_best/."""
    import json
    import shutil

    from daipnet_jax.training import train_and_evaluate

    c = tiny_train_config(batch_size=2, total_steps=4, checkpoint_every_steps=2)
    c.train.eval_every_steps = 2
    it = lambda cfg, pi, pc: synthetic_batches(cfg, pi, pc)  # noqa: E731

    def run(results):
        train_and_evaluate(
            c, str(tmp_path), model=tiny_detector(c), train_iter_fn=it, eval_fn=results
        )

    run(lambda cfg, v, s: {"AP": {2: 0.5, 4: 0.4}[s]})
    best_dir, best_file = tmp_path / "checkpoints_best", tmp_path / "best.json"
    staged_4 = json.dumps(dict(step=4, metric="AP", value=0.6))
    # killed after moving the previous best aside, before the new one was in place
    best_dir.rename(tmp_path / ".checkpoints_best.old")
    (tmp_path / ".best.json.tmp").write_text(staged_4)
    run(lambda cfg, v, s: {})
    assert Checkpointer(best_dir).all_steps() == [2]
    assert json.loads(best_file.read_text())["step"] == 2
    # killed after the new folder was in place, before best.json was renamed
    shutil.rmtree(best_dir)
    shutil.copytree(tmp_path / "checkpoints" / "4", best_dir / "4")
    (tmp_path / ".best.json.tmp").write_text(staged_4)
    run(lambda cfg, v, s: {})
    assert json.loads(best_file.read_text()) == dict(step=4, metric="AP", value=0.6)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "best" in p.name]


@pytest.mark.slow
def test_daipnet_overfits_generated_images(tmp_path, capsys):
    """Real model + real data pipeline + the loop: width-0.0625 DAIPNet300 on 4 generated images
    (no augmentation), 40 steps of batch 2: the loss of the last 5 steps is below 1/4 of the
    first 5 steps' (measured: ~34 → ~2 on a fixed batch)."""
    import importlib.util

    from daipnet_jax.training import train_and_evaluate

    spec = importlib.util.spec_from_file_location("gen_cfg", REPO / "configs" / "generated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("daipnet300,width=0.0625")
    c.data.data_dir = str(tmp_path / "data")
    c.data.generated_num_train, c.data.generated_num_val = 4, 2
    c.data.augment = False
    c.train.batch_size = 2
    c.train.total_steps = 40
    c.train.warmup_epochs = 0
    c.train.base_lr, c.train.scale_lr_with_batch = 0.01, False
    c.train.log_every_steps = 5
    c.train.checkpoint_every_steps = 1000
    evaluated = []
    state = train_and_evaluate(
        c, str(tmp_path / "run"), eval_fn=lambda cfg, v, s: evaluated.append(s) or {}
    )
    out = capsys.readouterr().out
    losses = [
        float(line.split(" loss ")[1].split()[0])
        for line in out.splitlines()
        if line.startswith("step ") and " loss " in line
    ]
    with capsys.disabled():
        print("\noverfit losses per 5-step window:", losses)
    assert len(losses) == 8, out
    assert losses[-1] < losses[0] / 4, losses
    assert int(state.step) == 40 and evaluated == [40]
    assert "ETA" in out
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [40]


@pytest.mark.slow
def test_init_from_converted_vgg(tmp_path):
    """`init.vgg` grafts the converter's saved backbone into a fresh init; the rest is unchanged."""
    from daipnet_jax import checkpoints, models
    from daipnet_jax.training.loop import initial_variables

    c = base_config("ssd300", "coco", width=0.0625)
    model = models.build(c)
    key = jax.random.PRNGKey(3)
    fresh = initial_variables(c, model, key)
    rng = np.random.default_rng(0)
    backbone = jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), fresh["params"]["backbone"]
    )
    checkpoints.save_variables(
        {"params": {"backbone": backbone}}, tmp_path / "vgg", {"format": "t"}
    )
    c.init.vgg = str(tmp_path / "vgg")
    merged = initial_variables(c, model, key)
    flat_fresh = dict(jax.tree_util.tree_leaves_with_path(fresh))
    flat_bb = dict(jax.tree_util.tree_leaves_with_path({"params": {"backbone": backbone}}))
    flat_merged = dict(jax.tree_util.tree_leaves_with_path(merged))
    assert flat_merged.keys() == flat_fresh.keys()
    assert flat_bb and set(flat_bb) < set(flat_merged)
    for path, leaf in flat_merged.items():
        np.testing.assert_array_equal(leaf, flat_bb.get(path, flat_fresh[path]))


def test_validation_reads_the_source_registry(monkeypatch):
    """A data source registered in `data.sources.SOURCES` (CONTRIBUTING, adding a dataset) is
    one that validation accepts; no second list to keep in step."""
    from daipnet_jax.data import sources

    c = base_config("daipnet300", "coco")
    c.data.source = "my_source"
    with pytest.raises(ConfigError, match=r"^data\.source: 'my_source' is not one of"):
        validate_config(c, device_count=1)
    monkeypatch.setitem(sources.SOURCES, "my_source", sources.CocoFolderSource())
    validate_config(c, device_count=1)
