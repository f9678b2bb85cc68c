"""The formats FFmpeg encodes (through PyAV): MP3 (libmp3lame), Opus (libopus, in Ogg) and
M4B (AAC in MP4); one line at a time, or streamed into one file with chapters.

Imported only when one of them is used: PyAV loads FFmpeg's libraries (~40 ms).
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import IO

import av
import numpy as np

from ttsd.output.formats import LAME_FAST_QUALITY, lame_fast

CONTAINER = {"mp3": "mp3", "opus": "ogg", "m4b": "ipod"}
CODEC = {"mp3": "libmp3lame", "opus": "libopus", "m4b": "aac"}


class Encoder:
    """One mono stream of one format written into ``out`` (a file object) as samples
    come: ``write`` float32 blocks, ``close`` with the chapters, if any. Memory stays
    that of the codec's frames, whatever the length."""

    def __init__(self, out: IO[bytes], name: str, sample_rate: int, kbps: int,
                 title: str = "", chapters: list[tuple[float, float, str]] = ()) -> None:
        """``chapters`` as (start s, end s, title), where the container carries them
        (MP3: ID3 CHAP frames; Ogg: CHAPTERnnn comments; M4B: its chapter track): known
        before the first sample, as an MP3's and an Ogg's go into their headers."""
        self.name, self.rate = name, sample_rate
        self.container = av.open(out, "w", format=CONTAINER[name])
        if title:
            self.container.metadata["title"] = title
        if chapters:
            tb = Fraction(1, 1000)
            self.container.set_chapters([
                {"id": i + 1, "start": round(a * 1000), "end": round(b * 1000),
                 "time_base": tb, "metadata": {"title": t}}
                for i, (a, b, t) in enumerate(chapters)])
        self.stream = self.container.add_stream(CODEC[name], rate=sample_rate, layout="mono")
        self.stream.bit_rate = kbps * 1000
        if name == "mp3":   # float in: LAME_CBR_GAIN's peaks above 1.0 are not clipped
            self.stream.format = "fltp"
            if lame_fast(kbps, sample_rate):
                self.stream.codec_context.options = {"compression_level": str(LAME_FAST_QUALITY)}
        self.frames = 0

    def write(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.float32)[None, :], format="flt",
            layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self.frames
        frame.time_base = Fraction(1, self.rate)
        self.frames += len(samples)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and write the trailer."""
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()


def encode_av(audio: np.ndarray, sample_rate: int, name: str, kbps: int) -> bytes:
    """A whole line file of ``name`` (mp3, opus) from float32 samples."""
    buf = io.BytesIO()
    enc = Encoder(buf, name, sample_rate, kbps)
    enc.write(audio)
    enc.close()
    return buf.getvalue()


def probe_av(data: bytes, name: str) -> tuple[int, int]:
    """(sample rate, frames) of a whole file, decoded to its end; ValueError if FFmpeg
    cannot decode it, or finds it damaged on the way."""
    try:
        with av.open(io.BytesIO(data), "r", format=CONTAINER[name]) as c:
            if not c.streams.audio:
                raise ValueError("no audio stream")
            stream = c.streams.audio[0]
            frames = rate = 0
            for frame in c.decode(stream):
                frames += frame.samples
                rate = frame.sample_rate
            return rate, frames
    except av.FFmpegError as exc:
        raise ValueError(str(exc)) from None


def decode_file(path: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of a whole file, by FFmpeg."""
    with av.open(path, "r") as c:
        blocks = [f.to_ndarray().reshape(-1).astype(np.float32)
                  for f in c.decode(c.streams.audio[0])]
        rate = c.streams.audio[0].rate
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), rate
