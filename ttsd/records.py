"""Typed records passed between stages. Stages exchange these, never dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True)
class Line:
    """One utterance parsed from an input file."""

    number: int
    """1-based line number in the file (for CSV: the line where the record starts)."""
    text: str
    """The text to speak: NFC-normalized, stripped, never empty."""
    id: str | None = None
    """The CSV ``id`` column, as written (sanitized later into a file name)."""
    voice: str | None = None
    """Per-line voice name (CSV), or None for the configured voice."""
    speaker: str | None = None
    """Per-line speaker (name or integer id as text), or None for the default."""
    speed: float | None = None
    """Per-line speed (finite, within limits), or None for the configured speed."""
    chapter: str | None = None
    """The CSV ``chapter`` column: where a joined file's chapter starts (the text of its
    mark), whitespace folded, at most 200 characters."""
    volume: float | None = None
    """The CSV ``volume`` column: a gain on this line, over ``output.volume`` and after
    any loudness target (0.5 is 6 dB quieter), or None."""
    markup: bool | None = None
    """The CSV ``markup`` column: True ("ssml"), False ("none"), None (the config's)."""
    pause_after: float | None = None
    """The CSV ``pause_after`` column: seconds of silence at the end of the line."""


@dataclass(frozen=True)
class LineError:
    """A line of a good file that cannot be used; it fails alone."""

    number: int
    message: str
    id: str | None = None
    text: str | None = None
    column: int | None = None


@dataclass
class BatchStats:
    """Timings of one batch, recorded in the store."""

    size: int
    phonemes: int
    audio_s: float
    prepare_ms: float
    model_ms: float
    write_ms: float
    device: str
    dtype: str
    voice: str
    padded_frames: int = 0
    used_frames: int = 0
    extra: dict = field(default_factory=dict)


class Done(NamedTuple):
    """A line that has its file in the outbox, as the sink hands it to the journal."""

    line_id: int
    wav: str
    """The file's path (a WAV, or the output format's)."""
    seconds: float
    cached: bool
    """Its audio came from the cache (a copy of an earlier line's file)."""
    rate: int | None = None
    """The file's sample rate (None: not known, a file of an earlier attempt adopted)."""
    lufs: float | None = None
    """Its integrated loudness as measured after rendering (with output.loudness_lufs)."""


class Failed(NamedTuple):
    """A line that fails, with the reason the manifest and the log give."""

    line_id: int
    error: str
