"""What the daemon and a worker process say over their pipe.

Daemon → worker: ``Run``, ``Release``, ``Stop``. Worker → daemon: ``Ready``, ``Answer``,
``Released``, ``Failure``. Module-level dataclasses, so they pickle across ``spawn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Run:
    requests: list


@dataclass(frozen=True)
class Release:
    pass


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    reply: dict[str, Any]
    """``WorkerCore.run_prepared``'s: results, stats, memory."""


@dataclass(frozen=True)
class Released:
    freed: int
    memory: dict


@dataclass(frozen=True)
class Failure:
    text: str
    """What went wrong, then the traceback."""


@dataclass(frozen=True)
class PreparedRun:
    """A Run whose requests the reader thread has phonemized, and on a GPU planned: its
    text half queued on the engine's text stream (``Engine.plan``) while the main thread
    runs the audio half of the batch before, as the daemon's own engine does."""

    prepared: list
    prepare_ms: float
    plan: Any = None


@dataclass(frozen=True)
class ReaderFailed:
    error: BaseException
