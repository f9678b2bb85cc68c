"""The few named errors ttsd raises. Each carries enough to tell a user what and where."""

from __future__ import annotations


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
