"""Tests of ttsd.ingest.parse: bytes → Line / LineError (docs/reliability.md, the
content and parsing cases: huge-file to bad-voice-or-speed)."""

from __future__ import annotations

import codecs
import csv
import io
import os
import random
import sys
import tracemalloc
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttsd.config import InputConfig
from ttsd.errors import InputError
from ttsd.ingest import csv_input as csv_input_module
from ttsd.ingest import text as text_module
from ttsd.ingest.names import name_key, safe_stem
from ttsd.ingest.parse import decode, parse
from ttsd.ingest.text import ParsedInput, ParseLimits, normalize_text, sniff_delimiter
from ttsd.records import Line, LineError

LIMITS = ParseLimits()


def items(data: bytes | str, name: str = "in.txt",
          limits: ParseLimits = LIMITS) -> list[Line | LineError]:
    """All records of a parse (str data is encoded as UTF-8)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return list(parse(raw, name, limits))


def texts(data: bytes | str, name: str = "in.txt") -> list[str]:
    out = items(data, name)
    assert all(isinstance(item, Line) for item in out), out
    return [item.text for item in out if isinstance(item, Line)]


def only_error(data: bytes | str, name: str = "in.csv") -> LineError:
    out = items(data, name)
    assert len(out) == 1 and isinstance(out[0], LineError), out
    return out[0]


# --- kind, size, line count ---------------------------------------------------------


@pytest.mark.parametrize("name,kind", [("a.txt", "txt"), ("B.TXT", "txt"), ("c.Csv", "csv"),
                                       ("dir.v2/x.tar.csv", "csv")])
def test_kind_by_extension_any_case(name: str, kind: str) -> None:
    """Kind comes from the extension, case-insensitively."""
    data = b"text\nhello\n"
    assert parse(data, name, LIMITS).kind == kind


@pytest.mark.parametrize("name", ["a.tsv", "a", "a.txt.bak", ".csv", "a.wav"])
def test_other_extensions_rejected(name: str) -> None:
    """Anything but .txt / .csv is a file error naming the file."""
    with pytest.raises(InputError) as info:
        parse(b"hello\n", name, LIMITS)
    assert info.value.file == name
    assert ".txt or .csv" in info.value.message


def test_size_over_limit_rejected() -> None:
    """huge-file: a file over max_file_bytes is rejected (the daemon checks on stat too)."""
    limits = ParseLimits(max_file_bytes=10)
    assert [i.text for i in parse(b"0123456789", "a.txt", limits)] == ["0123456789"]
    with pytest.raises(InputError, match="limit is 10"):
        parse(b"0123456789a", "a.txt", limits)


def test_too_many_lines_rejected_before_iteration() -> None:
    """More than max_lines physical lines is a file error, raised by parse() itself."""
    limits = ParseLimits(max_lines=3)
    assert parse(b"a\nb\nc\n", "a.txt", limits).total_lines == 3
    assert parse(b"a\r\n\r\nc", "a.txt", limits).total_lines == 3
    with pytest.raises(InputError, match="4 lines"):
        parse(b"a\nb\nc\nd", "a.txt", limits)
    with pytest.raises(InputError, match="4 lines"):
        parse(b"text\n\n\n\n", "a.csv", limits)


def test_total_lines_counts_physical_lines() -> None:
    """total_lines counts physical lines, blank ones and a last line without LF too."""
    assert parse(b"", "a.txt", LIMITS).total_lines == 0
    assert parse(b"\n", "a.txt", LIMITS).total_lines == 1
    assert parse(b"a\n\nb", "a.txt", LIMITS).total_lines == 3
    assert parse(b'text\n"x\ny"\n', "a.csv", LIMITS).total_lines == 3


def test_limits_from_config() -> None:
    """ParseLimits takes its bounds from [input]; the speed range keeps its defaults."""
    cfg = InputConfig(max_file_bytes=123, max_lines=45, max_line_chars=67)
    limits = ParseLimits.from_config(cfg)
    assert (limits.max_file_bytes, limits.max_lines, limits.max_line_chars) == (123, 45, 67)
    assert (limits.min_speed, limits.max_speed) == (0.1, 10.0)
    assert limits.max_record_chars == 2 * 67 + 1024


# --- txt ------------------------------------------------------------------------------


def test_txt_one_line_per_nonblank_line_with_physical_numbers() -> None:
    """txt: one Line per non-blank line; number is the physical line number."""
    out = items("  Hello   world \n\n\t\nSecond\tline\n")
    assert out == [Line(number=1, text="Hello world"), Line(number=4, text="Second line")]


def test_txt_text_is_nfc_and_whitespace_collapsed() -> None:
    """Text is NFC-normalized; runs of any whitespace (NBSP, U+2028, VT, FF) become one space."""
    assert texts("cafe\u0301\n") == ["café"]
    assert texts("a\u00a0\u00a0b\u2028c\x0bd\x0ce\n") == ["a b c d e"]


def test_txt_control_character_fails_the_line_alone() -> None:
    """A line holding a control character (BEL, NUL past the probe, ESC) is a LineError."""
    out = items("good\nbad\x07bell\nfine\n")
    assert isinstance(out[0], Line) and isinstance(out[2], Line)
    error = out[1]
    assert isinstance(error, LineError)
    assert (error.number, error.column) == (2, 4)
    assert "U+0007" in error.message
    assert error.text == "bad\\x07bell"


def test_txt_line_at_limit_ok_over_limit_fails() -> None:
    """A text of max_line_chars is fine; one more character fails that line only."""
    limits = ParseLimits(max_line_chars=10)
    out = list(parse(b"0123456789\n0123456789x\nok\n", "a.txt", limits))
    assert out[0] == Line(number=1, text="0123456789")
    assert isinstance(out[1], LineError) and out[1].number == 2
    assert "11 characters" in out[1].message
    assert out[2] == Line(number=3, text="ok")


def test_huge_txt_line_is_a_row_error() -> None:
    """huge-line-or-open-quote: a 1 MB line gives a row error with a short preview; other lines go
    on."""
    data = b"first\n" + b"x" * 1_000_000 + b"\nlast\n"
    out = items(data)
    assert [type(i) for i in out] == [Line, LineError, Line]
    error = out[1]
    assert isinstance(error, LineError) and error.number == 2
    assert "1,000,000 characters" in error.message
    assert error.text is not None and len(error.text) <= 81


def test_iteration_is_repeatable() -> None:
    """A ParsedInput may be iterated more than once with the same result."""
    parsed = parse(b"id,text\n1,a\n2,\"b\n", "a.csv", LIMITS)
    assert list(parsed) == list(parsed)
    assert len(list(parsed)) == 2


def test_iteration_is_lazy() -> None:
    """one-big-file: the first record of 100,000 lines comes without building the others."""
    data = "".join(f"Line number {i} of the book.\n" for i in range(100_000)).encode()
    for name, body in (("big.txt", data), ("big.csv", b"text\n" + data)):
        parsed = parse(body, name, LIMITS)
        tracemalloc.start()
        try:
            first = next(iter(parsed))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(first, Line) and first.text == "Line number 0 of the book."
        assert peak < 1_000_000, peak  # all Lines at once would take tens of MB


# --- encodings ---------------------------------------------------------------------


def test_binary_file_rejected() -> None:
    """binary-file: 4 KB of random bytes with NULs is rejected as binary."""
    rng = random.Random(11)
    blob = bytes(rng.randrange(256) for _ in range(4096)) + b"\x00"
    blob = blob.replace(b"\xff\xfe", b"xx").replace(b"\xfe\xff", b"xx").replace(b"\xef\xbb", b"xx")
    for name in ("blob.txt", "blob.csv"):
        with pytest.raises(InputError, match="binary"):
            parse(blob, name, LIMITS)


def test_nul_after_probe_fails_only_its_line() -> None:
    """binary-file: a NUL past the first 8000 bytes is not a binary file, but its line fails."""
    data = b"abc\n" * 2000 + b"ok\nx\x00y\n"
    out = items(data)
    assert out[2000] == Line(number=2001, text="ok")
    assert isinstance(out[2001], LineError) and out[2001].number == 2002
    assert len(out) == 2002


def test_utf8_bom_stripped() -> None:
    """bom-and-utf16: a UTF-8 BOM is stripped; it never reaches text or a header name."""
    assert texts(codecs.BOM_UTF8 + "héllo\n".encode()) == ["héllo"]
    out = items(codecs.BOM_UTF8 + b"id,text\nA1,hi\n", "a.csv")
    assert out == [Line(number=2, text="hi", id="A1")]


@pytest.mark.parametrize("encode", [
    lambda s: s.encode("utf-16"),
    lambda s: codecs.BOM_UTF16_LE + s.encode("utf-16-le"),
    lambda s: codecs.BOM_UTF16_BE + s.encode("utf-16-be"),
    lambda s: s.encode("utf-32"),
    lambda s: codecs.BOM_UTF32_BE + s.encode("utf-32-be"),
], ids=["utf16", "utf16le", "utf16be", "utf32", "utf32be"])
def test_utf16_and_utf32_with_bom(encode) -> None:
    """bom-and-utf16: UTF-16/32 with a BOM decode (the BOM is seen before the NUL test)."""
    text = "voice,TEXT\nen_US-joe-medium,Grüße 😀\n"
    assert b"\x00" in encode(text)
    out = list(parse(encode(text), "a.csv", LIMITS))
    assert out == [Line(number=2, text="Grüße 😀", voice="en_US-joe-medium")]
    assert [i.text for i in parse(encode("one\r\ntwo\n"), "a.txt", LIMITS)] == ["one", "two"]


def test_utf16_without_bom_is_binary() -> None:
    """bom-and-utf16: UTF-16 without a BOM has NULs and no BOM: rejected with a hint."""
    with pytest.raises(InputError, match="binary"):
        parse("hello\n".encode("utf-16-le"), "a.txt", LIMITS)


def test_latin1_rejected_with_position() -> None:
    """bad-encoding: Latin-1 'café' fails strict UTF-8 with byte offset, line and column."""
    with pytest.raises(InputError) as info:
        parse("café".encode("latin-1"), "menu.txt", LIMITS)
    error = info.value
    assert (error.file, error.line, error.column) == ("menu.txt", 1, 4)
    assert "byte 3" in error.message and "0xe9" in error.message
    assert "UTF-8" in error.message
    assert "\ufffd" not in str(error)


def test_invalid_utf8_position_counts_all_newline_styles() -> None:
    """bad-encoding: the position counts CRLF, CR and LF lines and characters, not bytes."""
    data = "one\r\ntwo\rthré".encode() + b"\xff" + b"\n"
    with pytest.raises(InputError) as info:
        parse(data, "a.txt", LIMITS)
    assert (info.value.line, info.value.column) == (3, 5)
    offset = data.index(b"\xff")
    assert f"byte {offset} " in info.value.message


def test_utf8_bom_offset_and_bad_utf16() -> None:
    """bad-encoding: offsets count the BOM; a lone surrogate in UTF-16 is rejected too."""
    with pytest.raises(InputError, match="byte 4 "):
        parse(codecs.BOM_UTF8 + b"a\xc3(", "a.txt", LIMITS)
    with pytest.raises(InputError, match="UTF-16"):
        parse(codecs.BOM_UTF16_LE + "ab".encode("utf-16-le") + b"\x00\xd8a\x00", "a.txt",
              LIMITS)


def test_decode_never_substitutes() -> None:
    """bad-encoding: decoding is strict — an overlong or surrogate UTF-8 sequence is an error."""
    for bad in (b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"):
        with pytest.raises(InputError):
            decode(b"ok " + bad, "a.txt")


# --- newlines and blank files ------------------------------------------------------------


def test_crlf_cr_lf_and_trailing_spaces() -> None:
    """line-endings: b'a\\r\\nb\\rc  \\n' gives three clean lines and no CR anywhere."""
    assert items(b"a\r\nb\rc  \n") == [Line(1, "a"), Line(2, "b"), Line(3, "c")]


def test_no_cr_in_csv_fields() -> None:
    """line-endings: CR line ends and CRLF inside quoted fields never reach text or ids."""
    out = items(b'id,text\r\n a1 ,"x\r\ny"\rb2,z\r', "a.csv")
    assert out == [Line(2, "x y", id="a1"), Line(4, "z", id="b2")]


@pytest.mark.parametrize("data,note", [(b"", "empty file"), (b"\n \n", "no text lines"),
                                       (codecs.BOM_UTF8, "empty file"),
                                       (b" \t\r\n\r\n", "no text lines")])
def test_empty_or_blank_txt(data: bytes, note: str) -> None:
    """empty-file: an empty or blank-only file yields nothing and carries a note."""
    parsed = parse(data, "a.txt", LIMITS)
    assert list(parsed) == []
    assert parsed.note == note


@pytest.mark.parametrize("data", [b"", b"\n \n", b"id,text\n", b"id,text\n\n  \n"])
def test_empty_or_header_only_csv(data: bytes) -> None:
    """empty-file: an empty CSV, or one with only a header, yields nothing with a note."""
    parsed = parse(data, "a.csv", LIMITS)
    assert list(parsed) == []
    assert parsed.note


def test_note_is_none_when_lines_exist() -> None:
    """The note is only set when nothing can come out."""
    assert parse(b"\n\nhi\n", "a.txt", LIMITS).note is None
    assert parse(b"text\nhi\n", "a.csv", LIMITS).note is None


# --- csv dialect ---------------------------------------------------------------------------


def test_quoted_newline_numbers_the_record_start() -> None:
    """csv-dialect: quoted newlines are allowed; Line.number is the line the record starts on."""
    data = 'id,text\n1,"first\nsecond\nthird"\n2,"He said ""hi"", twice"\n'
    assert items(data, "a.csv") == [Line(2, "first second third", id="1"),
                                     Line(5, 'He said "hi", twice', id="2")]


def test_header_names_stripped_case_insensitive() -> None:
    """csv-dialect: header names are stripped and case-insensitive; order is free."""
    data = " Speed ; TEXT;Id ;VOICE;speaker\n1.5;Hallo;a;de_DE-x-low;3\n"
    parsed = parse(data.encode(), "a.csv", LIMITS)
    assert parsed.columns == ("speed", "text", "id", "voice", "speaker")
    assert parsed.delimiter == ";"
    assert list(parsed) == [Line(2, "Hallo", id="a", voice="de_DE-x-low", speaker="3",
                                 speed=1.5)]


@pytest.mark.parametrize("header,delimiter", [("id,text", ","), ("id;text", ";"),
                                              ("id\ttext", "\t"), ("id|text", "|"),
                                              ("text", ","), ("a;b;c,d", ";"), ("id;text,x", ",")])
def test_delimiter_sniffed_from_header(header: str, delimiter: str) -> None:
    """csv-dialect: the delimiter is the most frequent of , ; TAB | in the header (default ,)."""
    assert sniff_delimiter(header) == delimiter


def test_tab_and_pipe_files() -> None:
    """csv-dialect: a TSV or pipe-separated file parses; other delimiters stay in the text."""
    assert items("id\ttext\n1\tHello, world; yes\n", "a.csv") == [
        Line(2, "Hello, world; yes", id="1")]
    assert items("id|text\n1|a, b\n", "a.csv") == [Line(2, "a, b", id="1")]


@pytest.mark.parametrize("header,fragment,column", [
    ("id,txt", "unknown column 'txt'", 2),
    ("id,text,id", "duplicate column 'id'", 3),
    ("ID,Text,text", "duplicate column 'text'", 3),
    ("id,voice", "no 'text' column", None),
    ("id,,text", "has no name", 2),
    ("Hello world", "unknown column 'Hello world'", 1),
])
def test_bad_header_rejects_file(header: str, fragment: str, column: int | None) -> None:
    """csv-dialect: unknown, duplicate, empty or missing columns reject the file at line 1."""
    with pytest.raises(InputError) as info:
        parse(f"{header}\n1,hi\n".encode(), "a.csv", LIMITS)
    assert fragment in info.value.message
    assert (info.value.file, info.value.line, info.value.column) == ("a.csv", 1, column)


def test_header_after_blank_lines_and_bad_quote_in_header() -> None:
    """csv-dialect: the header is the first non-blank line; a broken header is a file error."""
    assert items("\n\ntext\nhi\n", "a.csv") == [Line(4, "hi")]
    with pytest.raises(InputError) as info:
        parse(b'\nid,"text\n1,x\n', "a.csv", LIMITS)
    assert info.value.line == 2


def test_wrong_field_count_is_a_row_error() -> None:
    """csv-dialect: too many or too few fields fail that row alone, naming its line."""
    out = items("id,text\n1,a,b\n2\n3,ok\n", "a.csv")
    assert [type(i) for i in out] == [LineError, LineError, Line]
    assert [i.number for i in out] == [2, 3, 4]
    assert "expected 2 fields (id, text) but found 3" in out[0].message
    assert "found 1" in out[1].message


def test_blank_rows_skipped_empty_text_fails() -> None:
    """csv-dialect: blank and all-empty rows are skipped; a row with an id but no text fails."""
    out = items('id,text\n\n,\n "",""\n7,   \n8,ok\n', "a.csv")
    assert len(out) == 2
    assert isinstance(out[0], LineError) and out[0].number == 5 and out[0].id == "7"
    assert out[0].message == "empty text"
    assert out[1] == Line(6, "ok", id="8")


def test_spaces_before_quotes_allowed() -> None:
    """csv-dialect: `1, "a, b"` reads the quoted field (space after the delimiter skipped)."""
    assert items('id,text\n1, "a, b"\n', "a.csv") == [Line(2, "a, b", id="1")]


def test_text_after_closing_quote_is_a_row_error() -> None:
    """csv-dialect: `"a"b` fails its row; the next row is read normally."""
    out = items('id,text\n1,"a"b\n2,c\n', "a.csv")
    assert isinstance(out[0], LineError) and out[0].number == 2
    assert "closing quote" in out[0].message
    assert out[1] == Line(3, "c", id="2")


def test_duplicate_ids_are_yielded_and_collide_by_name_key() -> None:
    """csv-dialect and unicode-and-case-twins: duplicate ids both come out; their stems collide
    under name_key."""
    out = items("id,text\nA,one\na,two\ncafe\u0301,x\ncafé,y\n", "a.csv")
    ids = [i.id for i in out if isinstance(i, Line)]
    assert ids == ["A", "a", "café", "café"]
    keys = [name_key(safe_stem(i, n, 4)) for n, i in enumerate(ids)]
    assert keys[0] == keys[1] and keys[2] == keys[3]


def test_id_stripped_nfc_and_control_characters_rejected() -> None:
    """Ids are stripped and NFC; an id with a control character or NUL fails its row."""
    out = items('id,text\n  cafe\u0301 ,x\n"a\tb",y\n"a\x01b",z\n"\x1fq",w\n', "a.csv")
    assert out[0] == Line(2, "x", id="café")
    for error in out[1:]:
        assert isinstance(error, LineError)
        assert "id contains a control character" in error.message
        assert error.id is not None and "\x00" not in error.id and "\t" not in error.id


def test_id_with_nul_past_the_binary_probe_fails_its_row() -> None:
    """A NUL in an id (past the first 8000 bytes, so not a binary file) fails its row."""
    data = "id,text\n" + "".join(f"{i},padding row\n" for i in range(1000)) + "n\x00l,x\n"
    error = items(data, "a.csv")[-1]
    assert isinstance(error, LineError) and error.number == 1002
    assert "control character" in error.message and error.id == "n\\x00l"


def test_csv_text_control_character_fails_row_with_id() -> None:
    """A control character in a CSV text fails the row; the error carries the id."""
    error = only_error("id,text\nq7,ring\x07ring\n")
    assert (error.number, error.id) == (2, "q7")
    assert "U+0007" in error.message


# --- per-line voice, speaker, speed ----------------------------------------------------------


@pytest.mark.parametrize("voice", ["../x", "..", "a..b", "/etc/passwd", "-x", ".hidden",
                                   "a b", "x" * 101, "voice\x07", "ünï"])
def test_bad_voice_is_a_row_error(voice: str) -> None:
    """bad-voice-or-speed: a voice must look like a voice name (no path, no '..'); else a row
    error."""
    out = io.StringIO()
    csv.writer(out).writerows([["id", "text", "voice"], ["v1", "hello", voice]])
    error = only_error(out.getvalue())
    assert "voice" in error.message and error.id == "v1" and error.text == "hello"


@pytest.mark.parametrize("voice", ["en_US-joe-medium", "x", "A1.b-c_d", "x" * 100])
def test_good_voice_accepted(voice: str) -> None:
    """bad-voice-or-speed: plausible voice names pass (the daemon checks the known list later)."""
    assert items(f"text,voice\nhi, {voice} \n", "a.csv") == [Line(2, "hi", voice=voice)]


@pytest.mark.parametrize("speed", ["nan", "NaN", "inf", "-inf", "-1", "0", "1e308", "1e999",
                                   "0.09", "10.01", "fast", "1_0", "0x1", "１", "1.5.2", "1,5,0"])
def test_bad_speed_is_a_row_error(speed: str) -> None:
    """bad-voice-or-speed: speed must be a finite number within [0.1, 10]; nan/inf/-1/1e308 fail."""
    error = only_error(f'text,speed\nhi,"{speed}"\n')
    assert "not a finite number between 0.1 and 10" in error.message
    assert error.text == "hi"


@pytest.mark.parametrize("speed,value", [("1", 1.0), (" 1.5 ", 1.5), ("0.1", 0.1), ("10", 10.0),
                                         ("1e0", 1.0), (".5", 0.5), ("+2.", 2.0), ("", None),
                                         ("1,25", 1.25)])
def test_good_speed(speed: str, value: float | None) -> None:
    """bad-voice-or-speed: good speeds parse (a decimal comma too); an empty one means the
    default."""
    assert items(f'text,speed\nhi,"{speed}"\n', "a.csv") == [Line(2, "hi", speed=value)]


def test_speed_limits_follow_parse_limits() -> None:
    """bad-voice-or-speed: the speed range comes from ParseLimits."""
    limits = ParseLimits(min_speed=0.5, max_speed=2)
    out = list(parse(b"text,speed\na,0.4\nb,2\n", "a.csv", limits))
    assert isinstance(out[0], LineError) and "between 0.5 and 2" in out[0].message
    assert out[1] == Line(3, "b", speed=2.0)


def test_speaker_name_or_number() -> None:
    """Speaker: empty → None; a name or number up to 100 characters; longer fails."""
    out = items(f"text,speaker\na,\nb, 12 \nc,Anna\nd,{'s' * 101}\n", "a.csv")
    assert [getattr(i, "speaker", None) for i in out[:3]] == [None, "12", "Anna"]
    assert isinstance(out[3], LineError) and "speaker" in out[3].message


def test_several_problems_in_one_row_are_reported_together() -> None:
    """One LineError per row lists every problem of that row."""
    error = only_error("id,text,voice,speed\nz9,hi,../v,nan\n")
    assert "voice" in error.message and "speed" in error.message


# --- huge fields and unclosed quotes (huge-line-or-open-quote) ----------------------------


def test_huge_csv_field_is_a_row_error() -> None:
    """huge-line-or-open-quote: a 1 MB field fails its row; field_size_limit is left as it was."""
    before = csv.field_size_limit()
    data = b"id,text\n1,ok\n2," + b"y" * 1_000_000 + b'\n3,"' + b"z" * 1_000_000 + b'"\n4,end\n'
    out = items(data, "a.csv")
    assert [type(i) for i in out] == [Line, LineError, LineError, Line]
    assert [i.number for i in out] == [2, 3, 4, 5]
    assert csv.field_size_limit() == before


def test_field_size_limit_never_raised_to_maxsize(monkeypatch: pytest.MonkeyPatch) -> None:
    """huge-line-or-open-quote: field_size_limit is set to max_record_chars per record and
    restored."""
    seen: list[int] = []
    real = csv.field_size_limit

    def spy(*args: int) -> int:
        seen.extend(args)
        return real(*args)

    monkeypatch.setattr(csv_input_module.csv, "field_size_limit", spy)
    before = real()
    parsed = parse(b"text\na\nb\nc\n", "a.csv", LIMITS)
    iterator = iter(parsed)
    next(iterator)
    assert real() == before  # restored even while the iteration is suspended
    list(iterator)
    assert real() == before
    assert LIMITS.max_record_chars in seen
    assert max(seen) < sys.maxsize
    assert set(seen) <= {LIMITS.max_record_chars, before}


def test_unclosed_quote_then_10k_rows() -> None:
    """huge-line-or-open-quote: `"abc` then 10k rows: one error naming line 2, then every row is
    read."""
    rows = "".join(f"{i},row {i}\n" for i in range(10_000))
    out = items(f'id,text\n1,"abc\n{rows}', "a.csv")
    assert isinstance(out[0], LineError) and out[0].number == 2
    assert "unclosed quote" in out[0].message and "line 2" in out[0].message
    assert len(out) == 10_001
    assert all(isinstance(i, Line) for i in out[1:])
    assert [i.number for i in out[1:]] == list(range(3, 10_003))
    assert out[-1] == Line(10_002, "row 9999", id="9999")


def test_unclosed_quote_at_end_of_small_file() -> None:
    """huge-line-or-open-quote: an unclosed quote that reaches the end of the file fails its row
    only."""
    out = items('id,text\n1,"abc\n2,x\n3,y\n', "a.csv")
    assert [type(i) for i in out] == [LineError, Line, Line]
    assert out[0].number == 2 and "never closed" in out[0].message
    assert out[1:] == [Line(3, "x", id="2"), Line(4, "y", id="3")]
    last = items('id,text\n1,ok\n2,"abc', "a.csv")
    assert last[0] == Line(2, "ok", id="1")
    assert isinstance(last[1], LineError) and last[1].number == 3 and len(last) == 2


def test_two_stray_quotes_cost_two_rows() -> None:
    """huge-line-or-open-quote: a stray quote closed by another stray quote: only those two rows
    fail."""
    out = items('id,text\n1,"abc\n2,def\n3,"ghi\n4,jkl\n', "a.csv")
    assert [(type(i).__name__, i.number) for i in out] == [
        ("LineError", 2), ("Line", 3), ("LineError", 4), ("Line", 5)]
    assert "stray quote" in out[0].message


def test_long_quoted_field_that_closes_resumes_after_it() -> None:
    """huge-line-or-open-quote: a well-formed but too long multi-line field fails once; parsing
    resumes after."""
    limits = ParseLimits(max_line_chars=100)
    body = "\n".join(["word, " * 30] * 20)  # 20 lines of 180 chars: > max_record_chars
    data = f'id,text\n1,"{body}"\n2,next\n'.encode()
    out = list(parse(data, "a.csv", limits))
    assert [type(i) for i in out] == [LineError, Line]
    assert out[0].number == 2 and "line 2 to line 21" in out[0].message
    assert out[1] == Line(22, "next", id="2")


def test_blank_huge_line_is_skipped() -> None:
    """huge-line-or-open-quote: a huge line of spaces is a blank row, skipped silently."""
    assert items(b"text\n" + b" " * 100_000 + b"\nhi\n", "a.csv") == [Line(3, "hi")]


def test_many_stray_quotes_stay_fast() -> None:
    """huge-line-or-open-quote: thousands of stray quotes finish (no re-read blow-up); each fails
    its row."""
    rows = "".join(f'{i},"x\n{i},plain {i}\n' for i in range(3000))
    out = items("id,text\n" + rows, "a.csv")
    numbers = [i.number for i in out]
    assert numbers == sorted(set(numbers))
    assert sum(isinstance(i, Line) for i in out) >= 3000


# --- property tests ----------------------------------------------------------------------------

_TOKENS = [b'"', b'""', b",", b";", b"\t", b"|", b"\n", b"\r", b"\r\n", b" ", b"a", b"b c",
           b"id", b"text", b"speed", b"voice", b"speaker", b"1e308", b"nan", b"1.5", b"../v",
           b"\x00", b"\x07", b"\xff", b"\xc3\xa9", b"\xef\xbb\xbf", b"\xff\xfe", b"x" * 700]
_TOKEN_BYTES = st.lists(st.sampled_from(_TOKENS), max_size=80).map(b"".join)
_HEADERS = st.sampled_from([b"id,text\n", b"text\n", b"id;text;speed;voice;speaker\n",
                            b'"text","id"\n', b"TEXT|Voice\n"])
_ANY_INPUT = st.one_of(st.binary(max_size=3000), _TOKEN_BYTES,
                       st.builds(lambda h, b: h + b, _HEADERS, _TOKEN_BYTES))
_SMALL = ParseLimits(max_line_chars=40, max_lines=500)


def _check_records(parsed: ParsedInput, limits: ParseLimits) -> None:
    out = list(parsed)
    last = 0
    for item in out:
        assert type(item) in (Line, LineError)
        assert 1 <= item.number <= parsed.total_lines
        assert item.number > last  # each line at most once, in order
        last = item.number
        if isinstance(item, Line):
            assert item.text and item.text == item.text.strip()
            assert len(item.text) <= limits.max_line_chars
            assert not text_module.ANY_CONTROL.search(item.text)
            for value in (item.id, item.voice, item.speaker):
                assert value is None or not text_module.ANY_CONTROL.search(value)
            if item.speed is not None:
                assert limits.min_speed <= item.speed <= limits.max_speed
        else:
            assert item.message
    if parsed.note is not None:
        assert out == []
    if parsed.kind == "txt" and parsed.note is None:
        assert out
    assert list(parsed) == out


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=_ANY_INPUT, name=st.sampled_from(["f.txt", "f.csv"]),
       limits=st.sampled_from([LIMITS, _SMALL]))
def test_property_parse_yields_records_or_raises_input_error(
        data: bytes, name: str, limits: ParseLimits) -> None:
    """huge-line-or-open-quote, binary-file, bom-and-utf16, bad-encoding, line-endings, empty-file
    and csv-dialect: any bytes give Line/LineError records in line order, or InputError."""
    before = csv.field_size_limit()
    try:
        parsed = parse(data, name, limits)
    except InputError as exc:
        assert exc.file == name and exc.message
        return
    _check_records(parsed, limits)
    if b"\xef\xbf\xbd" not in data and not data.startswith((b"\xff\xfe", b"\xfe\xff",
                                                             b"\x00\x00\xfe\xff")):
        assert not any("\ufffd" in (i.text or "") for i in parsed)  # never substituted
    assert csv.field_size_limit() == before


_WORDS = st.text(st.characters(exclude_categories=("Cs", "Cc", "Z"),
                               exclude_characters="\ufeff"), min_size=1, max_size=6)
_SPACES = st.text(st.sampled_from(" \t\u00a0\u2003\u3000"), min_size=1, max_size=3)
_LINE = st.one_of(
    st.text(st.sampled_from(" \t"), max_size=3),  # blank
    st.tuples(st.lists(st.tuples(_WORDS, _SPACES), min_size=1, max_size=5),
              st.text(st.sampled_from(" \t"), max_size=2)),
)


def _render(line: str | tuple) -> tuple[str, str]:
    """(raw line, expected text) for a generated line."""
    if isinstance(line, str):
        return line, ""
    words, lead = line
    raw = lead + "".join(w + s for w, s in words)
    return raw, " ".join(unicodedata.normalize("NFC", w) for w, _ in words)


_ENCODERS = {
    "utf-8": lambda s: s.encode("utf-8"),
    "utf-8-sig": lambda s: s.encode("utf-8-sig"),
    "utf-16": lambda s: s.encode("utf-16"),
    "utf-16-be": lambda s: codecs.BOM_UTF16_BE + s.encode("utf-16-be"),
    "utf-32": lambda s: s.encode("utf-32"),
}


@settings(max_examples=300, deadline=2000)
@given(lines=st.lists(_LINE, max_size=20), encoding=st.sampled_from(sorted(_ENCODERS)),
       newline=st.sampled_from(["\n", "\r\n", "\r"]), final=st.booleans())
def test_property_txt_round_trips_in_every_encoding(
        lines: list, encoding: str, newline: str, final: bool) -> None:
    """bom-and-utf16 and line-endings: text in UTF-8/UTF-8-sig/UTF-16/32 round-trips its non-empty
    lines."""
    rendered = [_render(line) for line in lines]
    text = newline.join(raw for raw, _ in rendered) + (newline if final and lines else "")
    parsed = parse(_ENCODERS[encoding](text), "f.txt", LIMITS)
    expected = [(n, want) for n, (_, want) in enumerate(rendered, 1) if want]
    assert [(i.number, i.text) for i in parsed] == expected
    if expected:
        assert parsed.note is None


_IDS = st.text(st.characters(exclude_categories=("Cs", "Cc", "Z"), exclude_characters="\ufeff"),
               max_size=10)
_CSV_TEXT = st.lists(st.one_of(_WORDS, st.sampled_from(['"', ",", ";", '""', "'"])),
                     min_size=1, max_size=6).map(" ".join)


@settings(max_examples=200, deadline=2000)
@given(rows=st.lists(st.tuples(_IDS, _CSV_TEXT), max_size=15),
       encoding=st.sampled_from(sorted(_ENCODERS)))
def test_property_csv_written_by_csv_module_round_trips(rows: list, encoding: str) -> None:
    """csv-dialect: whatever csv.writer writes (quotes, commas) parses back to the same rows."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "text"])
    writer.writerows(rows)
    parsed = parse(_ENCODERS[encoding](out.getvalue()), "f.csv", LIMITS)
    expected = [Line(n, normalize_text(text), id=unicodedata.normalize("NFC", ident) or None)
                for n, (ident, text) in enumerate(rows, 2)]
    assert list(parsed) == expected


def test_parse_speed_100k_lines() -> None:
    """one-big-file: 100,000 lines parse in one pass (timing printed, not asserted)."""
    data = "".join(f"{i},Sentence number {i}, with some words.\n" for i in range(100_000))
    for name, body in (("a.txt", data), ("a.csv", "id,text\n" + data.replace(", with", " with"))):
        t0 = os.times().elapsed
        count = sum(1 for _ in parse(body.encode(), name, LIMITS))
        elapsed = os.times().elapsed - t0
        assert count == 100_000
        print(f"{name}: 100k lines in {elapsed:.2f} s")
