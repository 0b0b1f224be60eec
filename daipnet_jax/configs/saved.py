"""A config saved by a training run: `--config configs/saved.py:WORKDIR/config.json`.

Training writes its resolved config to `WORKDIR/config.json`; the command lines use it through
this file when `--config` is not given, so `--config.KEY=VALUE` overrides work as with a recipe.
"""

from __future__ import annotations

import json

import ml_collections


def get_config(path: str | None = None) -> ml_collections.ConfigDict:
    if not path:
        raise ValueError("configs/saved.py needs the path of a saved config.json after ':'")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
