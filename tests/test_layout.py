"""Repository layout: imports run one way; the README documents exactly the config's keys and
every command-line flag.

Layers, lowest first (a module may import its own layer and the ones below):
config (+ configs) → models → boxes, losses, postprocess → data, sharding, checkpoints,
validate → training, evaluation → tools (convert, predict, export, demo, browse, the model
summary, train.py, evaluate.py). Training and evaluation never import each other.
"""

from __future__ import annotations

import ast
import fnmatch
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "daipnet_jax"

# Longest matching prefix wins.
LAYERS = {
    "daipnet_jax": 0,
    "daipnet_jax.config": 0,
    "daipnet_jax.configs": 0,
    "daipnet_jax.platform": 0,
    "daipnet_jax.models": 1,
    "daipnet_jax.boxes": 2,
    "daipnet_jax.losses": 2,
    "daipnet_jax.postprocess": 2,
    "daipnet_jax.data": 3,
    "daipnet_jax.sharding": 3,
    "daipnet_jax.distributed": 3,
    "daipnet_jax.checkpoints": 3,
    "daipnet_jax.validate": 3,
    "daipnet_jax.training": 4,
    "daipnet_jax.evaluation": 4,
    "daipnet_jax.models.__main__": 5,
    "daipnet_jax.convert": 5,
    "daipnet_jax.predict": 5,
    "daipnet_jax.export": 5,
    "daipnet_jax.demo": 5,
    "daipnet_jax.browse": 5,
    "daipnet_jax.cli": 5,
    "train": 5,
    "evaluate": 5,
}
APART = ("daipnet_jax.training", "daipnet_jax.evaluation")  # never import each other


def layer(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every package import, module-level and inside functions."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append((node.lineno, f"relative import (level {node.level}) {node.module or ''}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:  # `from daipnet_jax import data, models`
                out += [(node.lineno, f"{PACKAGE}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return [
        (line, m)
        for line, m in out
        if m == PACKAGE or m.startswith(PACKAGE + ".") or m.startswith("relative import")
    ]


def violations(sources: dict[str, str]) -> list[str]:
    """Every import of a higher layer (or across training/evaluation) in `sources`."""
    bad = []
    for module, source in sources.items():
        own = layer(module)
        if own is None:
            bad.append(f"{module}: no layer (add it to LAYERS in tests/test_layout.py)")
            continue
        for line, target in imported_modules(source):
            other = layer(target)
            if other is None:
                bad.append(f"{module}:{line} imports {target}, which has no layer")
            elif other > own:
                bad.append(f"{module}:{line} (layer {own}) imports {target} (layer {other})")
            for a, b in (APART, APART[::-1]):
                if (module == a or module.startswith(a + ".")) and (
                    target == b or target.startswith(b + ".")
                ):
                    bad.append(f"{module}:{line} imports {target}")
    return bad


def repo_sources() -> dict[str, str]:
    out = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path.read_text()
    for script in ("train.py", "evaluate.py"):
        out[script.removesuffix(".py")] = (REPO / script).read_text()
    return out


def test_imports_run_one_way():
    sources = repo_sources()
    assert len(sources) > 30 and "daipnet_jax.training.loop" in sources
    assert violations(sources) == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("daipnet_jax.models.heads", "def f():\n    from daipnet_jax import training\n"),
        ("daipnet_jax.boxes", "import daipnet_jax.data.pipeline\n"),
        ("daipnet_jax.training.loop", "from daipnet_jax.evaluation import loop\n"),
        ("daipnet_jax.evaluation.loop", "from daipnet_jax.training.state import TrainState\n"),
        ("daipnet_jax.config", "from daipnet_jax.models import build\n"),
        ("daipnet_jax.models.heads", "from ..training import loop\n"),  # unlayered: refused
    ],
)
def test_inverted_import_is_caught(module, source):
    """The checker is not vacuous: an import against the direction is reported."""
    assert violations({module: source}), source


# ------------------------------------------------------------------ README config reference
def _documented_keys() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    keys = []
    for row in section.splitlines():
        if row.startswith("| `"):
            keys += re.findall(r"`([^`]+)`", row.split("|")[1])
    return keys


def _config_keys() -> set[str]:
    from daipnet_jax.configs import recipe

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    keys: set[str] = set()
    for dataset in ("coco", "voc", "generated"):
        for variant in ("daipnet300", "ssd512"):
            keys |= set(flat(recipe(variant, dataset).to_dict()))
    return keys


def test_readme_documents_exactly_the_config_keys():
    documented, keys = _documented_keys(), _config_keys()
    assert len(documented) > 40
    for pattern in documented:
        assert fnmatch.filter(keys, pattern), (
            f"README documents {pattern}, the config has no such key"
        )
    undocumented = sorted(k for k in keys if not any(fnmatch.fnmatch(k, p) for p in documented))
    assert undocumented == [], f"config keys missing from the README: {undocumented}"


# ---------------------------------------------------------------------- README command-line flags
def _defined_flags() -> dict[str, str]:
    """{flag: file} of every absl `DEFINE_*` and argparse `add_argument` of the package and the
    two top-level CLIs (argparse flags whose help is `argparse.SUPPRESS` are hidden on purpose)."""
    found = {}
    files = [*sorted((REPO / PACKAGE).rglob("*.py")), REPO / "train.py", REPO / "evaluate.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if not isinstance(first, ast.Constant) or not isinstance(first.value, str):
                continue
            hidden = any(
                k.arg == "help"
                and isinstance(k.value, ast.Attribute)
                and k.value.attr == "SUPPRESS"
                for k in node.keywords
            )
            if name.startswith("DEFINE_"):
                found[first.value] = path.name
            elif name == "add_argument" and first.value.startswith("--") and not hidden:
                found[first.value[2:]] = path.name
    return found


def test_readme_documents_every_command_line_flag():
    text = (REPO / "README.md").read_text()
    defined = _defined_flags()
    assert {"workdir", "checkpoint", "max_boxes", "coordinator_address", "num_train"} <= set(
        defined
    )
    missing = sorted(
        f"--{f} ({where})"
        for f, where in defined.items()
        if f"--{f}" not in text and f"--no{f}" not in text  # absl's negated boolean
    )
    assert missing == [], f"flags missing from the README: {missing}"


def test_every_entry_point_calls_platform_setup():
    """XLA flags and quiet logs are set by `platform.setup()`, before JAX starts a backend or
    TensorFlow loads (docs/design.md, runtime switches), so every command must call it; the
    generated-dataset writer starts neither (NumPy and PIL only)."""
    exempt = {"daipnet_jax/data/generated.py"}
    files = [*sorted((REPO / PACKAGE).rglob("*.py")), REPO / "train.py", REPO / "evaluate.py"]
    entry_points = [
        str(p.relative_to(REPO)) for p in files if 'if __name__ == "__main__":' in p.read_text()
    ]
    assert len(entry_points) >= 9
    missing = [
        p
        for p in entry_points
        if p not in exempt and "platform.setup(" not in (REPO / p).read_text()
    ]
    assert missing == []
