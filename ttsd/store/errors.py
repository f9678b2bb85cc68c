"""What an SQLite error means to ttsd: damage (for a person), a fault of the machine
(waited out), or anything else (a bug).

The rest of ttsd catches the store's errors through these names, so that only the
store imports ``sqlite3``.
"""

from __future__ import annotations

import sqlite3

from ttsd.errors import ConfigError

DatabaseError = sqlite3.DatabaseError
"""SQLite's base error: every failure the journal raises is one."""
OperationalError = sqlite3.OperationalError
"""SQLite's error for a busy lock, a full or failing disk, a read-only or vanished
file (see ``machine_fault``), and for a table a store from before a migration lacks."""

_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_DAMAGE_WORDS = ("database disk image is malformed", "malformed database schema",
                 "not a database")
_FAULT_WORDS = ("database or disk is full", "disk i/o error", "readonly database",
                "unable to open database file", "database is locked")


class JournalTooNewError(ConfigError):
    """The journal holds migrations this version does not know: a newer ttsd wrote it.
    Writing to it could break what that version relies on, so it is refused."""


def damaged(exc: BaseException) -> bool:
    """SQLite says the database file itself is damaged (SQLITE_CORRUPT and its extended
    codes) or is not a database (SQLITE_NOTADB), as opposed to a busy lock, a full disk
    or a constraint. Python raises these as ``sqlite3.DatabaseError``; its subclasses
    (IntegrityError, OperationalError, ...) are damage only with those codes or words
    ("malformed JSON" from ``json_each`` is not). For code that meets an error mid-run:
    such an error is for a person (``StoreDamagedError``), never a retry."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _DAMAGE_CODES:
        return True
    text = str(exc).lower()
    return any(w in text for w in _DAMAGE_WORDS)


def machine_fault(exc: BaseException) -> str | None:
    """SQLite's words when the machine refused a read or write of the journal (a full,
    failing, read-only or vanished disk, or a lock held past the busy timeout): a state
    to wait out, not a bug. None for any other error."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if any(words in text.lower() for words in _FAULT_WORDS):
            return text
    return None
