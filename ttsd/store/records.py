"""The records the store takes and returns: lines going in and out of the journal, and
what its reads report (counts, totals, rows of the daemon's facts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------- lines

@dataclass(frozen=True)
class LineRow:
    id: int
    file_id: int
    number: int
    text: str
    voice: str
    speaker_id: int
    length_scale: float
    noise_scale: float
    noise_w: float
    seed: int
    cache_key: str | None
    out_name: str
    out_dir: str
    attempts: int
    file: str = ""
    """The input's name (for reports: ``prompts.csv line 3``)."""
    volume: float | None = None
    """The CSV ``volume`` column (a gain on this line), or None."""
    pause_after: float | None = None
    """The CSV ``pause_after`` column (seconds of silence after the line), or None."""
    markup: bool = False
    """The text is SSML."""
    said: str | None = None
    """What the voice says when the lexicon rewrote ``text`` (None: ``text``)."""


@dataclass
class NewLine:
    """A parsed line ready for the store: pending, failed with ``error``, or done with
    ``wav`` (a cache hit answered as it was parsed, ``cache.answer_new_lines``)."""

    number: int
    text: str
    line_id: str | None = None
    out_name: str | None = None
    name_key: str | None = None
    voice: str | None = None
    speaker_id: int = 0
    length_scale: float = 1.0
    noise_scale: float = 0.667
    noise_w: float = 0.8
    seed: int = 0
    cache_key: str | None = None
    error: str | None = None
    wav: str | None = None
    seconds: float | None = None
    chapter: str | None = None
    """The CSV ``chapter`` column (``output.chapters = "column"``)."""
    volume: float | None = None
    """The CSV ``volume`` column (a gain on this line), or None."""
    pause_after: float | None = None
    """The CSV ``pause_after`` column (seconds of silence after the line), or None."""
    markup: bool = False
    """The text is SSML."""
    said: str | None = None
    """What the voice says when the lexicon rewrote ``text`` (None: ``text``)."""
    rate: int | None = None
    """With ``wav``: its sample rate and measured loudness (the cache entry's)."""
    lufs: float | None = None
    cached: bool = False
    """With ``wav``: the WAV came from the cache entry (a copy, or with ``cache.link`` a
    link; False: a whole WAV of an earlier attempt was already at the path, and was
    kept)."""


# ---------------------------------------------------------------------- cache

@dataclass(frozen=True)
class CacheEntry:
    """A cache row as ``purge-cache`` walks them (least recently used first)."""

    key: str
    path: str
    bytes: int
    last_used: float
    hits: int
    rowid: int


@dataclass(frozen=True)
class CacheFile:
    """A cache row taken out of the journal: its file is the caller's to unlink."""

    key: str
    path: str
    bytes: int


@dataclass(frozen=True)
class CacheTotals:
    entries: int
    bytes: int
    """Their size as the journal records it."""


# ---------------------------------------------------------------------- counts

@dataclass(frozen=True)
class LineStates:
    """Lines by state, over the whole journal."""

    pending: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0


@dataclass(frozen=True)
class FileStates:
    """Files by state, over the whole journal."""

    parsing: int = 0
    queued: int = 0
    done: int = 0
    failed: int = 0


@dataclass(frozen=True)
class DoneTotals:
    """The done lines' audio and how many came from the cache (the ``done_audio_us``
    and ``done_cached`` counters, kept by every transaction that marks lines done)."""

    audio_s: float
    cached: int


@dataclass(frozen=True)
class RunProgress:
    """What a progress bar shows of the files claimed since a start."""

    lines: int
    """Their lines."""
    finished: int
    """Their lines done or failed."""
    audio_s: float
    """Audio made since the start."""


# ---------------------------------------------------------------------- daemon facts

@dataclass(frozen=True)
class Heartbeat:
    """The row the daemon writes every ``heartbeat_s``."""

    pid: int | None
    started_at: float | None
    at: float | None
    state: str | None
    info: dict[str, Any] = field(default_factory=dict)
    """What the daemon said of itself (device, status text, ...); {} when unreadable."""


@dataclass(frozen=True)
class BatchTotals:
    """Sums over every batch (None: no batch, or none with that figure)."""

    batches: int
    lines: int | None
    model_ms: float | None
    prepare_ms: float | None
    write_ms: float | None
    audio_s: float | None
    used_frames: int | None
    padded_frames: int | None


@dataclass(frozen=True)
class Throughput:
    """What the batches of a window produced, and the wall time spent producing it."""

    batches: int
    audio_s: float
    """Audio seconds of the window's batches."""
    working_s: float
    """Length of the union of the batches' working intervals, in seconds."""

    @property
    def x_realtime(self) -> float | None:
        """Audio seconds per working second; None when no time was spent."""
        return self.audio_s / self.working_s if self.working_s > 0 else None


@dataclass(frozen=True)
class BatchDevice:
    device: str | None
    dtype: str | None


@dataclass(frozen=True)
class GpuReleases:
    """The GPU memory releases: how many, how much, and the last one."""

    count: int = 0
    total_bytes: int = 0
    last_at: float | None = None
    last_bytes: int | None = None
    last_reason: str | None = None


@dataclass(frozen=True)
class WorkerRow:
    """One worker slot as the daemon last wrote it, with its GPU memory releases."""

    slot: int
    device: str
    backend: str | None
    host: str | None
    pid: int | None
    state: str
    batches: int
    lines: int
    audio_s: float
    model_ms: float | None
    restarts: int
    failures: int
    last_error: str | None
    gpu_name: str | None
    gpu_total: int | None
    gpu_allocated: int | None
    gpu_reserved: int | None
    gpu_peak: int | None
    releases: int = 0
    released_bytes: int = 0
    last_release_at: float | None = None


# ---------------------------------------------------------------------- bench

@dataclass(frozen=True)
class FileSpan:
    """One input file's run: from its claim to its last line finished."""

    span: float | None
    lines: int
    cached: int


@dataclass(frozen=True)
class BatchMark:
    """One batch of an input file's run: when it was committed (seconds after the
    file's claim) and its lines and milliseconds, rounded as a bench reports them."""

    at_s: float
    size: int
    prepare_ms: float | None
    model_ms: float | None
    write_ms: float | None
