"""A line's timestamps (``output.timestamps``): its sentences, words and phonemes with their
start and end in seconds, from the durations the voice's duration predictor gave its
phonemes (the frames the decoder then drew them over), written as ``<name>.json``.

Words are the runs of phonemes between espeak-ng's word breaks; each is matched with
the line's own words (split at white space) when the two counts agree. When they do
not, a line with one number in it (espeak-ng reads "1990" as two words) gets that
number's spans as one; any other line keeps the voice's spans with ``text`` null and
``words_matched`` false: nothing is guessed.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttsd.engine.records import Timing

EDGES = frozenset("^$_")
"""Piper's BOS, EOS and pad symbols: time, but no phoneme of the text."""
PAUSES = frozenset(",.!?;:…—-\"'()")
"""Punctuation espeak-ng passes on: a pause inside a word's run, not part of its span."""


def sidecar(path: str | os.PathLike) -> str:
    """A line file's timestamps file beside it: ``0001.mp3`` → ``0001.json`` (in the
    outbox and in the cache alike)."""
    return os.path.splitext(os.fspath(path))[0] + ".json"


def _seconds(samples: int, rate: int) -> float:
    return round(samples / rate, 4)


def line_timestamps(timing: Timing, sample_rate: int, text: str) -> dict[str, Any]:
    """The line's spans: ``sentences``, ``words`` (text, phonemes, start, end) and
    ``phonemes`` (phoneme, start, end), in seconds from the start of its audio."""
    hop, at = timing.hop, timing.lead
    sentences: list[dict[str, Any]] = []
    words: list[dict[str, Any]] = []
    phonemes: list[dict[str, Any]] = []
    for si, (symbols, frames) in enumerate(timing.sentences):
        if si:
            at += timing.gaps[si - 1]
        start = at
        word: dict[str, Any] | None = None
        for sym, n in zip(symbols, frames, strict=True):
            a, b = at, at + n * hop
            at = b
            if sym == " ":
                word = None
                continue
            if sym in EDGES:
                continue
            phonemes.append({"phoneme": sym, "start": _seconds(a, sample_rate),
                             "end": _seconds(b, sample_rate)})
            if sym in PAUSES:
                continue
            if word is None:
                word = {"text": None, "phonemes": "", "start": _seconds(a, sample_rate)}
                words.append(word)
            word["phonemes"] += sym
            word["end"] = _seconds(b, sample_rate)
        sentences.append({"start": _seconds(start, sample_rate),
                          "end": _seconds(at, sample_rate)})
    said = text.split()
    words = _grouped(words, said)
    matched = len(said) == len(words)
    if matched:
        for w, t in zip(words, said, strict=True):
            w["text"] = t
    return {"sample_rate": sample_rate, "seconds": _seconds(at, sample_rate),
            "words_matched": matched, "sentences": sentences, "words": words,
            "phonemes": phonemes}


def _grouped(words: list[dict[str, Any]], said: list[str]) -> list[dict[str, Any]]:
    """When the voice said more words than the text has and exactly one of the text's
    words holds a digit (a number read as several words), that word's spans become one
    span; otherwise the spans as they are."""
    extra = len(words) - len(said)
    numbers = [i for i, t in enumerate(said) if any(c.isdigit() for c in t)]
    if extra <= 0 or len(numbers) != 1:
        return words
    i = numbers[0]
    run = words[i:i + extra + 1]
    merged = {"text": None, "phonemes": " ".join(w["phonemes"] for w in run),
              "start": run[0]["start"], "end": run[-1]["end"]}
    return [*words[:i], merged, *words[i + extra + 1:]]


def timestamps_bytes(timing: Timing, sample_rate: int, text: str) -> bytes:
    return json.dumps(line_timestamps(timing, sample_rate, text), ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")
