"""From the engine's samples to a line's file: the levels (``levels``), then the format
(``formats``), decided once from ``[output]``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ttsd.config.schema import OutputConfig
from ttsd.output.formats import AudioFormat
from ttsd.output.levels import Levels, Rendered
from ttsd.output.wav import wav_parts

if TYPE_CHECKING:
    from collections.abc import Buffer  # Python 3.12


@dataclass(frozen=True)
class LineAudio:
    """How every line is written: its format and its levels."""

    format: AudioFormat = field(default_factory=AudioFormat)
    levels: Levels = field(default_factory=Levels)
    timestamps: bool = False
    """Each line's file has ``<name>.json`` beside it (``output.timestamps``), written
    before the audio: a line whose audio is there has its timestamps too."""

    @classmethod
    def of(cls, out: OutputConfig) -> LineAudio:
        return cls(AudioFormat.lines(out), Levels(
            sample_rate=out.sample_rate, loudness_lufs=out.loudness_lufs,
            true_peak_dbtp=out.true_peak_dbtp, volume=out.volume), out.timestamps)

    @property
    def suffix(self) -> str:
        return self.format.suffix

    def louder(self, volume: float | None) -> LineAudio:
        """This, with a line's own gain (the CSV ``volume`` column) over ``volume``."""
        if volume is None or volume == 1.0:
            return self
        return replace(self, levels=replace(self.levels, volume=self.levels.volume * volume))

    def rate(self, voice_rate: int) -> int:
        """The rate of a line's file for a voice of ``voice_rate``."""
        return self.format.rate(self.levels.sample_rate, voice_rate)

    def key(self) -> str:
        """Everything here, as one part of a line's cache key."""
        return f"{self.format.key()}|{self.levels.key()}"

    def encode(self, samples: np.ndarray, sample_rate: int) -> tuple[list[Buffer], Rendered]:
        """The line's file as buffers to write one after another, and its rendered
        audio (rate, length, loudness). ValueError on NaN/Inf samples."""
        r = self.levels.render(samples, sample_rate, self.rate(sample_rate))
        if self.format.name == "wav":
            return wav_parts(r.samples, r.sample_rate, self.format.subtype), r
        return [self.format.encode(r.samples, r.sample_rate)], r

    def file_ok(self, path: str | os.PathLike, *, sample_rate: int | None = None,
                size: int | None = None, dir_fd: int | None = None) -> bool:
        return self.format.file_ok(path, sample_rate=sample_rate, size=size, dir_fd=dir_fd)

    def seconds(self, path: str | os.PathLike, dir_fd: int | None = None) -> float:
        return self.format.seconds(path, dir_fd)
