"""SSML in a line → segments the engine says one after another.

A line is markup when the config or its CSV row asks (``input.markup = "ssml"``, a
``markup`` column) or when it starts with ``<speak>``; anything else is text, ``<`` and
all. It is parsed with defusedxml: a DTD, an entity declaration or an external
reference is refused, so a hostile file can neither expand entities nor make ttsd read
another file. What a tag does:

- ``<break time="700ms"/>`` or ``strength="none … x-strong"``: that much silence here;
- ``<prosody rate="slow|x-slow|80%|+20%|1.2">``: the words inside said at that speed;
- ``<phoneme alphabet="ipa" ph="…">``: those phonemes for the words inside (Piper's
  own ``[[ … ]]`` block, which plain text may use as well);
- ``<sub alias="…">``: the alias said for the words inside;
- ``<say-as interpret-as="…">``: ``sayas``;
- ``<p>``, ``<s>``: a paragraph's or a sentence's pause around them.

A segment ends where the speed changes or a pause is asked for; its sentences are
spoken as any line's are. Two segments are joined with no silence unless a pause was
asked for or the first ends a sentence (then the configured sentence silence).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, ParseError

from ttsd.markup.sayas import SayAsError, say_as

if TYPE_CHECKING:
    from ttsd.config import Config

STRENGTHS = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.5, "strong": 0.75,
             "x-strong": 1.25}
"""A ``<break strength>`` in seconds."""
RATES = {"x-slow": 0.5, "slow": 0.75, "medium": 1.0, "default": 1.0, "fast": 1.25,
         "x-fast": 1.5}
"""A ``<prosody rate>`` word as a speed factor."""
MAX_BREAK_S = 10.0
MIN_RATE, MAX_RATE = 0.25, 4.0
MAX_SEGMENTS = 500
"""A line of more segments fails (each one is a sentence of its own for the model)."""
PHONEME_BLOCK = re.compile(r"\[\[\s*(.*?)\s*\]\]", re.DOTALL)
SENTENCE_END = re.compile(r"[.!?;:…]['\"”’)\]]*\s*$")
TAGS = ("speak", "break", "prosody", "phoneme", "sub", "say-as", "p", "s")
ATTRIBUTES = {"speak": {"version", "lang", "xmlns", "{http://www.w3.org/XML/1998/namespace}lang"},
              "break": {"time", "strength"}, "prosody": {"rate"},
              "phoneme": {"alphabet", "ph"}, "sub": {"alias"},
              "say-as": {"interpret-as", "format", "detail"}, "p": set(), "s": set()}


class MarkupError(ValueError):
    """Markup that cannot be said: the message names the tag and, where known, the
    column of the line."""


@dataclass(frozen=True)
class Segment:
    text: str
    """What the phonemizer reads (``[[ … ]]`` blocks for given phonemes)."""
    rate: float = 1.0
    """Speed factor: the line's length scale is divided by it."""
    pause_s: float = 0.0
    """Silence after this segment's last sentence."""


@dataclass(frozen=True)
class Marked:
    segments: tuple[Segment, ...]
    lead_s: float = 0.0
    """Silence before the first segment (a break at the start)."""
    warnings: tuple[str, ...] = ()
    """Unknown tags read as text (``unknown = "read"``)."""


@dataclass(frozen=True)
class MarkupOptions:
    sentence_s: float = 0.2
    """The pause after a sentence (and around ``<s>``): the engine's sentence silence."""
    paragraph_s: float = 0.6
    """The pause around ``<p>``."""
    unknown: str = "fail"
    """An unknown tag or attribute: "fail" the line, or "read" the text inside."""

    def key(self) -> str:
        """What decides an SSML line's audio besides its text and the sentence silence
        (already in every key), as part of its cache key."""
        return f"ssml/paragraph={self.paragraph_s!r}/unknown={self.unknown}"

    @classmethod
    def from_config(cls, cfg: Config) -> MarkupOptions:
        return cls(sentence_s=cfg.engine.sentence_silence_s,
                   paragraph_s=cfg.input.paragraph_pause_s, unknown=cfg.input.markup_unknown)


def is_markup(text: str, asked: bool) -> bool:
    """A line is markup when asked (config, CSV row) or when it starts with ``<speak``."""
    return asked or text.lstrip().startswith("<speak")


def spoken_words(text: str, options: MarkupOptions | None = None) -> str:
    """The words a line of SSML says, as plain text (a phoneme block's phonemes as its
    words), for matching timestamps with words; the text itself if it does not parse."""
    try:
        segments = parse(text, options).segments
    except MarkupError:
        return text
    return PHONEME_BLOCK.sub(lambda m: m.group(1), " ".join(s.text for s in segments))


def parse(text: str, options: MarkupOptions | None = None) -> Marked:
    """The segments of a line of SSML (wrapped in ``<speak>`` when it is not already).
    MarkupError naming the problem and its column."""
    options = options or MarkupOptions()
    wrapped = not text.lstrip().startswith(("<speak", "<?xml", "<!DOCTYPE"))
    source = f"<speak>{text}</speak>" if wrapped else text
    shift = len("<speak>") if wrapped else 0
    builder = _Builder(options, shift)
    parser = DefusedXMLParser(target=builder, forbid_dtd=True, forbid_entities=True,
                              forbid_external=True)
    builder.parser = parser
    try:
        parser.feed(source)
        parser.close()
    except DefusedXmlException as exc:
        raise MarkupError(f"markup may not declare a DTD, entities or external references"
                          f" ({type(exc).__name__})") from None
    except ParseError as exc:
        column = max(1, exc.position[1] + 1 - shift)
        reason = str(exc).split(":")[0]
        raise MarkupError(f"malformed markup at column {column}: {reason}") from None
    return builder.result()


@dataclass
class _Open:
    tag: str
    column: int
    attrs: dict[str, str]
    rate: float
    inner: list[str] = field(default_factory=list)


class _Builder:
    """The parser's target: start/end/data events into segments."""

    def __init__(self, options: MarkupOptions, shift: int) -> None:
        self.options, self.shift = options, shift
        self.parser: DefusedXMLParser | None = None
        self.stack: list[_Open] = []
        self.segments: list[Segment] = []
        self.text: list[str] = []
        self.rate = 1.0
        self.lead = 0.0
        self.structural = 0.0   # the pause structure asks for here (p, s): the largest
        self.breaks = 0.0       # the breaks here: they add up
        self.warnings: list[str] = []

    # ---------------------------------------------------------------- events

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        column = self._column()
        if self.stack and self.stack[-1].tag in ("phoneme", "sub", "say-as"):
            self._fail(f"<{tag}> inside <{self.stack[-1].tag}>", column)
        known = tag in TAGS
        if not known or not set(attrs) <= ATTRIBUTES[tag]:
            what = f"unknown tag <{tag}>" if not known else \
                f"unknown attribute {min(set(attrs) - ATTRIBUTES[tag])!r} of <{tag}>"
            if self.options.unknown != "read":
                self._fail(f"{what} (known: {', '.join(TAGS)})", column)
            self.warnings.append(f"{what} at column {column}: its text is read")
        self.stack.append(_Open(tag, column, attrs, self.rate))
        if not known:
            return
        if tag == "break":
            self._pause(_break_s(attrs, column), explicit=True)
        elif tag == "prosody":
            self._end_segment()
            self.rate = self.rate * _rate(attrs.get("rate", "medium"), column)
            if not MIN_RATE <= self.rate <= MAX_RATE:
                self._fail(f"<prosody> rate {self.rate:g} is outside {MIN_RATE:g}-{MAX_RATE:g}",
                           column)
        elif tag in ("p", "s"):
            self._pause(self.options.paragraph_s if tag == "p" else self.options.sentence_s)
        elif tag == "phoneme":
            if attrs.get("alphabet", "ipa") != "ipa":
                self._fail(f"<phoneme> alphabet {attrs['alphabet']!r}: only \"ipa\"", column)
            ph = attrs.get("ph", "").strip()
            if not ph or "[[" in ph or "]]" in ph:
                self._fail("<phoneme> needs ph=\"…\" (IPA, without [[ or ]])", column)
        elif tag == "sub" and not attrs.get("alias", "").strip():
            self._fail("<sub> needs alias=\"…\"", column)

    def end(self, tag: str) -> None:
        opened = self.stack.pop()
        if opened.tag not in TAGS:
            return
        if tag == "prosody":
            self._end_segment()
            self.rate = opened.rate
        elif tag in ("p", "s"):
            self._pause(self.options.paragraph_s if tag == "p" else self.options.sentence_s)
        elif tag == "phoneme":
            self._say(f" [[ {opened.attrs['ph'].strip()} ]] ")
        elif tag == "sub":
            self._say(f" {opened.attrs['alias'].strip()} ")
        elif tag == "say-as":
            try:
                words = say_as("".join(opened.inner), opened.attrs.get("interpret-as", ""),
                               opened.attrs.get("format", ""))
            except SayAsError as exc:
                self._fail(f"<say-as>: {exc}", opened.column)
            self._say(f" {words} ")

    def data(self, text: str) -> None:
        if self.stack and self.stack[-1].tag in ("phoneme", "sub", "say-as"):
            self.stack[-1].inner.append(text)
        else:
            self._say(text)

    def close(self) -> None:
        return None

    # ---------------------------------------------------------------- segments

    def result(self) -> Marked:
        self._end_segment()
        self.structural = 0.0   # the pause structure asks for ends with the line;
        self._commit_pause()    # a break at the end is kept
        if not self.segments:
            raise MarkupError("nothing to speak: the markup holds no text")
        out = [Segment(seg.text, seg.rate, self.options.sentence_s)
               if not seg.pause_s and i < len(self.segments) - 1
               and SENTENCE_END.search(seg.text) else seg
               for i, seg in enumerate(self.segments)]
        return Marked(tuple(out), self.lead, tuple(self.warnings))

    def _say(self, text: str) -> None:
        if text.strip():
            self._commit_pause()
        self.text.append(text)

    def _pause(self, seconds: float, explicit: bool = False) -> None:
        self._end_segment()
        if explicit:
            self.breaks += seconds
        else:
            self.structural = max(self.structural, seconds)

    def _end_segment(self) -> None:
        """The text gathered so far, at the present rate, as a segment."""
        text = " ".join("".join(self.text).split())
        self.text = []
        if text:
            if len(self.segments) >= MAX_SEGMENTS:
                self._fail(f"more than {MAX_SEGMENTS} segments in one line", self._column())
            self.segments.append(Segment(text, self.rate))

    def _commit_pause(self) -> None:
        """The pauses asked for since the last segment go after it (before the first:
        the line's lead)."""
        structural, pause = self.structural, self.structural + self.breaks
        self.structural = self.breaks = 0.0
        if not pause:
            return
        if self.segments:
            last = self.segments[-1]
            self.segments[-1] = Segment(last.text, last.rate, last.pause_s + pause)
        else:   # before any text only a break counts (not a <p> or <s> opening the line)
            self.lead += pause - structural

    def _fail(self, message: str, column: int) -> None:
        raise MarkupError(f"{message} at column {column}")

    def _column(self) -> int:
        parser = self.parser.parser if self.parser is not None else None
        return max(1, (parser.CurrentColumnNumber if parser is not None else 0) + 1 - self.shift)


def _break_s(attrs: dict[str, str], column: int) -> float:
    if "time" in attrs:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s)\s*", attrs["time"])
        if m is None:
            raise MarkupError(f"<break> time {attrs['time']!r} is not like \"500ms\" or "
                              f"\"1.5s\" at column {column}")
        seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        if seconds > MAX_BREAK_S:
            raise MarkupError(f"<break> of {seconds:g} s is longer than {MAX_BREAK_S:g} s "
                              f"at column {column}")
        return seconds
    strength = attrs.get("strength", "medium")
    if strength not in STRENGTHS:
        raise MarkupError(f"<break> strength {strength!r} is not one of "
                          f"{', '.join(STRENGTHS)} at column {column}")
    return STRENGTHS[strength]


def _rate(value: str, column: int) -> float:
    v = value.strip()
    if v in RATES:
        return RATES[v]
    m = re.fullmatch(r"([+-]?)(\d+(?:\.\d+)?)(%?)", v)
    if m is None:
        raise MarkupError(f"<prosody> rate {value!r} is not a word ({', '.join(RATES)}), a "
                          f"percentage or a number at column {column}")
    number = float(m.group(2))
    if m.group(3) and m.group(1):   # "+20%": relative
        return 1.0 + (number if m.group(1) == "+" else -number) / 100
    return number / 100 if m.group(3) else number
