"""Writer: WAV files, manifests and input disposition, every one of them atomic.

A file appears under its final name only when complete: the bytes go to a temp file
``.<name>.<8 hex>.tmp`` in the same folder (``O_EXCL``), then ``fsync(tmp)``, a rename
that never replaces an existing file (``renameat2(RENAME_NOREPLACE)``, else link +
unlink), and ``fsync(folder)`` (for a batch of WAVs, once per folder by the caller:
``sync_dir=False``). On any error the temp file is removed before the error
propagates, so a crash or a full disk leaves no partial file behind; temps left by a
``kill -9`` are removed by ``remove_stale_temps`` at start. Only this module imports
soundfile.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import fcntl
import functools
import io
import operator
import os
import secrets
import stat
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import soundfile as sf

from ttsd import crash
from ttsd.log import get_logger
from ttsd.ingest.names import csv_cell
from ttsd.ingest.names import fit_name as _fit

if TYPE_CHECKING:
    from collections.abc import Buffer  # Python 3.12

log = get_logger(__name__)

NAME_MAX = 255
ERROR_SUFFIX = ".error.txt"
MANIFEST_COLUMNS = ("id", "line", "text", "wav", "seconds", "cached", "error")
MANIFEST = "manifest.csv"
CHUNK = 1024 * 1024
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


@dataclass(frozen=True)
class ManifestRow:
    """One line of ``manifest.csv``."""

    id: str
    line: int
    text: str
    wav: str
    """WAV file name relative to the manifest's folder ('' when the line failed)."""
    seconds: float | None
    cached: bool
    error: str


# -- atomic primitives -----------------------------------------------------------------


def _tmp_path(path: str | os.PathLike, dir_fd: int | None = None) -> str:
    """``.<name>.<8 hex>.tmp`` beside ``path``, within NAME_MAX bytes (with ``dir_fd``:
    the name alone, in that folder)."""
    p = Path(path)
    name = f".{_fit(p.name, NAME_MAX - 14)}.{secrets.token_hex(4)}.tmp"
    return name if dir_fd is not None else str(p.parent / name)


def _lexists(path: str | os.PathLike, dir_fd: int | None = None) -> bool:
    """Whether anything (a symlink too, not followed) is at ``path``."""
    try:
        os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (skipped where directories cannot be synced)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _fsync_fd(fd: int) -> None:
    """fsync an open folder (skipped where directories cannot be synced)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2, or None where it does not exist (non-Linux, old glibc)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike,
                     dir_fd: int | None = None) -> None:
    """Rename ``src`` to ``dst`` (both in the folder ``dir_fd`` when given), raising
    FileExistsError instead of replacing ``dst``.

    Atomic through renameat2(RENAME_NOREPLACE); where the filesystem lacks it, a hard
    link then unlink; where links are unsupported too, an existence check then rename.
    Works for symlinks and FIFOs (nothing is opened). EXDEV propagates.
    """
    fn = _renameat2()
    if fn is not None:
        at = _AT_FDCWD if dir_fd is None else dir_fd
        if fn(at, os.fsencode(src), at, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.EXDEV, errno.ENOENT):
            raise
        if _lexists(dst, dir_fd):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    os.unlink(src, dir_fd=dir_fd)


def _exists_error(path: str | os.PathLike) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "will not overwrite an existing file", str(path))


def _write_all(fd: int, data: bytes | Sequence[Buffer]) -> int:
    """Write ``data`` (bytes, or buffers one after another: writev, which copies none of
    them into one bytes object first); returns the byte count."""
    parts = [memoryview(data).cast("B")] if isinstance(data, (bytes, bytearray, memoryview)) \
        else [memoryview(p).cast("B") for p in data]
    total = sum(len(p) for p in parts)
    while parts:
        n = os.writev(fd, parts) if len(parts) > 1 else os.write(fd, parts[0])
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if parts and n:
            parts[0] = parts[0][n:]
    return total


def write_atomic(path: str | os.PathLike, data: bytes | Sequence[Buffer], *,
                 overwrite: bool = False, crash_at: str | None = None, sync_dir: bool = True,
                 dir_fd: int | None = None) -> int:
    """Write ``data`` (bytes, or buffers one after another) to ``path`` atomically and
    durably; returns the byte count. With ``dir_fd``, ``path`` is a name in that folder
    (``Folder``): nothing is looked up through a path that may have changed.

    FileExistsError if ``path`` exists and not ``overwrite``. No temp file survives an
    error (ENOSPC and EIO propagate as OSError after cleanup). ``crash_at`` names the
    crash point (ttsd.crash) reached once the temp file is written and synced, before
    the rename. ``sync_dir=False``: the data is still fsynced before the rename, but
    the rename itself is durable only once the caller fsyncs the folder (``fsync_dir``,
    once for a whole batch), which it must do before it relies on the file.
    """
    if not overwrite and _lexists(path, dir_fd):
        raise _exists_error(path)
    tmp = _tmp_path(path, dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dir_fd)
    try:
        try:
            written = _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if crash_at:
            crash.point(crash_at)
        if overwrite:
            os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            rename_noreplace(tmp, path, dir_fd)
    except BaseException:
        _remove_quietly(tmp, dir_fd)
        raise
    if sync_dir:
        if dir_fd is None:
            _fsync_dir(Path(path).parent)
        else:
            _fsync_fd(dir_fd)
    return written


def _remove_quietly(path: str | os.PathLike, dir_fd: int | None = None) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path, dir_fd=dir_fd)


# -- WAV -------------------------------------------------------------------------------


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


_WAV_PCM16_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
"""RIFF/WAVE with one 16-byte ``fmt `` chunk (PCM, mono, 16-bit) then ``data``: the
44 bytes libsndfile writes for a mono PCM_16 WAV (no PEAK, fact or LIST chunk)."""
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
        if not overwrite and _lexists(path, dir_fd):
            raise _exists_error(path)
        data = encode_wav(samples, sample_rate, subtype)
    written = write_atomic(path, data, overwrite=overwrite, crash_at="after_tmp",
                           sync_dir=sync_dir, dir_fd=dir_fd)
    log.debug("writer.wav", path=str(path), bytes=written)
    return written


_FICLONE = 0x40049409
"""ioctl FICLONE: make the destination share the source's blocks, copy-on-write."""
_NO_REFLINK: set[int] = set()
"""Devices where a clone was refused (ext4, tmpfs…): copied without trying again."""


def _clone(sfd: int, dfd: int, dev: int) -> bool:
    """Make ``dfd`` a copy-on-write clone of ``sfd`` where the file system can (XFS with
    reflink, btrfs, bcachefs): no data is written, and a write to either file later
    copies the blocks it touches. False where it cannot (remembered per device)."""
    if dev in _NO_REFLINK:
        return False
    try:
        fcntl.ioctl(dfd, _FICLONE, sfd)
    except OSError:
        _NO_REFLINK.add(dev)
        return False
    return True


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, *, src_dir_fd: int | None = None,
              dst_dir_fd: int | None = None, replace: bool = False, sync: bool = True) -> int:
    """Make ``dst`` a copy of the regular file ``src`` that shares nothing with it: a
    clone where the file system has them, else a copy of the bytes (copy_file_range);
    written to a temp beside ``dst``, fsynced (unless not ``sync``), size-checked and
    renamed without replacing (``replace``: over whatever is there). Nothing done to
    one file afterwards changes the other. No folder fsync (the caller's). Returns the
    size. FileNotFoundError if ``src`` is gone, ValueError if it is not a regular file
    (a symlink is never followed), FileExistsError if ``dst`` exists and not
    ``replace``; no temp survives an error."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                  dir_fd=src_dir_fd)
    try:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{src}: not a regular file")
        if not replace and _lexists(dst, dst_dir_fd):
            raise _exists_error(dst)
        tmp = _tmp_path(dst, dst_dir_fd)
        dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o644, dir_fd=dst_dir_fd)
        try:
            try:
                if not _clone(sfd, dfd, os.fstat(dfd).st_dev):
                    _copy_bytes(sfd, dfd, st.st_size)
                if sync:
                    os.fsync(dfd)
                size = os.fstat(dfd).st_size
            finally:
                os.close(dfd)
            if size != st.st_size:
                raise OSError(errno.EIO, f"copy of {src} has {size} bytes, expected {st.st_size}")
            if replace:
                os.replace(tmp, dst, src_dir_fd=dst_dir_fd, dst_dir_fd=dst_dir_fd)
            else:
                rename_noreplace(tmp, dst, dst_dir_fd)
        except BaseException:
            _remove_quietly(tmp, dst_dir_fd)
            raise
    finally:
        os.close(sfd)
    return size


def _copy_bytes(sfd: int, dfd: int, size: int) -> None:
    """``size`` bytes from ``sfd`` to ``dfd``: copy_file_range (in the kernel), else reads
    and writes."""
    left = size
    try:
        while left > 0:
            n = os.copy_file_range(sfd, dfd, left)
            if n == 0:
                break
            left -= n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(sfd, size - left, os.SEEK_SET)
    while chunk := os.read(sfd, CHUNK):
        _write_all(dfd, chunk)


def fsync_dir(folder: Path) -> None:
    """Make the links and renames made in ``folder`` durable (one call for many)."""
    _fsync_dir(Path(folder))


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike, *, link: bool = True,
                 sync_dir: bool = True, checked: bool = False, dst_dir_fd: int | None = None
                 ) -> None:
    """Put a cached WAV at ``dst``: a copy that shares nothing with it (``copy_file``),
    or with ``link`` a hard link (else, on another device or without link support, a
    copy all the same). Never overwrites ``dst``. ``sync_dir=False``: the caller fsyncs
    the folder itself (once for a whole batch) before recording the line as done.
    ``checked``: the caller has just lstat'ed ``src`` and found a regular file (a cache
    hit's entry check), so a link is tried at once (a missing ``src`` still raises
    FileNotFoundError).

    Raises FileExistsError if ``dst`` exists, FileNotFoundError if ``src`` is gone,
    ValueError if ``src`` is not a regular file (a symlink is never followed).
    A link is one lstat and one link(2) (≈ 10 µs); a copy reads and writes the file and
    fsyncs it, or clones it where the file system can.
    """
    if link and not checked:
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            if _lexists(dst, dst_dir_fd):   # the same error, in the same order, as a copy
                raise _exists_error(dst) from None
            raise
        if not stat.S_ISREG(st.st_mode):
            if _lexists(dst, dst_dir_fd):
                raise _exists_error(dst)
            raise ValueError(f"{src}: not a regular file")
    if link:
        try:
            os.link(src, dst, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise _exists_error(dst) from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            log.debug("writer.link_failed", src=str(src), dst=str(dst), error=str(exc))
        else:
            if sync_dir:
                _sync_folder_of(dst, dst_dir_fd)
            return
    if _lexists(dst, dst_dir_fd):
        raise _exists_error(dst)
    copy_file(src, dst, dst_dir_fd=dst_dir_fd)
    if sync_dir:
        _sync_folder_of(dst, dst_dir_fd)


def _sync_folder_of(path: str | os.PathLike, dir_fd: int | None) -> None:
    if dir_fd is None:
        _fsync_dir(Path(path).parent)
    else:
        _fsync_fd(dir_fd)


def replace_with_link(src: str | os.PathLike, dst: str | os.PathLike, *,
                      link: bool = True, src_dir_fd: int | None = None) -> None:
    """Make ``dst`` (a file of ttsd's own cache, never an output) ``src``'s bytes: a copy
    (``copy_file``) or with ``link`` a hard link, made under a temp name beside it and
    renamed over whatever ``dst`` was (a damaged, stale or foreign file, or a symlink,
    which is replaced, not followed). No folder fsync: a lost cache file is a miss."""
    if not link:
        copy_file(src, dst, src_dir_fd=src_dir_fd, replace=True)
        return
    tmp = _tmp_path(dst)
    os.link(src, tmp, src_dir_fd=src_dir_fd, follow_symlinks=False)
    try:
        os.replace(tmp, dst)
    except BaseException:
        _remove_quietly(tmp)
        raise


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


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def wav_ok(path: str | os.PathLike, *, sample_rate: int | None = None, min_bytes: int = 45,
           size: int | None = None, dir_fd: int | None = None) -> bool:
    """Cache check: a regular file (not a symlink) of at least ``min_bytes`` (exactly
    ``size`` when given), complete RIFF/WAVE, frames > 0, and the expected rate.

    One open (never following a symlink), one fstat and one read of 4 KiB: ≈ 5 µs for
    the usual 44-byte header, called once per cache hit."""
    try:
        fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
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
    fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb") as f:
            info = sf.info(f)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a readable WAV file: {exc}") from None
    return info.samplerate, info.frames, info.frames / info.samplerate


# -- manifest --------------------------------------------------------------------------


def manifest_bytes(rows: Iterable[ManifestRow]) -> bytes:
    """The manifest as UTF-8 CSV (RFC 4180: CRLF records, so a CR or LF inside a cell is
    always quoted)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(MANIFEST_COLUMNS)
    for r in rows:
        writer.writerow([
            csv_cell(r.id), r.line, csv_cell(r.text), csv_cell(r.wav),
            "" if r.seconds is None else f"{r.seconds:.3f}",
            "true" if r.cached else "false", csv_cell(r.error),
        ])
    return out.getvalue().encode("utf-8")


def write_manifest(folder: Folder, rows: Iterable[ManifestRow]) -> None:
    """Write (or atomically replace) ``manifest.csv`` in ``folder``. An OSError names
    the manifest's full path (the write itself goes through the folder's descriptor)."""
    try:
        write_atomic(MANIFEST, manifest_bytes(rows), overwrite=True, dir_fd=folder.fd)
    except OSError as exc:
        exc.filename, exc.filename2 = str(folder.path / MANIFEST), None
        raise
    log.debug("writer.manifest", folder=str(folder.path))


class NotAFolderError(OSError):
    """An output folder's name is taken by something that is not a folder (a symbolic
    link swapped in, a file): ttsd does not write through it."""


class Folder:
    """An output folder (``outbox/<name>``), made if missing and opened once; every
    file in it is written, linked, read and synced through its descriptor, so a folder
    swapped for a symbolic link after it was opened is never written through, and one
    swapped before is refused (``NotAFolderError``)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True) -> Folder:
        """Open ``path``: its parent as it is (the outbox as configured), its last
        component never through a symbolic link."""
        path = Path(path)
        if create:
            os.makedirs(path.parent, exist_ok=True)
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path.name, 0o777, dir_fd=parent)
            try:
                fd = os.open(path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=parent)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise NotAFolderError(errno.ENOTDIR, "not a folder (a symbolic link or a file "
                                      "is in its place); ttsd does not write through it",
                                      str(path)) from None
        finally:
            os.close(parent)
        return cls(path, fd)

    def sync(self) -> None:
        _fsync_fd(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- input disposition -----------------------------------------------------------------


def _candidates(name: str) -> Iterable[str]:
    """``name``, ``stem-2.suffix``, ``stem-3.suffix``… (the scheme of the outbox's
    folders: ``outbox/stem-2/``), each leaving room for ``.error.txt`` within NAME_MAX
    bytes."""
    limit = NAME_MAX - len(ERROR_SUFFIX)
    dot = name.rfind(".")
    stem, suffix = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    yield _fit(name, limit)
    for k in range(2, 100_000):
        tag = f"-{k}{suffix}"
        yield _fit(stem, limit - len(os.fsencode(tag))) + tag
    raise FileExistsError(errno.EEXIST, "no free name left", name)


def _move_across(src: Path, dst: Path) -> None:
    """Cross-device move without following or opening anything but a regular file."""
    st = os.lstat(src)
    tmp = _tmp_path(dst)
    if stat.S_ISREG(st.st_mode):
        copy_file(src, dst)
        _fsync_dir(dst.parent)
    else:
        try:
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), tmp)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(tmp, 0o600)
            else:  # sockets, devices, directories: keep a named placeholder
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o600))
            rename_noreplace(tmp, dst)
        except BaseException:
            _remove_quietly(tmp)
            raise
        _fsync_dir(dst.parent)
    if stat.S_ISDIR(st.st_mode):
        os.rmdir(src)
    else:
        os.unlink(src)


def _error_text(name: str, error: str) -> str:
    """The error file's text: the reason, led by the input's name unless it already is."""
    text = error.strip("\n")
    if not text.startswith(name):
        text = f"{name}: {text}"
    return text + "\n"


def dispose(path: Path, folder: Path, name: str, *, error: str | None = None) -> Path:
    """Move an input out of the work folder into ``folder`` (done/ or failed/) as ``name``,
    adding "-2", "-3"… before the suffix rather than overwrite. With ``error``, ``<final name>.error.txt``
    (the reason, led by ``name`` unless it already is) is written beside it first, so the
    input is never there without its reason. Symlinks and FIFOs are renamed, never
    opened; across filesystems they are recreated, regular files copied. Returns the path.
    """
    path, folder = Path(path), Path(folder)
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    folder.mkdir(parents=True, exist_ok=True)
    for candidate in _candidates(name):
        dst = folder / candidate
        note = folder / (candidate + ERROR_SUFFIX)
        if os.path.lexists(dst) or (error is not None and os.path.lexists(note)):
            continue
        if error is not None:
            try:
                write_atomic(note, _error_text(name, error).encode("utf-8"))
            except FileExistsError:
                continue
        try:
            try:
                rename_noreplace(path, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _move_across(path, dst)
        except FileExistsError:
            if error is not None:
                _remove_quietly(note)
            continue
        except BaseException:
            if error is not None:
                _remove_quietly(note)
            raise
        _fsync_dir(folder)
        _fsync_dir(path.parent)
        log.info("writer.disposed", name=name, to=str(dst), failed=error is not None)
        return dst
    raise AssertionError("unreachable")  # pragma: no cover - _candidates raises first


def remove_stale_temps(folder: Path, older_than_s: float = 0.0) -> int:
    """Remove ``.*.tmp`` files under ``folder`` (recursively, links not followed) that a
    crash left behind; returns how many. Call at start, before any writer runs; in a
    folder other processes write too (the shared voice cache), only temps untouched
    for ``older_than_s``."""
    removed = 0
    cutoff = time.time() - older_than_s
    for root, _dirs, files in os.walk(folder, followlinks=False):
        for fname in files:
            if fname.startswith(".") and fname.endswith(".tmp") and len(fname) > 5:
                path = os.path.join(root, fname)
                try:
                    if older_than_s and os.lstat(path).st_mtime > cutoff:
                        continue
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    continue
    if removed:
        log.info("writer.stale_temps_removed", folder=str(folder), count=removed)
    return removed
