"""Sizes in bytes and durations in seconds, as people read and write them.

Printed in binary multiples named as such (KiB, MiB, GiB: powers of 1024). Read with
either kind of unit: kB, MB, GB, TB are powers of 1000 and KiB, MiB, GiB, TiB powers
of 1024, so ``2GB`` is 2,000,000,000 bytes and ``2GiB`` 2,147,483,648.
"""

from __future__ import annotations

import math
import re

SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
"""Units ``parse_size`` reads (case-insensitive): decimal, and binary with an ``i``."""
SIZE_HELP = ("a number with an optional unit: B, kB, MB, GB, TB (powers of 1000) or KiB, "
             "MiB, GiB, TiB (powers of 1024), e.g. 2GB or 2GiB")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)


def human_bytes(n: float | None) -> str:
    """``1536`` → ``1.5 KiB``; ``5368709120`` → ``5.0 GiB`` (binary multiples); ``12`` →
    ``12 B``; None → ``-``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(n)} B" if unit == "B" else f"{value:.1f} {unit}"


def parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``100k`` (decimal), ``1.5GiB``, ``64MiB`` (binary), ``4096`` →
    bytes (rounded down). ValueError, naming the units, for anything else."""
    m = _SIZE.fullmatch(text.strip())
    unit = m.group(2).lower() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(f"size {text!r}: expected {SIZE_HELP}")
    return math.floor(float(m.group(1)) * SIZE_UNITS[unit])


def human_duration(s: float | None) -> str:
    """``45`` → ``45s``; ``3725`` → ``1h 2m``; ``200000`` → ``2d 7h``; None → ``-``."""
    if s is None:
        return "-"
    s = max(0.0, float(s))
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    minutes, sec = divmod(int(s), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {sec}s"
