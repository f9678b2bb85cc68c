"""Named crash points for recovery tests: off unless TTSD_CRASH_AT is set.

``TTSD_CRASH_AT=NAME`` (or ``NAME:N`` for the N-th time the point is reached) makes the
process exit at once with status 137, as ``kill -9`` would, at one of:
``after_claim``, ``after_hit_links``, ``mid_batch``, ``after_tmp``, ``after_rename``,
``before_commit``, ``after_commit``. Unset, ``point()`` is a dictionary lookup and
nothing else.
"""

from __future__ import annotations

import os
import threading

POINTS = ("after_claim", "after_hit_links", "mid_batch", "after_tmp", "after_rename",
          "before_commit", "after_commit")

_spec = os.environ.get("TTSD_CRASH_AT", "")
_name, _, _nth = _spec.partition(":")
_target = int(_nth) if _nth.isdigit() else 1
_count = 0
_lock = threading.Lock()


def point(name: str) -> None:
    """Die here if TTSD_CRASH_AT names this point (and this is the N-th visit)."""
    global _count
    if not _name or name != _name:
        return
    with _lock:
        _count += 1
        if _count >= _target:
            os._exit(137)
