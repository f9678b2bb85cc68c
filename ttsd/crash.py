"""Named crash points: the places a recovery test can make the process die at once.

The product only names them (``point(NAME)``): ``after_claim``, ``after_hit_links``,
``mid_batch``, ``after_tmp``, ``after_rename``, ``before_commit``, ``after_commit``.
Nothing happens at a point unless a test armed it (``arm``): the tests' engine factory
(``tests/faults.py``, loaded by the daemon through ``$TTSD_ENGINE_FACTORY``) arms the
point its ``$TTSD_CRASH_AT`` names. Armed, the N-th visit exits with status 137, as
``kill -9`` would. Unarmed, ``point()`` is one comparison.
"""

from __future__ import annotations

import os
import threading

POINTS = ("after_claim", "after_hit_links", "mid_batch", "after_tmp", "after_rename",
          "before_commit", "after_commit")

_armed: str | None = None
_target = 1
_count = 0
_lock = threading.Lock()


def arm(name: str, nth: int = 1) -> None:
    """Die at the ``nth`` visit of the point ``name`` (one of ``POINTS``)."""
    global _armed, _target, _count
    if name not in POINTS:
        raise ValueError(f"no crash point {name!r} (points: {', '.join(POINTS)})")
    _armed, _target, _count = name, max(1, nth), 0


def point(name: str) -> None:
    """Die here if a test armed this point and this is its N-th visit."""
    global _count
    if name != _armed:
        return
    with _lock:
        _count += 1
        if _count >= _target:
            os._exit(137)
