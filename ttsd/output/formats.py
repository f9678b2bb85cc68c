"""Audio formats: what a line's file is encoded as, its suffix, and the check of one on
disk.

WAV (PCM or telephony μ-law/A-law), FLAC and Ogg Vorbis are encoded by libsndfile
(soundfile); Opus by FFmpeg's libopus through PyAV (libsndfile's Opus encoder ran at 88x
realtime against PyAV's 125x on one core of the 2-core box, and takes no bitrate). MP3
(LAME) by FFmpeg's LAME at its fast quality (7) where a line has the bits for it
(``lame_fast``), else by libsndfile, whose "compression level" maps onto LAME's
constant bitrates exactly (``_lame_level``). LAME's constant and average bitrate modes
play back 0.446 dB below their input (measured on a sine and on speech, at every
bitrate, through both FFmpeg and libsndfile; its VBR mode keeps the level): the samples
go in that much louder (``LAME_CBR_GAIN``), so an MP3 plays at the loudness asked. Both
libraries release the GIL while they encode: the sink's writer threads encode in
parallel (2 threads: MP3 1.8x, Opus 1.7x one thread's rate).
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from ttsd.config.checks import SUBTYPES, subtype_for
from ttsd.config.schema import OutputConfig
from ttsd.output.wav import READ_FLAGS, encode_wav, int16_floats, wav_info, wav_ok

OPUS_RATE = 48000
"""Opus is written at 48 kHz: every player decodes it at that rate."""
DEFAULT_KBPS = {"mp3": 64, "opus": 32, "m4b": 64}
"""``output.bitrate_kbps = 0``: mono speech at these rates is transparent to most ears
(MP3 at 64 kbps, Opus at 32 kbps; AAC 64 kbps)."""
SUFFIX = {"wav": ".wav", "flac": ".flac", "mp3": ".mp3", "ogg": ".ogg", "opus": ".opus",
          "m4b": ".m4b"}
KIND = {suffix: name for name, suffix in SUFFIX.items()}
"""A file's suffix → its format."""
FFMPEG_DECODES = ("mp3", "opus", "m4b")
"""Formats decoded by FFmpeg (PyAV), which trims the encoder's delay as players do;
libsndfile decodes the rest."""


@dataclass(frozen=True)
class AudioFormat:
    """One way to encode a line: the format, its sample format (WAV, FLAC) or bitrate
    (MP3, Opus, M4B)."""

    name: str = "wav"
    subtype: str = "PCM_16"
    bitrate_kbps: int = 0

    @classmethod
    def lines(cls, out: OutputConfig) -> AudioFormat:
        """The format of each line's file."""
        return cls(out.format, subtype_for(out.format, out.subtype), out.bitrate_kbps)

    @classmethod
    def joined(cls, out: OutputConfig) -> AudioFormat:
        """The format of an input's lines joined into one file."""
        name = out.join_format or out.format
        return cls(name, subtype_for(name, out.subtype), out.bitrate_kbps)

    @property
    def suffix(self) -> str:
        return SUFFIX[self.name]

    @property
    def kbps(self) -> int:
        return self.bitrate_kbps or DEFAULT_KBPS.get(self.name, 0)

    def rate(self, wanted: int, own: int) -> int:
        """The rate a line is written at: ``wanted`` (0: the voice's ``own``); Opus always
        at 48 kHz."""
        if self.name == "opus":
            return OPUS_RATE
        return wanted or own

    def key(self) -> str:
        """The format's part of a line's cache key."""
        if self.name in SUBTYPES:
            return f"{self.name}/{self.subtype}"
        if self.name == "mp3":   # lame2: the encoder chosen by bits a sample (lame_fast)
            return f"{self.name}/{self.kbps}k/lame2"
        if self.name in DEFAULT_KBPS:
            return f"{self.name}/{self.kbps}k"
        return self.name

    def encode(self, samples: np.ndarray, sample_rate: int) -> bytes:
        """The file's bytes: mono float32 samples in [-1, 1] (or the engine's int16
        PCM for 16-bit WAV). ValueError on NaN/Inf."""
        if self.name == "wav":
            return encode_wav(samples, sample_rate, self.subtype)
        audio = _floats(samples)
        if self.name == "flac":
            return _soundfile(audio, sample_rate, "FLAC", self.subtype)
        if self.name == "ogg":
            return _soundfile(audio, sample_rate, "OGG", "VORBIS")
        if self.name == "mp3":
            if lame_fast(self.kbps, sample_rate):
                from ttsd.output.codecs import encode_av
                return encode_av(audio * LAME_CBR_GAIN, sample_rate, "mp3", self.kbps)
            return _soundfile(audio * LAME_CBR_GAIN, sample_rate, "MP3", "MPEG_LAYER_III",
                              compression_level=_lame_level(self.kbps, sample_rate),
                              bitrate_mode="CONSTANT")
        from ttsd.output.codecs import encode_av
        return encode_av(audio, sample_rate, self.name, self.kbps)

    def file_ok(self, path: str | os.PathLike, *, sample_rate: int | None = None,
                size: int | None = None, dir_fd: int | None = None) -> bool:
        """Whether the file at ``path`` is a whole line file of this format: a regular
        file (not a symlink), exactly ``size`` bytes when given, at ``sample_rate``,
        holding audio. WAV by its header (microseconds); the others by decoding the
        file to its end (a truncated or damaged one fails to decode, or decodes to a
        length other than its header's)."""
        if self.name == "wav":
            return wav_ok(path, sample_rate=sample_rate, size=size, dir_fd=dir_fd)
        try:
            data = read_small(path, dir_fd, size)
            rate, frames = probe(data, self.name)
        except (OSError, ValueError):
            return False
        return frames > 0 and (sample_rate is None or rate == sample_rate)

    def seconds(self, path: str | os.PathLike, dir_fd: int | None = None) -> float:
        """The length in seconds of a line file of this format; OSError if it cannot be
        opened, ValueError if it does not decode."""
        if self.name == "wav":
            return wav_info(path, dir_fd)[2]
        rate, frames = probe(read_small(path, dir_fd), self.name)
        return frames / rate


def _floats(samples: np.ndarray) -> np.ndarray:
    audio = int16_floats(samples) if samples.dtype == np.int16 \
        else np.asarray(samples, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected 1-D mono samples, got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError("samples contain NaN or Inf; refusing to write them")
    return np.clip(audio, -1.0, 1.0)


def _soundfile(audio: np.ndarray, sample_rate: int, fmt: str, subtype: str,
               **options: object) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format=fmt, subtype=subtype, **options)
    return buf.getvalue()


LAME_CBR_GAIN = np.float32(10 ** (0.446 / 20))


LAME_FAST_BITS = 2.9
"""Bits a sample (64 kbit/s at 22,050 Hz) from which an MP3 is encoded by FFmpeg's LAME
at quality ``LAME_FAST_QUALITY`` rather than by libsndfile's LAME at its default one.
On 24 lines of the voice (PESQ wideband, 1 to 4.64, against the samples encoded): 64
kbit/s 4.51 vs 4.48, 96 kbit/s 4.63 vs 4.61, 128 kbit/s 4.64 and 4.64 at 22,050 Hz;
128 kbit/s at 44,100 Hz 4.64 and 4.64; 48 kbit/s at 16,000 Hz 4.24 vs 4.18; at 4-5x
the speed on one core. Below it libsndfile's stays: 32 kbit/s at 22,050 Hz 3.70 vs
3.88, 48 kbit/s 4.32 vs 4.36."""
LAME_FAST_QUALITY = 7
"""LAME's algorithm quality (0 best … 9 fastest): 7 leaves out the psychoacoustic noise
shaping."""


def lame_fast(kbps: int, sample_rate: int) -> bool:
    """Whether an MP3 at ``kbps`` and ``sample_rate`` has the bits for LAME's fast
    quality (``LAME_FAST_BITS``)."""
    return kbps * 1000 >= LAME_FAST_BITS * sample_rate


def _lame_level(kbps: int, sample_rate: int) -> float:
    """libsndfile's compression level for a constant ``kbps``: it maps 0 … 1 linearly
    onto 320 … 32 kbit/s (MPEG-1, 32 kHz and up) or 160 … 8 (MPEG-2, below), and LAME
    takes the nearest bitrate it has (measured: 32 → 32.4, 64 → 65.2, 128 → 130.4 at
    22,050 Hz). 1.0 itself is refused."""
    top, bottom = (320, 32) if sample_rate >= 32000 else (160, 8)
    return min(0.999, max(0.0, (top - kbps) / (top - bottom)))


MAX_CHECK_BYTES = 64 << 20
"""A line file larger than this is not read whole to check it (it is no line's)."""


def read_small(path: str | os.PathLike, dir_fd: int | None = None, size: int | None = None
               ) -> bytes:
    """The bytes of a regular file of at most ``MAX_CHECK_BYTES`` (exactly ``size`` when
    given), never through a symbolic link; ValueError if it is not one, OSError if it
    cannot be read (FileNotFoundError: missing)."""
    fd = os.open(path, READ_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if size is not None and st.st_size != size:
            raise ValueError("not the size it was written at")
        if st.st_size > MAX_CHECK_BYTES:
            raise ValueError("too large for a line")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def probe(data: bytes, name: str) -> tuple[int, int]:
    """(sample rate, frames) of a whole encoded file, decoded to its end; ValueError if
    it does not decode (``FFMPEG_DECODES`` by FFmpeg, the rest by libsndfile)."""
    if name in FFMPEG_DECODES:
        from ttsd.output.codecs import probe_av
        return probe_av(data, name)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            frames = 0
            for block in f.blocks(blocksize=65536, dtype="float32"):
                frames += len(block)
            if f.frames and frames != f.frames:
                raise ValueError(f"decoded {frames} of the header's {f.frames} frames")
            return f.samplerate, frames
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise ValueError(str(exc)) from None
