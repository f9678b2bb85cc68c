"""SSML say-as: each interpretation's words, its refusals, and letter names that espeak-ng
reads as the letters themselves."""

from __future__ import annotations

import re

import pytest

from ttsd.markup.sayas import AM, INTERPRETATIONS, LETTER_NAMES, PM, SayAsError, say_as


@pytest.mark.parametrize(("text", "kind", "want"), [
    ("WHO", "characters", "dubbleyu aitch oh"),
    ("who", "spell-out", "dubbleyu aitch oh"),
    ("A B", "characters", "eh bee"),
    ("R2-D2", "characters", "ar two dash dee two"),
    ("a.b@c_d/e+f#g&h", "spell-out", ("eh dot bee at see underscore dee slash ee plus ef hash "
                                      "gee and aitch")),
    ("  x y z  ", "characters", "ex why zee"),
    ("0123456789", "characters", "zero one two three four five six seven eight nine"),
])
def test_characters(text, kind, want):
    assert say_as(text, kind) == want


def test_every_letter_has_a_name():
    assert say_as("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "characters").split() == list(
        LETTER_NAMES.values())


@pytest.mark.parametrize(("text", "want"), [
    ("0", "zero"),
    ("7", "seven"),
    ("13", "thirteen"),
    ("40", "forty"),
    ("99", "ninety-nine"),
    ("100", "one hundred"),
    ("101", "one hundred one"),
    ("1234", "one thousand two hundred thirty-four"),
    ("1,234", "one thousand two hundred thirty-four"),
    ("-5", "minus five"),
    ("+5", "plus five"),
    ("3.14", "three point one four"),
    ("-0.05", "minus zero point zero five"),
    ("1,000,000", "one million"),
    ("2000000001", "two billion one"),
    ("1000010", "one million ten"),
    ("999,999,999,999,999", ("nine hundred ninety-nine trillion nine hundred ninety-nine billion "
                             "nine hundred ninety-nine million nine hundred ninety-nine thousand "
                             "nine hundred ninety-nine")),
    ("  42 ", "forty-two"),
])
def test_cardinal(text, want):
    assert say_as(text, "cardinal") == want


def test_cardinals_are_plain_words_and_distinct():
    seen: dict[str, int] = {}
    for n in range(2000):
        words = say_as(str(n), "cardinal")
        assert re.fullmatch(r"[a-z -]+", words), (n, words)
        assert words not in seen, (n, seen.get(words), words)
        seen[words] = n


@pytest.mark.parametrize(("text", "want"), [
    ("0", "zeroth"),
    ("1", "first"),
    ("2", "second"),
    ("3", "third"),
    ("4", "fourth"),
    ("5", "fifth"),
    ("8", "eighth"),
    ("9", "ninth"),
    ("11", "eleventh"),
    ("12", "twelfth"),
    ("13", "thirteenth"),
    ("20", "twentieth"),
    ("21", "twenty-first"),
    ("42", "forty-second"),
    ("100", "one hundredth"),
    ("103", "one hundred third"),
    ("1000", "one thousandth"),
    ("1st", "first"),
    ("2nd", "second"),
    ("3rd", "third"),
    ("4th", "fourth"),
    ("11th", "eleventh"),
    ("22ND", "twenty-second"),
    ("1,001st", "one thousand first"),
])
def test_ordinal(text, want):
    assert say_as(text, "ordinal") == want


@pytest.mark.parametrize(("text", "want"), [
    ("1234", "one two three four"),
    ("0", "zero"),
    ("007", "zero zero seven"),
    ("12 34", "one two three four"),
])
def test_digits(text, want):
    assert say_as(text, "digits") == want


@pytest.mark.parametrize(("text", "fmt", "want"), [
    ("2024-03-05", "", "March fifth, twenty twenty-four"),
    ("2024-03-05", "ymd", "March fifth, twenty twenty-four"),
    ("03/05/2024", "mdy", "March fifth, twenty twenty-four"),
    ("05.03.2024", "dmy", "March fifth, twenty twenty-four"),
    ("5 March 2024", "dmy", "March fifth, twenty twenty-four"),
    ("Mar 5th 2024", "mdy", "March fifth, twenty twenty-four"),
    ("sept. 21, 1999", "mdy", "September twenty-first, nineteen ninety-nine"),
    ("2000-01-01", "", "January first, two thousand"),
    ("2005-12-31", "", "December thirty-first, two thousand five"),
    ("1905-07-04", "", "July fourth, nineteen oh five"),
    ("1900-02-28", "", "February twenty-eighth, nineteen hundred"),
    ("2024-02-29", "", "February twenty-ninth, twenty twenty-four"),
    ("2000-02-29", "", "February twenty-ninth, two thousand"),
    ("12/25", "md", "December twenty-fifth"),
    ("25/12", "dm", "December twenty-fifth"),
    ("02/29", "md", "February twenty-ninth"),
    ("03/2024", "my", "March twenty twenty-four"),
    ("2024-03", "ym", "March twenty twenty-four"),
    ("5", "d", "the fifth"),
    ("3", "m", "March"),
    ("march", "m", "March"),
    ("2024", "y", "twenty twenty-four"),
    ("1999", "y", "nineteen ninety-nine"),
    ("2010", "y", "twenty ten"),
    ("1066", "Y", "ten sixty-six"),
])
def test_date(text, fmt, want):
    assert say_as(text, "date", fmt) == want


@pytest.mark.parametrize(("text", "want"), [
    ("14:30", f"two thirty {PM}"),
    ("09:05", f"nine oh five {AM}"),
    ("12:00", "twelve noon"),
    ("00:00", "twelve midnight"),
    ("7:00", f"seven o'clock {AM}"),
    ("14:30:15", f"two thirty and fifteen seconds {PM}"),
    ("14:30:01", f"two thirty and one second {PM}"),
    ("14:30:00", f"two thirty {PM}"),
    ("12:15", f"twelve fifteen {PM}"),
    ("00:45", f"twelve forty-five {AM}"),
    ("23:59", f"eleven fifty-nine {PM}"),
    ("7:15pm", f"seven fifteen {PM}"),
    ("7:15 PM", f"seven fifteen {PM}"),
    ("7:15 a.m.", f"seven fifteen {AM}"),
    ("12:00 am", "twelve midnight"),
    ("12:00 pm", "twelve noon"),
    ("12:30 am", f"twelve thirty {AM}"),
    ("7pm", f"seven o'clock {PM}"),
])
def test_time(text, want):
    assert say_as(text, "time") == want


def test_am_pm_are_letter_names():
    names = set(LETTER_NAMES.values())
    assert set(AM.split()) <= names and set(PM.split()) <= names


@pytest.mark.parametrize(("text", "want"), [
    ("+1 (555) 123-4567", "plus one, five five five, one two three, four five six seven"),
    ("555-0100", "five five five, zero one zero zero"),
    ("555.123.4567", "five five five, one two three, four five six seven"),
    ("(02) 9876 5432", "zero two, nine eight seven six, five four three two"),
    ("+44 20 7946 0958", "plus four four, two zero, seven nine four six, zero nine five eight"),
    ("911", "nine one one"),
])
def test_telephone(text, want):
    assert say_as(text, "telephone") == want


@pytest.mark.parametrize(("text", "kind", "fmt", "bad"), [
    ("A!", "characters", "", "!"),
    ("café", "spell-out", "", "é"),
    ("twelve", "cardinal", "", "twelve"),
    ("1,23", "cardinal", "", "1,23"),
    ("3.", "cardinal", "", "3."),
    ("1000000000000000", "cardinal", "", "1000000000000000"),
    ("١٢", "cardinal", "", "١٢"),
    ("-1", "ordinal", "", "-1"),
    ("1.5", "ordinal", "", "1.5"),
    ("2st", "ordinal", "", "2st"),
    ("first", "ordinal", "", "first"),
    ("12a4", "digits", "", "12a4"),
    ("12-34", "digits", "", "12-34"),
    ("2023-02-29", "date", "", "2023-02-29"),
    ("1900-02-29", "date", "", "1900-02-29"),
    ("2024-02-30", "date", "", "2024-02-30"),
    ("2024-04-31", "date", "", "2024-04-31"),
    ("2024-13-01", "date", "", "2024-13-01"),
    ("2024-00-10", "date", "", "2024-00-10"),
    ("2024-01-00", "date", "", "2024-01-00"),
    ("2024-03", "date", "", "2024-03"),
    ("03/05/2024", "date", "xyz", "xyz"),
    ("Smarch 5", "date", "md", "Smarch"),
    ("32", "date", "d", "32"),
    ("24:00", "time", "", "24:00"),
    ("12:60", "time", "", "12:60"),
    ("12:30:60", "time", "", "12:30:60"),
    ("13:00 pm", "time", "", "13:00 pm"),
    ("0:30 am", "time", "", "0:30 am"),
    ("noon", "time", "", "noon"),
    ("14", "time", "", "14"),
    ("1-800-FLOWERS", "telephone", "", "1-800-FLOWERS"),
    ("555+1234", "telephone", "", "555+1234"),
    ("+", "telephone", "", "+"),
])
def test_refusals_name_the_value(text, kind, fmt, bad):
    with pytest.raises(SayAsError) as exc:
        say_as(text, kind, fmt)
    assert bad in str(exc.value)


def test_unknown_interpretation_lists_the_known_ones():
    with pytest.raises(SayAsError) as exc:
        say_as("12", "currency")
    assert "currency" in str(exc.value)
    assert all(kind in str(exc.value) for kind in INTERPRETATIONS)


@pytest.mark.parametrize("kind", INTERPRETATIONS)
def test_empty_text_is_refused(kind):
    with pytest.raises(SayAsError):
        say_as("   ", kind)


def test_say_as_error_is_a_value_error():
    assert issubclass(SayAsError, ValueError)


# --------------------------------------------------------------------------- espeak-ng


@pytest.fixture(scope="module")
def phonemizer():
    from ttsd.engine.phonemes import Phonemizer
    from ttsd.engine.voice import discover

    return Phonemizer(discover(None)["en_US-joe-medium"].config)


def _sounds(ph, text: str) -> str:
    """The phonemes of ``text`` without pauses, spaces or sentence punctuation."""
    return "".join(p for s in ph.phonemes(text) for p in s if p not in " .,;:!?")


@pytest.mark.parametrize(("letter", "name"), sorted(LETTER_NAMES.items()))
def test_espeak_reads_each_letter_name_as_the_letter(phonemizer, letter, name):
    assert _sounds(phonemizer, name) == _sounds(phonemizer, f"{letter}.")


def test_espeak_reads_a_spelled_word_letter_by_letter(phonemizer):
    spelled = say_as("WHO", "characters")
    assert _sounds(phonemizer, spelled) == "".join(
        _sounds(phonemizer, f"{c}.") for c in "WHO")
