"""Config mechanics: strict `file.py:arg` parsing, the per-dataset recipes, prior geometry."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from daipnet_jax import config as config_lib
from daipnet_jax.configs import recipe

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config_file(name: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_arg_types_and_name():
    args = config_lib.parse_arg("lrf512,width=0.25", name="daipnet300", width=1.0)
    assert args.name == "lrf512" and args.width == 0.25
    assert config_lib.parse_arg(None, name="x", width=1.0).to_dict() == {"name": "x", "width": 1.0}


@pytest.mark.parametrize("arg", ["daipnet300,widht=0.5", "daipnet300,bf16"])
def test_parse_arg_refuses_unknown_keys_in_one_line(arg):
    with pytest.raises(ValueError) as err:
        config_lib.parse_arg(arg, name="daipnet300", width=1.0)
    message = str(err.value)
    assert "\n" not in message
    assert repr(arg.split(",")[1].split("=")[0]) in message and "name, width" in message


@pytest.mark.parametrize("name", ["coco", "voc", "generated"])
def test_every_config_file_refuses_a_misspelt_key(name):
    with pytest.raises(ValueError, match="widht"):
        _config_file(name).get_config("daipnet300,widht=0.5")
    with pytest.raises(ValueError, match="width='x'"):
        _config_file(name).get_config("daipnet300,width=x")


@pytest.mark.parametrize(
    ("dataset", "classes", "lr", "decay", "total", "min_size"),
    [
        ("coco", 81, 4e-3, (90.0, 120.0, 140.0), 160.0, 21),
        ("voc", 21, 4e-3, (150.0, 200.0), 250.0, 30),
        ("generated", 4, 4e-3, (90.0, 120.0, 140.0), 160.0, 21),
    ],
)
def test_recipes_set_their_dataset_values(dataset, classes, lr, decay, total, min_size):
    """Paper Section 4.2 per dataset; `base_config` is the dataset file's recipe."""
    c = _config_file(dataset).get_config("lrf300,width=0.5")
    assert c.to_dict() == config_lib.base_config("lrf300", dataset, width=0.5).to_dict()
    assert c.to_dict() == recipe("lrf300", dataset, width=0.5).to_dict()
    assert c.model.num_classes == classes and c.train.base_lr == lr
    assert tuple(c.train.decay_epochs) == decay and c.train.total_epochs == total
    assert c.priors.min_sizes[0] == min_size


def test_prior_geometry_and_count():
    """k per source and P = Σ f²·k, against the published SSD300 / LRF300 / LRF512 counts."""
    c = recipe("ssd300", "coco")
    assert config_lib.anchors_per_location(c.priors.aspect_ratios) == [4, 6, 6, 6, 4, 4]
    assert config_lib.num_priors(c.priors) == 8732
    assert config_lib.num_priors(recipe("lrf300", "voc").priors) == 11620
    assert config_lib.num_priors(recipe("daipnet512", "coco").priors) == 32756
    with pytest.raises(ValueError, match="300 and 512"):
        config_lib.prior_table(320, "lrf", [1] * 6, [2] * 6)


def test_epoch_arithmetic_in_one_place():
    c = recipe("daipnet300", "coco")
    c.train.batch_size = 32
    calls = []
    assert config_lib.steps_per_epoch(c, lambda: calls.append(1) or 3200) == 100
    c.train.train_examples = 640  # the config's epoch size: the source is not asked
    assert config_lib.steps_per_epoch(c, lambda: calls.append(1) or 3200) == 20
    assert calls == [1]
    assert config_lib.total_steps(c, 20) == 160 * 20
    assert config_lib.schedule_points(c, 20) == (120, [1800, 2400, 2800])
    c.train.batch_size = 1000
    with pytest.raises(config_lib.ConfigError, match=r"^train\.batch_size"):
        config_lib.steps_per_epoch(c, 3200)


def test_saved_config_holds_absolute_paths(tmp_path, monkeypatch):
    """config.json's file and folder paths are absolute (resolved against the folder the run
    started in), so resume and evaluate work from elsewhere; empty paths stay empty; every
    `PATH_KEYS` entry is a config key; the running config is not changed."""
    import json
    import os

    from daipnet_jax import checkpoints
    from daipnet_jax import config as config_lib

    c = config_lib.base_config("daipnet300", "coco")
    flat = config_lib.flat_items(c)
    assert all(key in flat for key in config_lib.PATH_KEYS)
    monkeypatch.chdir(tmp_path)
    c.data.data_dir = "data/gen"
    c.data.eval_annotation_file = "ann/val.json"
    c.init.vgg = "~/weights/vgg"
    c.data.image_dir = str(tmp_path / "abs")
    (tmp_path / "w").mkdir()
    saved = json.loads(checkpoints.write_config("w", c).read_text())
    assert saved["data"]["data_dir"] == str(tmp_path / "data" / "gen")
    assert saved["data"]["eval_annotation_file"] == str(tmp_path / "ann" / "val.json")
    assert saved["init"]["vgg"] == os.path.join(os.path.expanduser("~"), "weights", "vgg")
    assert saved["data"]["image_dir"] == str(tmp_path / "abs")
    assert saved["data"]["annotation_file"] == "" and saved["init"]["checkpoint"] == ""
    assert c.data.data_dir == "data/gen"  # the run's own config is as given
    # the saved config reads back with the same keys and the other values unchanged
    others = {k: v for k, v in flat.items() if k not in config_lib.PATH_KEYS}
    back = config_lib.flat_items(checkpoints.read_config("w"))
    assert {k: back[k] for k in others} == others


def test_first_line_is_how_errors_become_one_line():
    from daipnet_jax.config import first_line

    assert first_line(ValueError("  bad value\n  detail\n")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("x" * 300), limit=200) == "x" * 197 + "..."
    assert first_line(OSError("x" * 200), limit=200) == "x" * 200


def test_config_json_that_cannot_be_written_names_the_file(tmp_path):
    """A full disk while `config.json` is written (files capped at 1 kB in a child process; the
    config is larger): an OSError naming the file (one line through the CLIs), no temporary
    file left, and an earlier config.json as it was."""
    import subprocess
    import sys

    from daipnet_jax import checkpoints
    from daipnet_jax import config as config_lib

    first = checkpoints.write_config(tmp_path, config_lib.base_config("daipnet300", "coco"))
    before = first.read_text()
    code = (
        "import errno, resource, sys\n"
        "from daipnet_jax import checkpoints, config\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "c = config.base_config('daipnet300', 'coco')\n"
        "c.train.total_steps = 5\n"
        "try:\n"
        "    checkpoints.write_config(sys.argv[1], c)\n"
        "except OSError as e:\n"
        "    print(e.filename, errno.errorcode[e.errno], e.strerror, sep='|')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split("|") == [
        str(first),
        "EFBIG",
        "File too large (writing the run's config)",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert first.read_text() == before
