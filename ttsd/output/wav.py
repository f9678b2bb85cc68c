"""The WAV format: encoding samples, writing a WAV atomically, checking one on disk.

16-bit PCM is encoded here directly (one header and the samples, no copy); the other
subtypes go through soundfile, which only the output modules import.
"""

from __future__ import annotations

import io
import operator
import os
import stat
import struct
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from ttsd.log import get_logger
from ttsd.output.fsio import exists_error, lexists, write_atomic

if TYPE_CHECKING:
    from collections.abc import Buffer  # Python 3.12

log = get_logger(__name__)

_WAV_PCM16_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
"""RIFF/WAVE with one 16-byte ``fmt `` chunk (PCM, mono, 16-bit) then ``data``: the
44 bytes libsndfile writes for a mono PCM_16 WAV (no PEAK, fact or LIST chunk)."""


def encode_wav(samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """Mono WAV bytes of float samples, clipped to [-1, 1], or of int16 PCM (k stands for
    k / 32768: the engine's ``pcm16`` output); ValueError on NaN/Inf or anything that is
    not 1-D."""
    if isinstance(samples, np.ndarray) and samples.dtype == np.int16:
        return _encode_int16(samples, sample_rate, subtype)
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected 1-D mono samples, got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError("samples contain NaN or Inf; refusing to write them")
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    clipped = np.clip(audio, -1.0, 1.0)
    if subtype == "PCM_16":
        data = _pcm16_wav(clipped, sample_rate)
        if data is not None:
            return data
    buf = io.BytesIO()
    sf.write(buf, clipped, sample_rate, subtype=subtype, format="WAV")
    return buf.getvalue()


_RATE_MAX = 2**31 - 1
"""Past this soundfile refuses the rate (a C int); the fast path leaves it to it."""


def pcm16(clipped: np.ndarray) -> np.ndarray:
    """Little-endian int16 samples of float32 ``clipped`` (already in [-1, 1]), exactly as
    libsndfile converts them for PCM_16 with clipping on (soundfile turns it on):
    ``lrintf(x × 2³¹) >> 16``, with 1.0 saturating at 32767.

    That is floor(x × 32768) except for |x| < 2⁻⁸, where x × 2³¹ still has a fraction
    and the round-to-nearest-even before the shift can carry into the next step (e.g.
    -1e-10 → 0, not -1; (65536 - 0.5) / 2³¹ → 1, not 0). Every step below is exact in
    float32: a power-of-two scale, rint of a float32, floor of a float32.
    """
    y = np.multiply(clipped, np.float32(2.0**31), dtype=np.float32)
    np.rint(y, out=y)                       # lrintf, round half to even
    np.multiply(y, np.float32(2.0**-16), out=y)
    np.floor(y, out=y)                      # the arithmetic shift right by 16
    np.minimum(y, np.float32(32767.0), out=y)   # +1.0: 2³¹ → 32768 saturates
    return y.astype("<i2")


def _encode_int16(samples: np.ndarray, sample_rate: int, subtype: str) -> bytes:
    """int16 PCM as it is for PCM_16 (the same bytes as its float k / 32768 through
    ``pcm16``); other subtypes through libsndfile from the exact floats."""
    return b"".join(_int16_parts(samples, sample_rate, subtype))


def _int16_parts(samples: np.ndarray, sample_rate: int, subtype: str) -> list[Buffer]:
    """``_encode_int16``'s WAV in parts: for PCM_16 its 44-byte header and the samples
    themselves (written with writev: copying them into one bytes object was a tenth of
    a daemon's time holding the GIL); else the whole WAV."""
    if samples.ndim != 1:
        raise ValueError(f"expected 1-D mono samples, got shape {samples.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    if subtype == "PCM_16":
        header = _pcm16_header(samples.size, sample_rate)
        if header is not None:
            return [header, np.ascontiguousarray(samples, dtype="<i2")]
    return [encode_wav(int16_floats(samples), sample_rate, subtype)]


def wav_parts(samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> list[Buffer]:
    """A WAV as buffers to write one after another: the engine's int16 samples as they
    are behind a 44-byte header for PCM_16 (``_int16_parts``), else the encoded file."""
    if isinstance(samples, np.ndarray) and samples.dtype == np.int16:
        return _int16_parts(samples, sample_rate, subtype)
    return [encode_wav(samples, sample_rate, subtype)]


def int16_floats(samples: np.ndarray) -> np.ndarray:
    """int16 PCM as the float32 samples it stands for (k → k / 32768, exact)."""
    return samples.astype(np.float32) / np.float32(32768.0)


def _pcm16_header(frames: int, sample_rate: int) -> bytes | None:
    """The 44 bytes libsndfile writes before ``frames`` mono PCM_16 samples; None where
    libsndfile must decide (a rate that is not a C int, over 4 GiB)."""
    try:
        rate = operator.index(sample_rate)
    except TypeError:
        return None
    size = 2 * frames
    if not 0 < rate <= _RATE_MAX or size + 36 > 0xFFFFFFFF:
        return None
    return _WAV_PCM16_HEADER.pack(b"RIFF", 36 + size, b"WAVE", b"fmt ", 16, 1, 1, rate,
                                  2 * rate, 2, 16, b"data", size)


def _pcm16_wav(clipped: np.ndarray, sample_rate: int) -> bytes | None:
    """The mono PCM_16 WAV libsndfile would write, byte for byte, without libsndfile;
    None where libsndfile must decide (a rate that is not a C int, over 4 GiB)."""
    header = _pcm16_header(clipped.size, sample_rate)
    return None if header is None else header + pcm16(clipped).tobytes()


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int,
              subtype: str = "PCM_16", *, overwrite: bool = False, sync_dir: bool = True,
              dir_fd: int | None = None) -> int:
    """Encode and write one WAV atomically; returns the bytes written.

    Raises FileExistsError rather than overwrite (unless ``overwrite``), ValueError for
    NaN/Inf samples, OSError (ENOSPC, EIO…) after removing the temp file.
    ``sync_dir=False``: the caller fsyncs the folder itself (once for a whole batch)
    before recording the line as done; the file's own data is synced here either way.
    """
    if isinstance(samples, np.ndarray) and samples.dtype == np.int16:
        # no encoding to spare: write_atomic's own check refuses an existing path
        data: bytes | list[Buffer] = _int16_parts(samples, sample_rate, subtype)
    else:
        if not overwrite and lexists(path, dir_fd):
            raise exists_error(path)
        data = encode_wav(samples, sample_rate, subtype)
    written = write_atomic(path, data, overwrite=overwrite, crash_at="after_tmp",
                           sync_dir=sync_dir, dir_fd=dir_fd)
    log.debug("writer.wav", path=str(path), bytes=written)
    return written


def _riff_header(head: bytes, size: int) -> tuple[int, int] | None:
    """(sample rate, data bytes) from the first bytes ``head`` of a RIFF/WAVE file of
    ``size`` bytes, when its header's own length fits in the file (catches truncation);
    None when the first 4 KiB hold no complete header. Checking a cached WAV must cost
    a stat and one small read, not a libsndfile open (that was most of a cache hit's
    time)."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    (riff_len,) = struct.unpack_from("<I", head, 4)
    if riff_len + 8 > size:
        raise ValueError("truncated")
    rate, pos = None, 12
    while pos + 8 <= len(head):
        cid, clen = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if cid == b"fmt " and pos + 16 <= len(head):
            (rate,) = struct.unpack_from("<I", head, pos + 12)
        elif cid == b"data":
            if rate is None or pos + 8 + clen > size:
                raise ValueError("no format chunk, or data past the end")
            return rate, clen
        pos += 8 + clen + (clen & 1)
    return None


READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def wav_ok(path: str | os.PathLike, *, sample_rate: int | None = None, min_bytes: int = 45,
           size: int | None = None, dir_fd: int | None = None) -> bool:
    """Cache check: a regular file (not a symlink) of at least ``min_bytes`` (exactly
    ``size`` when given), complete RIFF/WAVE, frames > 0, and the expected rate.

    One open (never following a symlink), one fstat and one read of 4 KiB: ≈ 5 µs for
    the usual 44-byte header, called once per cache hit."""
    try:
        fd = os.open(path, READ_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < min_bytes:
                return False
            if size is not None and st.st_size != size:
                return False
            head = os.read(fd, 4096)
            parsed = _riff_header(head, st.st_size)
            if parsed is None:   # not a plain header in the first 4 KiB: ask libsndfile
                os.lseek(fd, 0, os.SEEK_SET)
                with os.fdopen(os.dup(fd), "rb") as f:
                    info = sf.info(f)
                if info.frames <= 0:
                    return False
                rate = info.samplerate
            else:
                rate, data = parsed
                if data <= 0:
                    return False
        finally:
            os.close(fd)
    except (OSError, RuntimeError, ValueError, struct.error, TypeError):
        return False
    return sample_rate is None or rate == sample_rate


def wav_info(path: str | os.PathLike, dir_fd: int | None = None) -> tuple[int, int, float]:
    """(sample_rate, frames, seconds) of a WAV; OSError if missing, ValueError if unreadable."""
    fd = os.open(path, READ_FLAGS, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb") as f:
            info = sf.info(f)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a readable WAV file: {exc}") from None
    return info.samplerate, info.frames, info.frames / info.samplerate
