"""The few named errors ttsd raises. Each carries enough to tell a user what and where."""

from __future__ import annotations

import os
from pathlib import Path


class TtsdError(Exception):
    """Base class of every error ttsd reports to a user."""


class ConfigError(TtsdError):
    """A configuration file or option is wrong; the message names the key."""


class InputError(TtsdError):
    """An input file (or one line of it) cannot be used.

    ``line`` and ``column`` are 1-based where known; ``str()`` gives the full sentence.
    """

    def __init__(self, message: str, *, file: str | None = None,
                 line: int | None = None, column: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class VoiceError(TtsdError):
    """A voice cannot be found or its files do not fit the expected Piper layout."""


class SynthesisError(TtsdError):
    """Synthesis of a line failed (NaN audio, runaway length, device error)."""


class DeviceLostError(SynthesisError):
    """A sticky device error: the process must not retry and should exit for a restart."""


class StoreDamagedError(TtsdError):
    """SQLite reports the journal (``state/ttsd.db``) damaged or not a database at all.

    ttsd stops instead of writing to it (a write could spread the damage); ``ttsd
    repair-store`` keeps the damaged copy and rebuilds the journal from what can still
    be read. ``path`` is the journal's path, ``reason`` SQLite's own words. Exit status
    4: a restart would only meet the damage again, so systemd must not restart
    (``RestartPreventExitStatus``).
    """

    exit_status = 4

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"the journal {self.path} is damaged ({reason}). ttsd will not write to it. "
            f"Run `ttsd repair-store` to keep the damaged copy as "
            f"{self.path.name}.damaged-<time> and rebuild a journal from what can still be "
            "read; see README 'When the journal is damaged'.")

    def __reduce__(self) -> tuple[type[StoreDamagedError], tuple[str, str]]:
        """Pickled with its fields (a worker process reports errors to the daemon)."""
        return type(self), (str(self.path), self.reason)
