"""The quick-start recipe: `train.optimizer="adam"` and the `demo` config's schedule."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from training_support import optax_and_torch_steps

from daipnet_jax import config as config_lib
from daipnet_jax.config import base_config
from daipnet_jax.training import schedule as schedule_lib

REPO = Path(__file__).resolve().parents[1]


def _generated_config(arg: str):
    spec = importlib.util.spec_from_file_location("gen_cfg_demo", REPO / "configs" / "generated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_adam_option_is_pytorch_adam_with_l2():
    """`train.optimizer="adam"` == torch.optim.Adam(weight_decay=5e-4) over steps of varying lr."""
    torch = pytest.importorskip("torch")
    c = base_config("daipnet300", "generated")
    c.train.optimizer = "adam"
    c.train.weight_decay = 5e-4
    lrs = [1e-3, 5e-4, 2e-3, 1e-4]
    tx = schedule_lib.make_optimizer(c, lambda step: jax.numpy.asarray(lrs)[step])
    ours, theirs = optax_and_torch_steps(
        tx, lambda ps, lr: torch.optim.Adam(ps, lr=lr, weight_decay=5e-4), lrs
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_refused_and_recipe_default_is_sgd():
    c = base_config("daipnet300", "coco")
    assert c.train.optimizer == "sgd"
    c.train.optimizer = "rmsprop"
    with pytest.raises(ValueError, match="rmsprop"):
        schedule_lib.make_optimizer(c, lambda step: 1e-3)


def test_demo_schedule_fits_its_epochs():
    """demo: 2000 images / batch 8 = 250 steps per epoch → warm-up 62 steps, ×0.1 at step 700,
    800 steps in all, no wall-clock cap; the Table 2 variants keep the paper's recipe (SGD,
    6-epoch warm-up)."""
    c = _generated_config("demo")
    spe = config_lib.steps_per_epoch(c, 2000)
    assert spe == 250
    assert config_lib.schedule_points(c, spe) == (62, [700])
    assert config_lib.total_steps(c, spe) == 800
    assert c.train.max_train_seconds == 0
    sched = schedule_lib.learning_rate_schedule(c, spe)
    np.testing.assert_allclose(float(sched(62)), 2e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(700)), 2e-4, rtol=1e-5)
    assert c.model.width == 0.125 and c.train.optimizer == "adam"
    real = _generated_config("daipnet300")
    assert real.model.width == 0.25 and real.train.optimizer == "sgd"
    assert real.train.warmup_epochs == 6 and real.data.augment


def test_readme_describes_the_demo_that_runs():
    """The README's quick-start steps and the demo's failure message agree with the `demo`
    config and with the AP50 column of the README's measured runs."""
    from daipnet_jax import demo

    text = (REPO / "README.md").read_text()
    c = _generated_config("demo")
    total = config_lib.total_steps(c, config_lib.steps_per_epoch(c, c.data.generated_num_train))
    fixed = {int(n) for n in re.findall(r"for a fixed (\d+) steps", text)}
    assert fixed == {total}, f"README says {fixed} steps, the demo config runs {total}"
    low, high = (
        float(v) for v in re.search(r"the runs below score ([\d.]+)–([\d.]+)", text).groups()
    )
    table = [float(v) for v in re.findall(r"^\| \d+ \| [\d.]+ \| \*\*([\d.]+)\*\* \|", text, re.M)]
    assert len(table) >= 2, "README's quick-start table not found"
    assert (low, high) == demo.MEASURED_AP50 == (round(min(table), 2), round(max(table), 2))
    assert low > demo.AP50_BAR
