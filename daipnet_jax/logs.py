"""Logging set-up shared by the command lines."""

from __future__ import annotations

import logging

NOISY_LIBRARIES = ("orbax", "etils", "tensorflow_datasets")


class _DropLibraryInfo(logging.Filter):
    """Drops INFO (and lower) records emitted from the files of `libraries`."""

    def __init__(self, libraries: tuple[str, ...]) -> None:
        super().__init__()
        self._markers = tuple(f"/{name}/" for name in libraries)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(m in record.pathname for m in self._markers)


def quiet_library_logs(libraries: tuple[str, ...] = NOISY_LIBRARIES) -> None:
    """Keep our INFO lines (data reports, metrics) but not the libraries' chatter.

    orbax logs a dozen INFO lines per checkpoint (every rename and metadata write); its
    warnings and errors still come through.
    """
    for name in ("absl", ""):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
            logger.addFilter(_DropLibraryInfo(libraries))
