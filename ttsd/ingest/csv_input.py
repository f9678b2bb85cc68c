"""CSV inputs: the header, bounded records, unclosed quotes and per-field checks.

See ``ingest.parse`` for the rules; this module reads the rows of one CSV input.
"""

from __future__ import annotations

import csv
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

from ttsd.errors import InputError
from ttsd.ingest.text import (
    ANY_CONTROL,
    COLUMNS,
    CONTENT,
    CONTROL,
    MAX_SPEAKER_CHARS,
    NUMBER,
    PREVIEW_CHARS,
    VOICE,
    ParsedInput,
    ParseLimits,
    clean_text,
    escape_controls,
    is_blank,
    line_end,
    preview,
    sniff_delimiter,
)
from ttsd.records import Line, LineError


def csv_input(text: str, total: int, name: str, limits: ParseLimits) -> ParsedInput:
    pos, number = 0, 1
    while pos < len(text) and is_blank(text[pos:line_end(text, pos)]):
        pos, number = line_end(text, pos) + 1, number + 1
    if pos >= len(text):
        return ParsedInput("csv", total, "empty file" if not text else "no header and no rows",
                           None)
    end = line_end(text, pos)
    columns, delimiter = _header(text[pos:end], name, number, limits)
    rest = end + 1
    note = None if CONTENT.search(text, rest) else "no rows after the header"
    source = None if note else CsvSource(text, rest, number + 1, columns, delimiter, limits)
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
        end = line_end(self.text, self.pos) + 1
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
        self.pos = line_end(self.text, pos) + 1
        self.number = number + 1
        self.exhausted = False


_CLOSING_QUOTE = re.compile(r'(?<!")(?:"")*"(?!")')
"""Inside a quoted field: the quote that closes it (ends an odd run of quotes)."""


@dataclass
class CsvSource:
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
            raw = self.text[start_pos:line_end(self.text, start_pos)]
            feed.seek_after(start_pos, start_no)
            if is_blank(raw):
                return None
            return LineError(number=start_no, text=preview(raw),
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
    if all(is_blank(value) for value in fields):
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
    speed = _field_number("speed", values.get("speed", ""), limits.min_speed,
                          limits.max_speed, problems)
    volume = _field_number("volume", values.get("volume", ""), 0.0, limits.max_volume,
                           problems, above_low=True)
    chapter = " ".join(unicodedata.normalize("NFC", values.get("chapter", "")).split())[:200]
    pause = _field_number("pause_after", values.get("pause_after", ""), 0.0, 60.0, problems)
    markup = values.get("markup", "").strip().lower()
    if markup not in ("", "ssml", "none"):
        problems.append(f"markup {preview(markup)!r} is not \"ssml\" or \"none\"")
    if problems or text is None:
        return LineError(number=number, message="; ".join(problems), id=ident, text=text)
    return Line(number=number, text=text, id=ident, voice=voice, speaker=speaker, speed=speed,
                chapter=chapter or None, volume=volume,
                markup={"": None, "ssml": True, "none": False}[markup], pause_after=pause)


def _field_id(raw: str, problems: list[str]) -> str | None:
    """The stripped NFC id, or None when empty; control characters are a problem."""
    value = unicodedata.normalize("NFC", raw.strip())
    if CONTROL.search(raw) or ANY_CONTROL.search(value):
        problems.append("id contains a control character")
        return escape_controls(value)[:PREVIEW_CHARS] or None
    return value or None


def _field_text(raw: str, limits: ParseLimits, problems: list[str]) -> str | None:
    if is_blank(raw):
        problems.append("empty text")
        return None
    text, problem, _ = clean_text(raw, limits, "text")
    if problem is not None:
        problems.append(problem)
    return text


def _field_voice(raw: str, problems: list[str]) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if VOICE.fullmatch(value) is None or ".." in value:
        problems.append(f"voice {preview(value)!r} is not a voice name (letters, digits,"
                        " '_', '.' and '-', at most 100)")
        return None
    return value


def _field_speaker(raw: str, problems: list[str]) -> str | None:
    value = unicodedata.normalize("NFC", raw.strip())
    if not value:
        return None
    if ANY_CONTROL.search(value) or len(value) > MAX_SPEAKER_CHARS:
        problems.append(f"speaker {preview(value)!r} is not a speaker name or number"
                        f" (at most {MAX_SPEAKER_CHARS} characters, no control characters)")
        return None
    return value


def _field_number(name: str, raw: str, low: float, high: float, problems: list[str],
                  above_low: bool = False) -> float | None:
    """A finite number from ``low`` (or above it, with ``above_low``) to ``high``; a
    decimal comma ("1,5") is accepted."""
    value = raw.strip()
    if not value:
        return None
    number = value.replace(",", ".") if value.count(",") == 1 and "." not in value else value
    got = float(number) if NUMBER.fullmatch(number) else math.nan
    if not (math.isfinite(got) and (low < got if above_low else low <= got) and got <= high):
        bound = f"above {low:g} and at most" if above_low else f"between {low:g} and"
        problems.append(f"{name} {preview(value)!r} is not a finite number {bound} {high:g}")
        return None
    return got
