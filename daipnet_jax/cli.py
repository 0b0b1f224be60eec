"""What the command lines share: the workdir's saved config as the default `--config`, and
one-line errors.

- `config_argv(argv, dir_flags)`: without `--config`, the config saved in the workdir (or
  checkpoint) named by the first of `dir_flags` that is given (`WORKDIR/config.json`, read
  through `configs/saved.py`) becomes `--config`; `--config.KEY=VALUE` overrides still apply.
- `parse_flags`: absl's flag parser, with bad flags and unknown `--config.` keys as one line.
- `run(main, dir_flags)`: `app.run` with both, and every user-facing error (`ConfigError`,
  `CheckpointError`, `InputError`, absl's `UsageError`, a file that cannot be read or written)
  printed as one line `error: ...` on stderr with exit code 2, as is a `--config` file that is
  missing or whose `get_config` raises. `DAIPNET_TRACEBACK=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TRACEBACK_ENV = "DAIPNET_TRACEBACK"
HELP_FLAGS = {"--help", "-?", "--helpshort", "--helpfull", "--helpxml"}
SAVED_CONFIG = Path(__file__).resolve().parent / "configs" / "saved.py"


class InputError(ValueError):
    """A command-line input (file, folder, flag value) that cannot be used."""


def _show_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0", "false", "False")


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` (one line) on stderr and exit with `code`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name=V` / `--name V` in `argv` (the last one), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def config_argv(argv: Sequence[str], dir_flags: Sequence[str]) -> list[str]:
    """`argv` with a `--config` from the saved config when none is given. The caller checks a
    given `--config` against the saved one."""
    argv = list(argv)
    if flag_value(argv, "config") is not None or HELP_FLAGS & set(argv):
        return argv
    from daipnet_jax import checkpoints

    for name in dir_flags:
        d = flag_value(argv, name)
        if d:
            file = checkpoints.saved_config_path(d)
            if file.is_file():
                return [argv[0], f"--config={SAVED_CONFIG}:{file}", *argv[1:]]
    given = []
    for n in dir_flags:
        d = flag_value(argv, n)
        if d:
            state = "has no " + checkpoints.CONFIG_FILE if Path(d).exists() else "does not exist"
            given.append(f"--{n} {d} {state}")
    where = f" ({', '.join(given)})" if given else ""
    fail(f"--config is required{where}; e.g. --config configs/generated.py:daipnet300")
    raise AssertionError  # unreachable


def _config_key_error(argv: Sequence[str], error: BaseException) -> str | None:
    """A one-line message for an unknown `--config.KEY` (ml_collections' "Did you mean")."""
    text = str(error)
    keys = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    quoted = re.findall(r"'([^'\\]+)'", text.replace("\\'", "'"))
    for key in keys:
        name = key.split(".")[-1]
        if name in quoted or f'"{name}"' in text:
            hint = re.search(r'Did you mean "([^"]+)"', text)
            more = f"; did you mean --{key.rsplit('.', 1)[0]}.{hint.group(1)}?" if hint else ""
            return f"--{key}: no such config key{more}"
    return None


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of `error`'s cause / context chain (as a traceback shows it)."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def _first_line(error: BaseException) -> str:
    from daipnet_jax.config import first_line

    return first_line(error)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with each failure reported as one line (exit 2)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except SystemExit:  # absl prints the asked-for help, then exits 1: help is not an error
        if HELP_FLAGS & set(argv):
            raise SystemExit(0) from None
        raise
    except Exception as e:
        if _show_traceback():
            raise
        message = _config_key_error(argv, e)
        if message is None:
            # a config file's get_config() that raised: absl's first line names the flag, the
            # innermost exception says why (e.g. an unknown variant)
            message, why = _first_line(e), _first_line(_root_cause(e))
            if why not in message:
                message = f"{message.rstrip(':')}: {why}"
        fail(message)
        raise AssertionError from e  # unreachable


def _config_file_error(error: OSError) -> str | None:
    """One line for ml_collections' deferred failure to load a `--config` file (a bare OSError
    raised when the config is first read): the file and the reason."""
    text = str(error)
    if "config file" not in text:
        return None
    reason = re.search(r"\[Errno \d+\] (.+)", text)
    return f"--config: {reason.group(1) if reason else _first_line(error)}"


def user_errors() -> tuple[type[BaseException], ...]:
    from daipnet_jax.checkpoints import CheckpointError
    from daipnet_jax.config import ConfigError

    return (ConfigError, CheckpointError, InputError, FileNotFoundError, PermissionError)


def call(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
    """`main(argv)` with user-facing errors as one line (see the module docstring)."""
    from absl import app

    try:
        return main(argv)
    except app.UsageError as e:  # absl would print the whole usage text, then exit 1
        if _show_traceback():
            raise
        fail(f"{e} (--helpshort lists the flags)")
    except user_errors() as e:
        if _show_traceback():
            raise
        if isinstance(e, OSError) and e.filename:
            fail(f"{e.filename}: {e.strerror or e}")
        fail(str(e))
    except OSError as e:
        if _show_traceback():
            raise
        if e.filename:  # an output that cannot be written (disk full, file too large, ...)
            fail(f"{e.filename}: {e.strerror or e}")
        message = _config_file_error(e)
        if message is None:
            raise
        fail(message)


def run(
    main: Callable[[list[str]], Any],
    dir_flags: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> None:
    """`absl.app.run(main)` with the saved config as the default `--config` (from the first
    given flag of `dir_flags`) and one-line errors."""
    from absl import app

    args = list(sys.argv if argv is None else argv)
    if dir_flags:
        args = config_argv(args, dir_flags)
    app.run(lambda a: call(main, a), argv=args, flags_parser=parse_flags)
