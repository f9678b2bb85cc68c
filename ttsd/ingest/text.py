"""What the txt and csv readers share: limits, the parsed input record, and the
rules that clean a text or a field (controls, whitespace, NFC, previews)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ttsd.records import Line, LineError

if TYPE_CHECKING:
    from ttsd.config import InputConfig

COLUMNS = ("id", "text", "voice", "speaker", "speed", "chapter", "volume", "markup",
           "pause_after")
"""The CSV columns ttsd knows; ``text`` is required."""


DELIMITERS = (",", ";", "\t", "|")
"""CSV delimiters sniffed from the header line, in order of preference on a tie."""


MAX_SPEAKER_CHARS = 100


PREVIEW_CHARS = 80


CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
"""Control characters not allowed in text (tab, LF, VT, FF and CR are whitespace)."""


ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""Control characters not allowed in ids and speakers (whitespace controls too)."""


CONTENT = re.compile(r"[^\s]|[\x00-\x08\x0e-\x1f\x7f-\x9f]")
"""Anything that makes a line more than blank: a visible character or a bad control."""


VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


@dataclass(frozen=True)
class ParseLimits:
    """The bounds a parse enforces (from ``InputConfig`` plus the speed range)."""

    max_file_bytes: int = 256 * 1024 * 1024
    """Larger inputs are rejected as a whole."""
    max_lines: int = 1_000_000
    """Inputs with more physical lines are rejected as a whole."""
    max_line_chars: int = 5000
    """A longer text (after normalization) fails alone."""
    min_speed: float = 0.1
    """Smallest per-line CSV speed accepted."""
    max_speed: float = 10.0
    """Largest per-line CSV speed accepted."""
    max_volume: float = 16.0
    """Largest per-line CSV volume accepted (as ``output.volume``)."""

    @property
    def max_record_chars(self) -> int:
        """Raw characters one line or CSV record may span: twice the text limit + 1024."""
        return 2 * self.max_line_chars + 1024

    @staticmethod
    def from_config(cfg: InputConfig) -> ParseLimits:
        """The limits of the ``[input]`` config section."""
        return ParseLimits(max_file_bytes=cfg.max_file_bytes, max_lines=cfg.max_lines,
                           max_line_chars=cfg.max_line_chars)


class RecordSource(Protocol):
    """A reader of one kind of input (txt, csv): its records, from the first line."""

    def items(self) -> Iterator[Line | LineError]: ...


class ParsedInput:
    """A parsed file: its kind and size up front, its records on iteration.

    Iterating is lazy (records are built one at a time), never raises, and may be
    repeated: each ``iter()`` starts again from the first line.
    """

    __slots__ = ("_source", "columns", "delimiter", "kind", "note", "total_lines")

    def __init__(self, kind: str, total_lines: int, note: str | None,
                 source: RecordSource | None, *, columns: tuple[str, ...] = ("text",),
                 delimiter: str | None = None) -> None:
        self.kind = kind
        """``"txt"`` or ``"csv"``."""
        self.total_lines = total_lines
        """Physical lines in the decoded text (zero-pads output names)."""
        self.note = note
        """Why the file yields nothing ("empty file", "no text lines", ...), else None."""
        self.columns = columns
        """The CSV header as canonical column names; ``("text",)`` for txt."""
        self.delimiter = delimiter
        """The sniffed CSV delimiter; None for txt."""
        self._source = source

    def __iter__(self) -> Iterator[Line | LineError]:
        return iter(()) if self._source is None else self._source.items()

    def __repr__(self) -> str:
        return (f"ParsedInput(kind={self.kind!r}, total_lines={self.total_lines},"
                f" note={self.note!r}, columns={self.columns!r})")


def normalize_text(raw: str) -> str:
    """The text to speak: NFC, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFC", raw).split())


def sniff_delimiter(header: str) -> str:
    """The most frequent of , ; TAB | in the header line (``,`` when none occurs)."""
    best, count = ",", 0
    for delimiter in DELIMITERS:
        n = header.count(delimiter)
        if n > count:
            best, count = delimiter, n
    return best


def line_end(text: str, pos: int) -> int:
    """Index of the LF that ends the line at ``pos`` (or ``len(text)``)."""
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def is_blank(value: str) -> bool:
    return CONTENT.search(value) is None


def escape_controls(value: str) -> str:
    return ANY_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def preview(value: str) -> str:
    """A short, single-line, control-free excerpt for error reports."""
    short = " ".join(escape_controls(value[:PREVIEW_CHARS * 4]).split())
    return short if len(short) <= PREVIEW_CHARS else short[:PREVIEW_CHARS] + "…"


def control_problem(raw: str, what: str) -> tuple[str, int] | None:
    """(message, 1-based column) for the first disallowed control character."""
    bad = CONTROL.search(raw)
    if bad is None:
        return None
    return (f"{what} contains control character U+{ord(bad.group()):04X}"
            f" (column {bad.start() + 1}); remove it"), bad.start() + 1


def clean_text(raw: str, limits: ParseLimits, what: str) -> tuple[str, str | None, int | None]:
    """(text or preview, problem, column) for a non-blank raw text."""
    if len(raw) > limits.max_record_chars:
        return preview(raw), (f"{what} is {len(raw):,} characters long; the limit is"
                               f" {limits.max_line_chars:,}"), None
    control = control_problem(raw, what)
    if control is not None:
        return preview(raw), control[0], control[1]
    text = normalize_text(raw)
    if len(text) > limits.max_line_chars:
        return preview(text), (f"{what} is {len(text):,} characters long; the limit is"
                                f" {limits.max_line_chars:,}"), None
    return text, None, None
