"""Tests of ttsd.ingest.names: safe output stems, duplicate keys, containment, CSV cells
(docs/reliability.md: formula-cells, unsafe-id, id-collision, long-name and
unicode-and-case-twins)."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttsd.ingest.names import MAX_STEM_BYTES, csv_cell, inside, name_key, safe_stem

_SAFE = re.compile(r"[A-Za-z0-9._-]+")
_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(\..*)?", re.IGNORECASE)


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def assert_safe(stem: str, base: Path) -> None:
    """The invariants every stem keeps, checked against a real folder."""
    assert stem not in ("", ".", "..")
    assert _SAFE.fullmatch(stem), stem
    assert not stem.startswith((".", "-"))
    assert not _RESERVED.fullmatch(stem)
    assert len(stem.encode("utf-8")) <= MAX_STEM_BYTES
    assert len((stem + ".wav").encode("utf-8")) <= 255
    target = base / (stem + ".wav")
    assert target.parent == base
    assert inside(base, target)


def test_number_stems_are_zero_padded() -> None:
    """A line without id is named by its number, zero-padded to the given width."""
    assert safe_stem(None, 7, 4) == "0007"
    assert safe_stem(None, 12345, 6) == "012345"
    assert safe_stem(None, 123456, 4) == "123456"
    with pytest.raises(ValueError):
        safe_stem(None, -1, 4)


@pytest.mark.parametrize("raw", ["intro", "chapter-01.part_2", "A", "0001", "x.y.z", "a-b_c"])
def test_plain_ids_are_kept(raw: str) -> None:
    """An id that needs no change is its own stem (no hash)."""
    assert safe_stem(raw, 1, 4) == raw


@pytest.mark.parametrize("raw", ["../../etc/passwd", "/abs", "a/b", "..", ".", "a\x00b", "-rf",
                                 "CON", "con.txt", "Lpt9", "nul.tar.gz", "trailing.", "a\\b",
                                 ".hidden", "...", "--", "C:\\Windows\\system32", "a\nb",
                                 " spaced ", "~/x", "$(rm -rf)", "%2e%2e%2f"])
def test_traversal_and_reserved_ids_stay_inside(raw: str, tmp_path: Path) -> None:
    """unsafe-id: traversal, absolute, NUL, option-like and reserved ids give safe stems."""
    stem = safe_stem(raw, 1, 4)
    assert_safe(stem, tmp_path)
    assert stem != raw


def test_reserved_names_get_a_prefix() -> None:
    """unsafe-id: Windows device names get a "_" prefix (with or without an extension)."""
    assert safe_stem("CON", 1, 4).startswith("_CON-")
    assert safe_stem("com1.wav", 1, 4).startswith("_com1.wav-")
    assert safe_stem("CONSOLE", 1, 4) == "CONSOLE"
    assert safe_stem("COM10", 1, 4) == "COM10"


def test_leading_dots_and_dashes_stripped() -> None:
    """unsafe-id: no hidden files or option-like names: leading '.' and '-' go."""
    assert safe_stem("-rf", 1, 4) == "rf-" + _sha("-rf")[:8]
    assert safe_stem("..a..", 1, 4) == "a-" + _sha("..a..")[:8]
    assert safe_stem("../../etc/passwd", 1, 4) == "_._etc_passwd-" + _sha("../../etc/passwd")[:8]


def test_inside_rejects_escapes(tmp_path: Path) -> None:
    """unsafe-id: inside() resolves '..' and symlinks; the base itself is not inside."""
    base = tmp_path / "outbox"
    base.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", base / "link")
    os.symlink(base / "loop", base / "loop")
    assert inside(base, base / "a.wav")
    assert inside(base, base / "sub" / "deeper" / "a.wav")
    assert not inside(base, base / ".." / "a.wav")
    assert not inside(base, base / "link" / "a.wav")
    assert not inside(base, base)
    assert not inside(base, Path("/etc/passwd"))
    assert not inside(base, base / "loop" / "x")


def test_empty_after_sanitizing_uses_hash() -> None:
    """id-collision: ids with nothing usable ("中文", "..", "/") get id-<sha256[:12]>."""
    for raw in ("中文", "..", "/", "", "___", "...---", "😀"):
        nfc = unicodedata.normalize("NFC", raw)
        assert safe_stem(raw, 1, 4) == "id-" + _sha(nfc)[:12]
    assert safe_stem("中文", 1, 4) != safe_stem("日本", 1, 4)


def test_ids_differing_in_disallowed_chars_differ() -> None:
    """id-collision: "a?" and "a*" never share a stem; neither equals the literal "a_"."""
    stems = {safe_stem(raw, 1, 4) for raw in ("a?", "a*", "a/", "a_", "a", "a??")}
    assert len(stems) == 6
    assert safe_stem("a?", 1, 4) == "a_-" + _sha("a?")[:8]


def test_long_ids_truncated_with_hash() -> None:
    """long-name: a 300-char id and 86×'–' (258 bytes) fit ≤ 255 bytes with a hash."""
    long_ascii = "x" * 300
    stem = safe_stem(long_ascii, 1, 4)
    assert len(stem) == MAX_STEM_BYTES
    assert stem.endswith("-" + _sha(long_ascii)[:8])
    assert safe_stem("x" * 301, 1, 4) != stem
    dashes = "–" * 86
    assert len(dashes.encode()) == 258
    assert len(safe_stem(dashes, 1, 4).encode()) <= 255
    mixed = "ab–" * 100
    assert len(safe_stem(mixed, 1, 4)) <= MAX_STEM_BYTES
    assert safe_stem("y" * MAX_STEM_BYTES, 1, 4) == "y" * MAX_STEM_BYTES


def test_nfc_first_then_case_fold_for_duplicates() -> None:
    """unicode-and-case-twins: NFC and NFD "café" share a stem; "A" and "a" collide under
    name_key."""
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert safe_stem(nfc, 1, 4) == safe_stem(nfd, 2, 4)
    assert safe_stem("A", 1, 4) != safe_stem("a", 1, 4)
    assert name_key(safe_stem("A", 1, 4)) == name_key(safe_stem("a", 1, 4))
    assert name_key("Straße") == name_key("STRASSE")
    assert name_key("x1") != name_key("x2")


@pytest.mark.parametrize("value,cell", [
    ("=HYPERLINK(\"http://x\",\"y\")", "'=HYPERLINK(\"http://x\",\"y\")"),
    ("@SUM(A1)", "'@SUM(A1)"), ("+1", "'+1"), ("-1", "'-1"), ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"), ("plain", "plain"), (" =1", " =1"), ("", ""), ("a=b", "a=b"),
    (-1, "-1"), (2.5, "2.5"), (-0.5, "-0.5"), (None, ""), (True, "True"),
    (Path("=x"), "'=x"),
])
def test_csv_cell_guards_formulas(value: object, cell: str) -> None:
    """formula-cells: cells starting with = + - @ TAB CR get a leading quote; numbers do not."""
    assert csv_cell(value) == cell


_ANY_TEXT = st.text(max_size=300)
_DISALLOWED = st.characters(exclude_characters="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop"
                                               "qrstuvwxyz0123456789._-")


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.none(), _ANY_TEXT, st.text(st.sampled_from("./\\\x00-_. a中–"),
                                                     max_size=300)),
       number=st.integers(0, 10**7), width=st.integers(1, 8))
def test_property_safe_stem_never_escapes(raw: str | None, number: int, width: int,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """unsafe-id, id-collision and long-name: any id gives a non-empty stem without separators, ≤
    255 bytes, inside."""
    base = tmp_path_factory.getbasetemp() / "outbox"
    stem = safe_stem(raw, number, width)
    assert_safe(stem, base)
    assert safe_stem(raw, number, width) == stem  # deterministic


@settings(max_examples=300, deadline=None)
@given(prefix=st.text(max_size=20), suffix=st.text(max_size=20),
       pair=st.lists(_DISALLOWED, min_size=2, max_size=2, unique=True))
def test_property_ids_differing_only_in_disallowed_chars_differ(
        prefix: str, suffix: str, pair: list[str]) -> None:
    """id-collision: two ids that differ only in a disallowed character map to different stems."""
    first, second = (unicodedata.normalize("NFC", prefix + c + suffix) for c in pair)
    if first != second:
        assert safe_stem(first, 1, 4) != safe_stem(second, 1, 4)


@settings(max_examples=300, deadline=None)
@given(a=_ANY_TEXT, b=_ANY_TEXT)
def test_property_distinct_nfc_ids_get_distinct_stems(a: str, b: str) -> None:
    """id-collision and unicode-and-case-twins: ids that differ after NFC never share a stem (NFC
    twins always do)."""
    if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b):
        assert safe_stem(a, 1, 4) == safe_stem(b, 1, 4)
    else:
        assert safe_stem(a, 1, 4) != safe_stem(b, 1, 4)
