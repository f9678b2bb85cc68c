"""Parse a claimed input file: bytes in, ``Line`` / ``LineError`` records out.

Pure: no file I/O. :func:`parse` settles everything that concerns the whole file
before it returns (kind, size, encoding, binary content, line count, CSV header) and
raises :class:`~ttsd.errors.InputError` naming the file, line and column. The
:class:`ParsedInput` it returns yields one record per utterance, lazily, and never
raises: a bad line becomes a ``LineError`` and fails alone.

Line breaks are CRLF, lone CR and LF. They are unified to LF once, right after
decoding, so no CR ever reaches a text, an id or a name. Texts are NFC-normalized and
their whitespace collapsed (:func:`normalize_text`). Tabs, vertical tabs and form
feeds count as whitespace; any other C0/C1 control character in a line makes that line
a ``LineError`` (not a file error), as does any control character in a CSV id.

CSV records are bounded: a record may span at most ``ParseLimits.max_record_chars``
characters. The bound is enforced on the lines handed to the csv module, before they
reach it, and ``csv.field_size_limit`` (process-global) is set to the same bound
around each record read and restored at once; it is never raised to ``sys.maxsize``.

Unclosed quotes: a stray quote makes the csv module read the following lines as part
of one quoted field. When a record that spans several lines fails (it runs past the
bound, reaches the end of the file inside quotes, or has text after a closing quote),
ttsd reports one ``LineError`` on the line where that record starts and then reads the
lines after that start line again as new rows, so that one stray quote costs one row,
not the rest of the file. The one exception is a quoted field that is merely too long
but closes cleanly (its closing quote is followed by the delimiter or a line end): it
is reported once and parsing resumes after the line where it closes. Each re-read
covers at most ``max_record_chars`` characters, and lines inside a quoted region
cannot themselves start a multi-line record, so the work stays linear in the file size.
"""

from __future__ import annotations

import codecs
import csv
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING

from ttsd.errors import InputError
from ttsd.records import Line, LineError

if TYPE_CHECKING:
    from ttsd.config import InputConfig

KINDS = {".txt": "txt", ".csv": "csv"}
"""File extension (lower case) → input kind."""
COLUMNS = ("id", "text", "voice", "speaker", "speed")
"""The CSV columns ttsd knows; ``text`` is required."""
DELIMITERS = (",", ";", "\t", "|")
"""CSV delimiters sniffed from the header line, in order of preference on a tie."""
BINARY_PROBE = 8000
"""A NUL within this many bytes (characters, for UTF-16/32) makes a file binary."""
MAX_SPEAKER_CHARS = 100
PREVIEW_CHARS = 80

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
"""Control characters not allowed in text (tab, LF, VT, FF and CR are whitespace)."""
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""Control characters not allowed in ids and speakers (whitespace controls too)."""
_CONTENT = re.compile(r"[^\s]|[\x00-\x08\x0e-\x1f\x7f-\x9f]")
"""Anything that makes a line more than blank: a visible character or a bad control."""
_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_BOMS = (  # UTF-32 LE first: its BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32", 4),
    (codecs.BOM_UTF32_BE, "utf-32", 4),
    (codecs.BOM_UTF8, "utf-8", 1),
    (codecs.BOM_UTF16_LE, "utf-16", 2),
    (codecs.BOM_UTF16_BE, "utf-16", 2),
)


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

    @property
    def max_record_chars(self) -> int:
        """Raw characters one line or CSV record may span: twice the text limit + 1024."""
        return 2 * self.max_line_chars + 1024

    @staticmethod
    def from_config(cfg: InputConfig) -> ParseLimits:
        """The limits of the ``[input]`` config section."""
        return ParseLimits(max_file_bytes=cfg.max_file_bytes, max_lines=cfg.max_lines,
                           max_line_chars=cfg.max_line_chars)


class ParsedInput:
    """A parsed file: its kind and size up front, its records on iteration.

    Iterating is lazy (records are built one at a time), never raises, and may be
    repeated: each ``iter()`` starts again from the first line.
    """

    __slots__ = ("_source", "columns", "delimiter", "kind", "note", "total_lines")

    def __init__(self, kind: str, total_lines: int, note: str | None,
                 source: _TxtSource | _CsvSource | None, *, columns: tuple[str, ...] = ("text",),
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


def parse(data: bytes, name: str, limits: ParseLimits) -> ParsedInput:
    """Check a whole input file and return its lazily parsed records.

    Raises InputError (file, line, column) for anything that rejects the file.
    """
    kind = input_kind(name)
    if len(data) > limits.max_file_bytes:
        raise InputError(f"file is {len(data):,} bytes; the limit is {limits.max_file_bytes:,}",
                         file=name)
    text = _unify_newlines(decode(data, name))
    total = _count_lines(text)
    if total > limits.max_lines:
        raise InputError(f"file has {total:,} lines; the limit is {limits.max_lines:,}",
                         file=name)
    if kind == "txt":
        return _txt_input(text, total, limits)
    return _csv_input(text, total, name, limits)


def input_kind(name: str) -> str:
    """``"txt"`` or ``"csv"`` from the file name's extension (any case)."""
    suffix = PurePath(name).suffix
    kind = KINDS.get(suffix.lower())
    if kind is None:
        raise InputError(f"unsupported file type {suffix or '(no extension)'!r};"
                         " use .txt or .csv", file=name)
    return kind


def decode(data: bytes, name: str) -> str:
    """Bytes → text: BOM first (UTF-8/16/32), then the binary test, then strict UTF-8."""
    bom, encoding, unit = _sniff_bom(data)
    if unit == 1:
        nul = data.find(b"\x00", len(bom), len(bom) + BINARY_PROBE)
        if nul >= 0:
            raise InputError(f"binary file (a NUL byte at offset {nul}); if it is text,"
                             " save it as UTF-8", file=name)
    try:
        text = str(memoryview(data)[len(bom):], encoding) if unit == 1 else str(data, encoding)
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(bom) if unit == 1 else 0)
        line, column = _locate(data, offset, encoding)
        raise InputError(f"not valid {encoding.upper()} at byte {offset}"
                         f" (0x{data[offset:offset + 1].hex()}); save the file as UTF-8",
                         file=name, line=line, column=column) from None
    if unit > 1 and "\x00" in text[:BINARY_PROBE]:
        raise InputError("binary file (a NUL character near the start)", file=name)
    return text


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


# --- text and lines ---------------------------------------------------------------


def _sniff_bom(data: bytes) -> tuple[bytes, str, int]:
    """(BOM, codec, code unit size); no BOM means UTF-8."""
    for bom, encoding, unit in _BOMS:
        if data.startswith(bom):
            return bom, encoding, unit
    return b"", "utf-8", 1


def _locate(data: bytes, offset: int, encoding: str) -> tuple[int, int]:
    """1-based (line, column in characters) of the byte at ``offset``."""
    codec = "utf-8-sig" if encoding == "utf-8" else encoding
    prefix = _unify_newlines(data[:offset].decode(codec, errors="replace"))
    return prefix.count("\n") + 1, len(prefix) - prefix.rfind("\n")


def _unify_newlines(text: str) -> str:
    """CRLF and lone CR → LF."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _count_lines(text: str) -> int:
    """Physical lines of LF-only text (a last line without LF counts)."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def _line_end(text: str, pos: int) -> int:
    """Index of the LF that ends the line at ``pos`` (or ``len(text)``)."""
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _is_blank(value: str) -> bool:
    return _CONTENT.search(value) is None


def _escape_controls(value: str) -> str:
    return _ANY_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def _preview(value: str) -> str:
    """A short, single-line, control-free excerpt for error reports."""
    short = " ".join(_escape_controls(value[:PREVIEW_CHARS * 4]).split())
    return short if len(short) <= PREVIEW_CHARS else short[:PREVIEW_CHARS] + "…"


def _control_problem(raw: str, what: str) -> tuple[str, int] | None:
    """(message, 1-based column) for the first disallowed control character."""
    bad = _CONTROL.search(raw)
    if bad is None:
        return None
    return (f"{what} contains control character U+{ord(bad.group()):04X}"
            f" (column {bad.start() + 1}); remove it"), bad.start() + 1


def _clean_text(raw: str, limits: ParseLimits, what: str) -> tuple[str, str | None, int | None]:
    """(text or preview, problem, column) for a non-blank raw text."""
    if len(raw) > limits.max_record_chars:
        return _preview(raw), (f"{what} is {len(raw):,} characters long; the limit is"
                               f" {limits.max_line_chars:,}"), None
    control = _control_problem(raw, what)
    if control is not None:
        return _preview(raw), control[0], control[1]
    text = normalize_text(raw)
    if len(text) > limits.max_line_chars:
        return _preview(text), (f"{what} is {len(text):,} characters long; the limit is"
                                f" {limits.max_line_chars:,}"), None
    return text, None, None


# --- txt --------------------------------------------------------------------------


def _txt_input(text: str, total: int, limits: ParseLimits) -> ParsedInput:
    note = None
    if not text:
        note = "empty file"
    elif _is_blank(text):
        note = "no text lines"
    return ParsedInput("txt", total, note, None if note else _TxtSource(text, limits))


@dataclass(frozen=True)
class _TxtSource:
    text: str
    limits: ParseLimits

    def items(self) -> Iterator[Line | LineError]:
        """One Line (or LineError) per non-blank physical line."""
        text, pos, number = self.text, 0, 1
        while pos < len(text):
            end = _line_end(text, pos)
            raw = text[pos:end]
            if not _is_blank(raw):
                yield _txt_line(number, raw, self.limits)
            pos, number = end + 1, number + 1


def _txt_line(number: int, raw: str, limits: ParseLimits) -> Line | LineError:
    text, problem, column = _clean_text(raw, limits, "line")
    if problem is not None:
        return LineError(number=number, message=problem, text=text, column=column)
    return Line(number=number, text=text)


# --- csv --------------------------------------------------------------------------


def _csv_input(text: str, total: int, name: str, limits: ParseLimits) -> ParsedInput:
    pos, number = 0, 1
    while pos < len(text) and _is_blank(text[pos:_line_end(text, pos)]):
        pos, number = _line_end(text, pos) + 1, number + 1
    if pos >= len(text):
        return ParsedInput("csv", total, "empty file" if not text else "no header and no rows",
                           None)
    end = _line_end(text, pos)
    columns, delimiter = _header(text[pos:end], name, number, limits)
    rest = end + 1
    note = None if _CONTENT.search(text, rest) else "no rows after the header"
    source = None if note else _CsvSource(text, rest, number + 1, columns, delimiter, limits)
    return ParsedInput("csv", total, note, source, columns=columns, delimiter=delimiter)


def _header(line: str, name: str, number: int,
            limits: ParseLimits) -> tuple[tuple[str, ...], str]:
    """(canonical column names, delimiter) of the header line, or InputError."""
    if len(line) > limits.max_record_chars:
        raise InputError(f"the header line is {len(line):,} characters long", file=name,
                         line=number)
    delimiter = sniff_delimiter(line)
    try:
        fields = _read_record(_reader([line], delimiter), limits.max_record_chars)
    except csv.Error as exc:
        raise InputError(f"cannot read the CSV header: {exc}", file=name, line=number) from None
    known = ", ".join(COLUMNS)
    seen: dict[str, int] = {}
    for index, raw in enumerate(fields, 1):
        key = raw.strip().strip("\ufeff").strip().casefold()
        if not key:
            raise InputError(f"column {index} of the header has no name", file=name,
                             line=number, column=index)
        if key not in COLUMNS:
            raise InputError(f"unknown column {raw.strip()!r}; the first line must be a header"
                             f" naming columns among: {known}", file=name, line=number,
                             column=index)
        if key in seen:
            raise InputError(f"duplicate column {key!r} (columns {seen[key]} and {index})",
                             file=name, line=number, column=index)
        seen[key] = index
    if "text" not in seen:
        raise InputError(f"the header has no 'text' column (it has: {', '.join(seen)})",
                         file=name, line=number)
    return tuple(seen), delimiter


def _reader(lines: Iterator[str] | list[str], delimiter: str) -> Iterator[list[str]]:
    return csv.reader(lines, delimiter=delimiter, quotechar='"', doublequote=True,
                      skipinitialspace=True, strict=True)


def _read_record(reader: Iterator[list[str]], limit: int) -> list[str]:
    """next(reader) with csv.field_size_limit set to ``limit`` just for this call."""
    old = csv.field_size_limit(limit)
    try:
        return next(reader)
    finally:
        csv.field_size_limit(old)


class _RecordTooLong(Exception):
    """The next line would take the record past ``max_record_chars``."""


class _Feed:
    """Hands the csv reader one LF-terminated physical line at a time.

    Tracks the number of the next line and refuses (``_RecordTooLong``) a line that
    would take the current record past its character budget, before the csv module
    sees it. ``seek_after`` moves it, so a failed record can be re-read from a line.
    """

    def __init__(self, text: str, pos: int, number: int, budget: int) -> None:
        self.text = text
        self.pos = pos
        self.number = number
        self.budget = budget
        self.record_chars = 0
        self.exhausted = False

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.text):
            self.exhausted = True
            raise StopIteration
        end = _line_end(self.text, self.pos) + 1
        size = end - self.pos
        if self.record_chars + size > self.budget:
            raise _RecordTooLong
        line = self.text[self.pos:end]
        self.record_chars += size
        self.pos, self.number = end, self.number + 1
        return line if line.endswith("\n") else line + "\n"

    def start_record(self) -> None:
        self.record_chars = 0

    def seek_after(self, pos: int, number: int) -> None:
        """Continue with the line after line ``number``, which contains ``pos``."""
        self.pos = _line_end(self.text, pos) + 1
        self.number = number + 1
        self.exhausted = False


_CLOSING_QUOTE = re.compile(r'(?<!")(?:"")*"(?!")')
"""Inside a quoted field: the quote that closes it (ends an odd run of quotes)."""


@dataclass
class _CsvSource:
    text: str
    start: int
    first_number: int
    columns: tuple[str, ...]
    delimiter: str
    limits: ParseLimits
    never_closes_from: int = -1
    """Memo: from this offset on, a quoted field never closes (-1: unknown)."""

    def items(self) -> Iterator[Line | LineError]:
        """One Line or LineError per non-blank record; see the module doc for errors."""
        budget = self.limits.max_record_chars
        feed = _Feed(self.text, self.start, self.first_number, budget)
        reader = _reader(feed, self.delimiter)
        while True:
            start_pos, start_no = feed.pos, feed.number
            feed.start_record()
            try:
                fields = _read_record(reader, budget)
            except StopIteration:
                return
            except _RecordTooLong:
                error = self._too_long(feed, start_pos, start_no)
                if error is not None:
                    yield error
                continue
            except csv.Error as exc:
                yield self._malformed(feed, start_pos, start_no, exc)
                continue
            item = _csv_row(start_no, fields, self.columns, self.delimiter, self.limits)
            if item is not None:
                yield item

    def _too_long(self, feed: _Feed, start_pos: int, start_no: int) -> LineError | None:
        budget = self.limits.max_record_chars
        if feed.number == start_no:  # its first line alone is too long (None: it is blank)
            raw = self.text[start_pos:_line_end(self.text, start_pos)]
            feed.seek_after(start_pos, start_no)
            if _is_blank(raw):
                return None
            return LineError(number=start_no, text=_preview(raw),
                             message=f"row is {len(raw):,} characters long; the limit is"
                                     f" {budget:,}")
        close = self._clean_close(feed.pos)
        if close >= 0:
            end_no = feed.number + self.text.count("\n", feed.pos, close)
            feed.seek_after(close, end_no)
            return LineError(number=start_no,
                             message=f"row is longer than {budget:,} characters (a quoted"
                                     f" field runs from line {start_no} to line {end_no})")
        feed.seek_after(start_pos, start_no)
        return LineError(number=start_no,
                         message=f"unclosed quote: a quoted field in the row on line {start_no}"
                                 f" does not close within {budget:,} characters; the lines"
                                 " after it are read as new rows")

    def _malformed(self, feed: _Feed, start_pos: int, start_no: int,
                   exc: csv.Error) -> LineError:
        spans = feed.number - start_no > 1
        if feed.exhausted:
            message = (f"unclosed quote: a quoted field in the row on line {start_no}"
                       " is never closed")
        elif spans:
            message = (f"stray quote: a quoted field in the row on line {start_no} runs on"
                       f" to line {feed.number - 1} and ends badly there")
        elif "expected after" in str(exc):
            message = ("text after a closing quote; put the whole field in double quotes"
                       ' and write a quote inside it as ""')
        else:
            message = f"malformed CSV row ({exc})"
        if spans:  # re-read the lines after its first line as rows
            feed.seek_after(start_pos, start_no)
            message += "; the lines after it are read as new rows"
        return LineError(number=start_no, message=message)

    def _clean_close(self, pos: int) -> int:
        """Offset of the quote closing a field open at ``pos``, if the field ends there.

        -1 when it never closes, or closes with text after the quote (a stray quote).
        """
        if 0 <= self.never_closes_from <= pos:
            return -1
        match = _CLOSING_QUOTE.search(self.text, pos)
        if match is None:
            self.never_closes_from = pos
            return -1
        close = match.end() - 1
        after = self.text[close + 1:close + 2]
        return close if after in ("", "\n", self.delimiter) else -1


def _csv_row(number: int, fields: list[str], columns: tuple[str, ...], delimiter: str,
             limits: ParseLimits) -> Line | LineError | None:
    """A Line, a LineError, or None for a row whose fields are all blank."""
    if all(_is_blank(value) for value in fields):
        return None
    if len(fields) != len(columns):
        shown = "TAB" if delimiter == "\t" else delimiter
        plural = "" if len(columns) == 1 else "s"
        return LineError(number=number,
                         message=f"expected {len(columns)} field{plural} ({', '.join(columns)})"
                                 f" but found {len(fields)}; put a field that contains"
                                 f" {shown!r} in double quotes")
    values = dict(zip(columns, fields, strict=True))
    problems: list[str] = []
    ident = _field_id(values.get("id", ""), problems)
    text = _field_text(values["text"], limits, problems)
    voice = _field_voice(values.get("voice", ""), problems)
    speaker = _field_speaker(values.get("speaker", ""), problems)
    speed = _field_speed(values.get("speed", ""), limits, problems)
    if problems or text is None:
        return LineError(number=number, message="; ".join(problems), id=ident, text=text)
    return Line(number=number, text=text, id=ident, voice=voice, speaker=speaker, speed=speed)


def _field_id(raw: str, problems: list[str]) -> str | None:
    """The stripped NFC id, or None when empty; control characters are a problem."""
    value = unicodedata.normalize("NFC", raw.strip())
    if _CONTROL.search(raw) or _ANY_CONTROL.search(value):
        problems.append("id contains a control character")
        return _escape_controls(value)[:PREVIEW_CHARS] or None
    return value or None


def _field_text(raw: str, limits: ParseLimits, problems: list[str]) -> str | None:
    if _is_blank(raw):
        problems.append("empty text")
        return None
    text, problem, _ = _clean_text(raw, limits, "text")
    if problem is not None:
        problems.append(problem)
    return text


def _field_voice(raw: str, problems: list[str]) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if _VOICE.fullmatch(value) is None or ".." in value:
        problems.append(f"voice {_preview(value)!r} is not a voice name (letters, digits,"
                        " '_', '.' and '-', at most 100)")
        return None
    return value


def _field_speaker(raw: str, problems: list[str]) -> str | None:
    value = unicodedata.normalize("NFC", raw.strip())
    if not value:
        return None
    if _ANY_CONTROL.search(value) or len(value) > MAX_SPEAKER_CHARS:
        problems.append(f"speaker {_preview(value)!r} is not a speaker name or number"
                        f" (at most {MAX_SPEAKER_CHARS} characters, no control characters)")
        return None
    return value


def _field_speed(raw: str, limits: ParseLimits, problems: list[str]) -> float | None:
    """A finite speed within limits; a decimal comma ("1,5") is accepted."""
    value = raw.strip()
    if not value:
        return None
    number = value.replace(",", ".") if value.count(",") == 1 and "." not in value else value
    speed = float(number) if _NUMBER.fullmatch(number) else math.nan
    if not (math.isfinite(speed) and limits.min_speed <= speed <= limits.max_speed):
        problems.append(f"speed {_preview(value)!r} is not a finite number between"
                        f" {limits.min_speed:g} and {limits.max_speed:g}")
        return None
    return speed
