"""Output names and report cells: an id or line number → a safe file stem; CSV-safe cells.

Pure functions. A stem is built from an ASCII allow-list, so it can never hold a path
separator, NUL, a leading dot or dash, or a Windows device name, and it fits a 255-byte
file name with ``.wav`` appended. Whenever an id had to be changed, a hash of the
(NFC) id is appended so that two ids differing only in disallowed characters never
share a stem. Ids equal after NFC share a stem on purpose, and :func:`name_key` folds
case, so the caller detects "café" (NFC/NFD) and "A"/"a" as duplicates instead of
letting one output overwrite the other.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

MAX_STEM_BYTES = 200
"""Longest stem in UTF-8 bytes (stems are ASCII), leaving room for ``.wav`` and more."""
HASH_CHARS = 8
"""Hex digits of sha256(id) appended to a changed or truncated id."""
EMPTY_HASH_CHARS = 12
"""Hex digits of sha256(id) in ``id-…``, the stem of an id with nothing usable."""
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
"""Leading characters that make a spreadsheet evaluate a cell (OWASP CSV injection)."""

_DISALLOWED = re.compile(r"[^A-Za-z0-9._-]")
_REPEATS = re.compile(r"([._-])\1+")
_ALNUM = re.compile(r"[A-Za-z0-9]")
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL",
                       *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))})


def safe_stem(raw_id: str | None, number: int, width: int) -> str:
    """The output file stem of a line: its id made safe, or its zero-padded number.

    ``width`` is ``max(4, len(str(total_lines)))``. The result is never empty, ``.``
    or ``..``, holds only ``[A-Za-z0-9._-]`` and is at most ``MAX_STEM_BYTES`` bytes.
    """
    if raw_id is None:
        if number < 0:
            raise ValueError(f"line number must be >= 0, got {number}")
        return f"{number:0{width}d}"
    nfc = unicodedata.normalize("NFC", raw_id)
    digest = hashlib.sha256(nfc.encode("utf-8", "surrogatepass")).hexdigest()
    body = _sanitize(nfc)
    if _ALNUM.search(body) is None:
        return "id-" + digest[:EMPTY_HASH_CHARS]
    if body == nfc and len(body) <= MAX_STEM_BYTES:
        return body
    return body[:MAX_STEM_BYTES - HASH_CHARS - 1] + "-" + digest[:HASH_CHARS]


def _sanitize(nfc: str) -> str:
    """Allow-list, collapse repeated separators, trim edges, defuse device names."""
    stem = _REPEATS.sub(r"\1", _DISALLOWED.sub("_", nfc))
    stem = stem.lstrip(".-").rstrip(". ")
    if stem.split(".", 1)[0].upper() in _RESERVED:
        stem = "_" + stem
    return stem


def name_key(stem: str) -> str:
    """Key for duplicate detection: NFC + casefold, so "A" and "a" collide."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", stem).casefold())


def inside(base: Path, candidate: Path) -> bool:
    """Whether ``candidate`` resolves to a path strictly below ``base`` (resolved).

    Symlinks are followed by the resolution; a symlink loop counts as outside.
    """
    try:
        root = base.resolve()
        target = candidate.resolve()
    except (OSError, RuntimeError):
        return False
    return target != root and target.is_relative_to(root)


def csv_cell(value: object) -> str:
    """A manifest or error-report cell that no spreadsheet evaluates as a formula.

    None → ""; int and float values as written; any other value is ``str()``-ed and
    gets a leading ``'`` when it starts with = + - @ TAB or CR.
    """
    if value is None:
        return ""
    text = str(value)
    if isinstance(value, (int, float)):
        return text
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def fit_name(name: str, limit: int) -> str:
    """``name`` shortened to at most ``limit`` bytes, keeping a short suffix."""
    if len(os.fsencode(name)) <= limit:
        return name
    stem, dot, suffix = name.rpartition(".")
    tail = dot + suffix if dot and stem and len(suffix) <= 8 else ""
    head = stem if tail else name
    while head and len(os.fsencode(head + tail)) > limit:
        head = head[:-1]
    return head + tail


def eligible_name(name: str, suffixes: tuple[str, ...]) -> bool:
    """True for names ttsd may pick up; temp, hidden and editor names wait to be renamed."""
    lower = name.lower()
    if name.startswith(".") or lower.endswith((".tmp", ".part", "~", ".swp")):
        return False
    return lower.endswith(tuple(s.lower() for s in suffixes))


def display_name(name: str) -> str:
    """A file name as ttsd records and reports it: the name itself when it is valid
    UTF-8, else its bytes decoded with each byte that is not written ``\\xNN`` (a
    Latin-1 ``café.txt`` becomes ``caf\\xe9.txt``), so that it can be stored, logged and
    used for the outbox and done/ names."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
