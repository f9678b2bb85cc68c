"""SSML ``<say-as>`` for English voices: the tagged text rewritten as plain English words.

espeak-ng reads plain words and plain numbers well but guesses at everything else ("WHO" is
a word, "2024-03-05" a subtraction, "14:30" two numbers). ``say_as`` turns the text into the
words the script means, so the phonemizer has nothing left to guess.
"""

from __future__ import annotations

import re

__all__ = ["INTERPRETATIONS", "SayAsError", "say_as"]


class SayAsError(ValueError):
    """Text that cannot be read as asked (the message says why, naming the value)."""


INTERPRETATIONS = ("characters", "spell-out", "cardinal", "ordinal", "digits", "date", "time",
                   "telephone")

# Letter names spelled so that espeak-ng says the letter and nothing else: each one
# phonemizes exactly like the capital letter alone ("A." and "eh" give the same phonemes;
# "ay", "eff", "el", "you" and "double-u" do not, so they are not used).
LETTER_NAMES = dict(zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", (
    "eh", "bee", "see", "dee", "ee", "ef", "gee", "aitch", "eye", "jay", "kay", "ell", "em",
    "en", "oh", "pee", "cue", "ar", "ess", "tee", "yoo", "vee", "dubbleyu", "ex", "why", "zee",
), strict=True))

SYMBOL_NAMES = {"-": "dash", ".": "dot", "@": "at", "_": "underscore", "/": "slash",
                "+": "plus", "#": "hash", "&": "and"}

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ("", "thousand", "million", "billion", "trillion")
LIMIT = 10 ** 15
"""Cardinals and ordinals must be below this (the largest scale named is trillions)."""

_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_SUFFIXES = {1: "st", 2: "nd", 3: "rd"}

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
DATE_FORMATS = ("mdy", "dmy", "ymd", "md", "dm", "ym", "my", "d", "m", "y")

# Letter names, as espeak-ng says "a m" as "uh em".
AM, PM = "eh em", "pee em"

_DIGITS = frozenset("0123456789")
_NUMBER = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?", re.ASCII)
_ORDINAL = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+)(st|nd|rd|th)?", re.IGNORECASE | re.ASCII)
_TIME = re.compile(r"(\d{1,2})(?::(\d{2})(?::(\d{2}))?)?\s*(?:([ap])\.?\s*m\.?)?",
                   re.IGNORECASE | re.ASCII)
_DATE_SEP = re.compile(r"[-/.,\s]+")
_DAY = re.compile(r"(\d{1,2})(?:st|nd|rd|th)?", re.IGNORECASE | re.ASCII)
_PHONE_SEP = re.compile(r"[\s\-.()]+")


def _digit_words(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def _below_1000(n: int) -> list[str]:
    """Words for 1..999 ("one hundred twenty-three": no "and", as US English reads it)."""
    words = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(f"{_TENS[tens]}-{_ONES[ones]}" if ones else _TENS[tens])
    elif rest:
        words.append(_ONES[rest])
    return words


def number_words(n: int) -> str:
    """A non-negative integer below ``LIMIT`` as English words."""
    if n == 0:
        return "zero"
    words: list[str] = []
    for power in range(len(_SCALES) - 1, -1, -1):
        chunk = n // 1000 ** power % 1000
        if chunk:
            words += _below_1000(chunk) + ([_SCALES[power]] if power else [])
    return " ".join(words)


def ordinal_words(n: int) -> str:
    """A non-negative integer below ``LIMIT`` as an English ordinal ("twenty-first")."""
    head, sep, last = number_words(n).rpartition(" ")
    stem, hyphen, unit = last.rpartition("-")
    if unit in _ORDINAL_WORDS:
        unit = _ORDINAL_WORDS[unit]
    elif unit.endswith("y"):
        unit = unit[:-1] + "ieth"
    else:
        unit += "th"
    return f"{head}{sep}{stem}{hyphen}{unit}"


def year_words(year: int) -> str:
    """A year as it is said: "nineteen oh five", "nineteen hundred", "two thousand five"."""
    high, low = divmod(year, 100)
    if year < 1000 or (high % 10 == 0 and low < 10):
        return number_words(year)  # 476, 2000, 2005: said as the number
    if low == 0:
        return f"{number_words(high)} hundred"
    if low < 10:
        return f"{number_words(high)} oh {_ONES[low]}"
    return f"{number_words(high)} {number_words(low)}"


def _characters(text: str) -> str:
    words = []
    for ch in text:
        if ch.isspace():
            continue
        if ch in _DIGITS:
            words.append(_ONES[int(ch)])
        elif ch.isascii() and ch.upper() in LETTER_NAMES:
            words.append(LETTER_NAMES[ch.upper()])
        elif ch in SYMBOL_NAMES:
            words.append(SYMBOL_NAMES[ch])
        else:
            raise SayAsError(f"cannot spell out {ch!r} in {text!r}: letters A-Z, digits and "
                             f"{' '.join(SYMBOL_NAMES)} only")
    return " ".join(words)


def _integer(digits: str, text: str) -> int:
    """The value of digits with optional thousands commas, checked against ``LIMIT``."""
    n = int(digits.replace(",", ""))
    if n >= LIMIT:
        raise SayAsError(f"number too large to read: {text!r} (the limit is {LIMIT - 1:,})")
    return n


def _cardinal(text: str) -> str:
    m = _NUMBER.fullmatch(text)
    if m is None:
        raise SayAsError(f"not a number: {text!r}")
    sign, whole, fraction = m.groups()
    words = number_words(_integer(whole, text))
    if fraction:
        words += f" point {_digit_words(fraction)}"
    return {"-": "minus ", "+": "plus "}.get(sign, "") + words


def _ordinal(text: str) -> str:
    m = _ORDINAL.fullmatch(text)
    if m is None:
        raise SayAsError(f"not a whole number of zero or more, as an ordinal: {text!r}")
    n = _integer(m.group(1), text)
    suffix = m.group(2)
    expected = "th" if n % 100 in (11, 12, 13) else _SUFFIXES.get(n % 10, "th")
    if suffix and suffix.lower() != expected:
        raise SayAsError(f"wrong ordinal suffix in {text!r} (expected {expected!r})")
    return ordinal_words(n)


def _digits(text: str) -> str:
    digits = "".join(text.split())
    if not set(digits) <= _DIGITS:
        raise SayAsError(f"not digits: {text!r}")
    return _digit_words(digits)


def _month(field: str, text: str) -> int:
    if field.isascii() and field.isdigit() and 1 <= int(field) <= 12:
        return int(field)
    name = field.lower()
    for i, month in enumerate(MONTHS, 1):
        if len(name) >= 3 and month.lower().startswith(name):
            return i
    raise SayAsError(f"no month {field!r} in date {text!r}")


def _date(text: str, fmt: str) -> str:
    fmt = fmt.strip().lower() or "ymd"
    if fmt not in DATE_FORMATS:
        raise SayAsError(f"unknown date format {fmt!r}; known: {', '.join(DATE_FORMATS)}")
    fields = _DATE_SEP.split(text)
    if len(fields) != len(fmt):
        raise SayAsError(f"date {text!r} does not have the fields of format {fmt!r}")
    parts = dict(zip(fmt, fields, strict=True))
    year = day = None
    if "y" in parts:
        if not (parts["y"].isascii() and parts["y"].isdigit() and 1 <= int(parts["y"]) <= 9999):
            raise SayAsError(f"no year {parts['y']!r} in date {text!r}")
        year = int(parts["y"])
    month = _month(parts["m"], text) if "m" in parts else None
    if "d" in parts:
        m = _DAY.fullmatch(parts["d"])
        day = int(m.group(1)) if m else 0
        most = 31 if month is None else _MONTH_DAYS[month - 1]
        if month == 2 and year is not None and not _leap(year):
            most = 28
        if not 1 <= day <= most:
            raise SayAsError(f"no day {parts['d']!r} in date {text!r}")
    if month is None:
        return f"the {ordinal_words(day)}" if day else year_words(year or 0)
    said = MONTHS[month - 1]
    if day:
        said += f" {ordinal_words(day)}" + (f", {year_words(year)}" if year else "")
    elif year:
        said += f" {year_words(year)}"
    return said


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _time(text: str) -> str:
    m = _TIME.fullmatch(text)
    if m is None or (m.group(2) is None and m.group(4) is None):
        raise SayAsError(f"not a time: {text!r}")
    hour, minute, second = (int(g) if g else 0 for g in m.group(1, 2, 3))
    half = (m.group(4) or "").lower()
    if half and not 1 <= hour <= 12 or hour > 23 or minute > 59 or second > 59:
        raise SayAsError(f"time out of range: {text!r}")
    if half:
        hour = hour % 12 + (12 if half == "p" else 0)
    if minute == second == 0 and hour in (0, 12):
        return "twelve noon" if hour == 12 else "twelve midnight"
    said = number_words(hour % 12 or 12)
    if minute == 0:
        said += " o'clock"
    elif minute < 10:
        said += f" oh {_ONES[minute]}"
    else:
        said += f" {number_words(minute)}"
    if second:
        said += f" and {number_words(second)} second{'s' if second > 1 else ''}"
    return f"{said} {PM if hour >= 12 else AM}"


def _telephone(text: str) -> str:
    plus = text.startswith("+")
    groups = [g for g in _PHONE_SEP.split(text[1:] if plus else text) if g]
    if not groups or any(not set(g) <= _DIGITS for g in groups):
        raise SayAsError(f"not a telephone number: {text!r}")
    said = ", ".join(_digit_words(g) for g in groups)
    return f"plus {said}" if plus else said


def say_as(text: str, interpret_as: str, fmt: str = "") -> str:
    """The words to say for ``text`` read as ``interpret_as`` (``fmt``: the SSML format
    attribute, for dates)."""
    kind = interpret_as.strip().lower()
    if kind not in INTERPRETATIONS:
        raise SayAsError(f"unknown say-as interpret-as {interpret_as!r}; "
                         f"known: {', '.join(INTERPRETATIONS)}")
    text = text.strip()
    if not text:
        raise SayAsError(f"nothing to say as {kind!r}: the text is empty")
    if kind in ("characters", "spell-out"):
        return _characters(text)
    if kind == "date":
        return _date(text, fmt)
    return {"cardinal": _cardinal, "ordinal": _ordinal, "digits": _digits, "time": _time,
            "telephone": _telephone}[kind](text)
