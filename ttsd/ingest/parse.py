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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath

from ttsd.errors import InputError
from ttsd.ingest.csv_input import csv_input
from ttsd.ingest.text import ParsedInput, ParseLimits, clean_text, is_blank, line_end
from ttsd.records import Line, LineError

KINDS = {".txt": "txt", ".csv": "csv"}
"""File extension (lower case) → input kind."""
BINARY_PROBE = 8000
"""A NUL within this many bytes (characters, for UTF-16/32) makes a file binary."""

_BOMS = (  # UTF-32 LE first: its BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32", 4),
    (codecs.BOM_UTF32_BE, "utf-32", 4),
    (codecs.BOM_UTF8, "utf-8", 1),
    (codecs.BOM_UTF16_LE, "utf-16", 2),
    (codecs.BOM_UTF16_BE, "utf-16", 2),
)


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
    return csv_input(text, total, name, limits)


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


# --- txt --------------------------------------------------------------------------


def _txt_input(text: str, total: int, limits: ParseLimits) -> ParsedInput:
    note = None
    if not text:
        note = "empty file"
    elif is_blank(text):
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
            end = line_end(text, pos)
            raw = text[pos:end]
            if not is_blank(raw):
                yield _txt_line(number, raw, self.limits)
            pos, number = end + 1, number + 1


def _txt_line(number: int, raw: str, limits: ParseLimits) -> Line | LineError:
    text, problem, column = clean_text(raw, limits, "line")
    if problem is not None:
        return LineError(number=number, message=problem, text=text, column=column)
    return Line(number=number, text=text)


# --- csv --------------------------------------------------------------------------


