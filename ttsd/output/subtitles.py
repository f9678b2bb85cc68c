"""Timed text for a joined file: SubRip (.srt), WebVTT (.vtt) and a CUE sheet (.cue), one
cue (and one CUE track) per line, at the line's place in the joined audio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cue:
    start: float
    """Seconds from the start of the joined file."""
    end: float
    text: str
    title: str = ""
    """The line's id, or its chapter's name: a CUE track's title."""


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _one_line(text: str) -> str:
    """A cue's text on one line: a blank line would end the cue early."""
    return " ".join(text.split())


def srt(cues: list[Cue]) -> str:
    return "".join(f"{i}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{_one_line(c.text)}\n\n"
                   for i, c in enumerate(cues, 1))


def vtt(cues: list[Cue]) -> str:
    body = "".join(f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n"
                   f"{_one_line(c.text).replace('-->', '->')}\n\n" for c in cues)
    return "WEBVTT\n\n" + body


def _cue_time(seconds: float) -> str:
    """mm:ss:ff, 75 frames a second (the CD's sectors)."""
    frames = max(0, round(seconds * 75))
    m, rest = divmod(frames, 75 * 60)
    s, f = divmod(rest, 75)
    return f"{m:02d}:{s:02d}:{f:02d}"


def _quoted(text: str) -> str:
    return _one_line(text).replace('"', "'")


def cue_sheet(cues: list[Cue], audio_name: str, file_type: str, title: str) -> str:
    lines = [f'TITLE "{_quoted(title)}"', f'FILE "{_quoted(audio_name)}" {file_type}']
    for i, c in enumerate(cues, 1):
        lines += [f"  TRACK {i:02d} AUDIO", f'    TITLE "{_quoted(c.title or c.text[:80])}"',
                  f"    INDEX 01 {_cue_time(c.start)}"]
    return "\n".join(lines) + "\n"
