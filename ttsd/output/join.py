"""One audio file per input (``output.join = "file"``): its lines in order with a pause
between them, chapter marks, and the timed text beside it (.srt, .vtt, .cue).

Streamed: one line's audio is in memory at a time, read back from the line's own file
(lossless line formats give the joined file a single encoding; a lossy line format is
decoded and encoded again). WAV, FLAC and Ogg Vorbis are written by libsndfile, MP3,
Opus and M4B by FFmpeg (PyAV), which also writes their chapters: ID3 CHAP frames in an
MP3, CHAPTERnnn comments in an Ogg Opus, a chapter track in an M4B. Every file is
written under a temporary name and renamed into place, so a crash leaves the old one
or none, never half of one; the join runs again when the input is finished again.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ttsd.config.schema import OutputConfig
from ttsd.log import get_logger
from ttsd.output.formats import (
    FFMPEG_DECODES,
    KIND,
    LAME_CBR_GAIN,
    AudioFormat,
    probe,
    read_small,
)
from ttsd.output.fsio import fsync_dir, tmp_path, write_atomic
from ttsd.output.levels import resample
from ttsd.output.subtitles import Cue, cue_sheet, srt, vtt

log = get_logger(__name__)

PYAV = ("mp3", "opus", "m4b")
"""Joined formats written by FFmpeg, with chapters."""
SNDFILE = {"wav": ("WAV", None), "flac": ("FLAC", None), "ogg": ("OGG", "VORBIS")}
CUE_TYPE = {"wav": "WAVE", "mp3": "MP3"}


@dataclass(frozen=True)
class Part:
    """One line of the input, in order."""

    number: int
    path: str | None
    """The line's file; None: the line failed (it has no place in the joined file)."""
    text: str
    title: str
    """The line's id, or "Line N"."""
    chapter: str | None = None
    """The CSV ``chapter`` column's value."""
    stamps: str | None = None
    """The line's timestamps file (``output.timestamps``): a long line's subtitles get a
    cue per sentence."""


@dataclass(frozen=True)
class Joined:
    path: Path
    seconds: float
    lines: int
    missing: list[int]
    """Line numbers whose file could not be read (left out, with a warning)."""


def _ffmpeg(path: str) -> bool:
    return KIND.get(os.path.splitext(path)[1]) in FFMPEG_DECODES


def read_line(path: str) -> tuple[np.ndarray, int]:
    """A line file's mono float32 samples and rate, decoded as ``formats.probe`` counts
    them (``FFMPEG_DECODES`` by FFmpeg, the rest by libsndfile)."""
    if _ffmpeg(path):
        from ttsd.output.codecs import decode_file
        return decode_file(path)
    audio, rate = sf.read(path, dtype="float32", always_2d=False)
    return (audio if audio.ndim == 1 else audio.mean(axis=1)), rate


def line_length(path: str) -> tuple[int, int]:
    """(frames, rate) of a line file: its header for WAV, FLAC and Ogg Vorbis; for MP3
    and Opus, whose lengths only decoding gives exactly, ``formats.probe`` (counted
    without keeping the samples)."""
    if _ffmpeg(path):
        rate, frames = probe(read_small(path), KIND[os.path.splitext(path)[1]])
        return frames, rate
    info = sf.info(path)
    return info.frames, info.samplerate


class _Sink:
    """The joined file's encoder over an open file: ``write`` float32 blocks, ``close``."""

    def __init__(self, f: io.BufferedWriter, fmt: AudioFormat, rate: int, title: str,
                 chapters: list[tuple[float, float, str]]) -> None:
        self.fmt, self.rate = fmt, rate
        self.sf = None
        if fmt.name in PYAV:
            from ttsd.output.codecs import Encoder
            self.enc = Encoder(f, fmt.name, rate, fmt.kbps, title=title, chapters=chapters)
        else:
            major, sub = SNDFILE[fmt.name]
            self.sf = sf.SoundFile(f, "w", samplerate=rate, channels=1, format=major,
                                   subtype=sub or fmt.subtype)

    def write(self, samples: np.ndarray) -> None:
        if self.sf is not None:
            self.sf.write(samples)
        else:
            self.enc.write(samples * LAME_CBR_GAIN if self.fmt.name == "mp3" else samples)

    def close(self) -> None:
        if self.sf is not None:
            self.sf.close()
        else:
            self.enc.close()


LONG_CUE_S = 7.0
"""A line longer than this, with timestamps, gets one subtitle cue per sentence."""


SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


def sentence_cues(cue: Cue, stamps: str | None) -> list[Cue]:
    """``cue`` (a line's) as one cue per sentence, from its timestamps file, when the line
    is long and its sentences' texts are known: its words matched with their text, or its
    text splitting at sentence ends into as many pieces as the voice spoke sentences;
    else ``[cue]``."""
    if not stamps or cue.end - cue.start <= LONG_CUE_S:
        return [cue]
    try:
        with open(stamps, encoding="utf-8") as f:
            data = json.load(f)
        spans = data["sentences"]
        if len(spans) < 2:
            return [cue]
        if data.get("words_matched"):
            texts = [" ".join(w["text"] for w in data["words"]
                              if s["start"] <= w["start"] and w["end"] <= s["end"] + 1e-3)
                     for s in spans]
        else:
            texts = SENTENCE_END.split(cue.text.strip())
        if len(texts) != len(spans) or not all(texts):
            return [cue]
        return [Cue(cue.start + s["start"], min(cue.end, cue.start + s["end"]), t, cue.title)
                for s, t in zip(spans, texts, strict=True)]
    except (OSError, ValueError, KeyError, TypeError):
        return [cue]


def chapters_of(cues: list[Cue], parts: list[Part], mode: str) -> list[tuple[float, float, str]]:
    """(start, end, title): one per line, or one per run of lines sharing a CSV
    ``chapter`` value (a line without one stays in the chapter before it)."""
    if mode == "none" or not cues:
        return []
    if mode == "line":
        return [(c.start, c.end, c.title) for c in cues]
    marks: list[list] = []
    for cue, part in zip(cues, parts, strict=True):
        if part.chapter and (not marks or marks[-1][2] != part.chapter):
            marks.append([cue.start, cue.end, part.chapter])
        elif marks:
            marks[-1][1] = cue.end
        else:
            marks.append([cue.start, cue.end, part.chapter or cue.title])
    return [tuple(m) for m in marks]


def join_lines(outbox: Path, stem: str, parts: Iterable[Part], out: OutputConfig,
               title: str) -> Joined:
    """Write ``outbox/<stem><suffix>`` from ``parts`` (and its .srt, .vtt, .cue). First
    each line's length is read (the chapters go into an MP3's or Ogg's header, before
    any sample), then the lines are streamed through the encoder. OSError (a full disk)
    leaves no temporary file; a line file that cannot be read is left out and named in
    the result (one that fails between the two passes becomes silence of its length)."""
    fmt = AudioFormat.joined(out)
    dest = outbox / f"{stem}{fmt.suffix}"
    plan: list[tuple[Part, int, int]] = []
    missing: list[int] = []
    for part in parts:
        if not part.path:
            continue
        try:
            frames, rate = line_length(part.path)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("join.line_unreadable", file=stem, line=part.number, path=part.path,
                        error=str(exc))
            missing.append(part.number)
            continue
        plan.append((part, frames, rate))
    rate = fmt.rate(out.sample_rate, plan[0][2] if plan else 22050)
    pause = np.zeros(round(out.join_pause_s * rate), np.float32)
    cues: list[Cue] = []
    at = 0
    for i, (part, frames, line_rate) in enumerate(plan):
        at += len(pause) if i else 0
        n = frames if line_rate == rate else round(frames * rate / line_rate)
        cues.append(Cue(at / rate, (at + n) / rate, part.text, part.title))
        at += n
    chapters = chapters_of(cues, [p for p, _n, _r in plan], out.chapters)
    tmp = tmp_path(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f, fmt, rate, title, chapters)
            for i, ((part, _frames, _r), cue) in enumerate(zip(plan, cues, strict=True)):
                if i:
                    sink.write(pause)
                want = round((cue.end - cue.start) * rate)
                try:
                    audio, line_rate = read_line(part.path)
                    if line_rate != rate:
                        audio = resample(audio, line_rate, rate)
                except (OSError, ValueError, RuntimeError) as exc:
                    log.warning("join.line_unreadable", file=stem, line=part.number,
                                path=part.path, error=str(exc))
                    missing.append(part.number)
                    audio = np.zeros(want, np.float32)
                if len(audio) != want:   # hold the timeline the cues and chapters give
                    audio = np.pad(audio, (0, max(0, want - len(audio))))[:want]
                sink.write(audio)
            sink.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    subtitles = [c for (part, _n, _r), cue in zip(plan, cues, strict=True)
                 for c in sentence_cues(cue, part.stamps)]
    for suffix, text in ((".srt", srt(subtitles)), (".vtt", vtt(subtitles)),
                         (".cue", cue_sheet(cues, dest.name, CUE_TYPE.get(fmt.name, "WAVE"),
                                            title))):
        write_atomic(outbox / f"{stem}{suffix}", text.encode("utf-8"), overwrite=True,
                     sync_dir=False)
    fsync_dir(outbox)
    seconds = cues[-1].end if cues else 0.0
    log.info("file.joined", path=str(dest), lines=len(cues), seconds=round(seconds, 2),
             missing=missing or None)
    return Joined(dest, seconds, len(cues), missing)
