"""Files written safely: atomic writes, copies, links and output folders.

A file appears under its final name only when complete: the bytes go to a temp file
``.<name>.<8 hex>.tmp`` in the same folder (``O_EXCL``), then ``fsync(tmp)``, a rename
that never replaces an existing file (``renameat2(RENAME_NOREPLACE)``, else link +
unlink), and ``fsync(folder)`` (for a batch of WAVs, once per folder by the caller:
``sync_dir=False``). On any error the temp file is removed before the error
propagates, so a crash or a full disk leaves no partial file behind; temps left by a
``kill -9`` are removed by ``dispose.remove_stale_temps`` at start. Every output file
(``wav``, ``manifest``) and every moved input (``dispose``) is written through here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

from ttsd import crash
from ttsd.ingest.names import fit_name as _fit
from ttsd.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Buffer  # Python 3.12

log = get_logger(__name__)

NAME_MAX = 255
CHUNK = 1024 * 1024
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


# -- atomic primitives -----------------------------------------------------------------


def tmp_path(path: str | os.PathLike, dir_fd: int | None = None) -> str:
    """``.<name>.<8 hex>.tmp`` beside ``path``, within NAME_MAX bytes (with ``dir_fd``:
    the name alone, in that folder)."""
    p = Path(path)
    name = f".{_fit(p.name, NAME_MAX - 14)}.{secrets.token_hex(4)}.tmp"
    return name if dir_fd is not None else str(p.parent / name)


def lexists(path: str | os.PathLike, dir_fd: int | None = None) -> bool:
    """Whether anything (a symlink too, not followed) is at ``path``."""
    try:
        os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def fsync_dir(folder: str | os.PathLike, *, gone_ok: bool = False) -> None:
    """Make the links and renames made in ``folder`` durable (one call for many; skipped
    where directories cannot be synced). ``gone_ok``: a folder that cannot be opened
    any more (removed under us) is no error."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if gone_ok:
            return
        raise
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
        if lexists(dst, dir_fd):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    os.unlink(src, dir_fd=dir_fd)


def exists_error(path: str | os.PathLike) -> FileExistsError:
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
    if not overwrite and lexists(path, dir_fd):
        raise exists_error(path)
    tmp = tmp_path(path, dir_fd)
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
        remove_quietly(tmp, dir_fd)
        raise
    if sync_dir:
        if dir_fd is None:
            fsync_dir(Path(path).parent)
        else:
            _fsync_fd(dir_fd)
    return written


def remove_quietly(path: str | os.PathLike, dir_fd: int | None = None) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path, dir_fd=dir_fd)


# -- copies and links ------------------------------------------------------------------


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
        if not replace and lexists(dst, dst_dir_fd):
            raise exists_error(dst)
        tmp = tmp_path(dst, dst_dir_fd)
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
            remove_quietly(tmp, dst_dir_fd)
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
            if lexists(dst, dst_dir_fd):   # the same error, in the same order, as a copy
                raise exists_error(dst) from None
            raise
        if not stat.S_ISREG(st.st_mode):
            if lexists(dst, dst_dir_fd):
                raise exists_error(dst)
            raise ValueError(f"{src}: not a regular file")
    if link:
        try:
            os.link(src, dst, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise exists_error(dst) from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            log.debug("writer.link_failed", src=str(src), dst=str(dst), error=str(exc))
        else:
            if sync_dir:
                _sync_folder_of(dst, dst_dir_fd)
            return
    if lexists(dst, dst_dir_fd):
        raise exists_error(dst)
    copy_file(src, dst, dst_dir_fd=dst_dir_fd)
    if sync_dir:
        _sync_folder_of(dst, dst_dir_fd)


def _sync_folder_of(path: str | os.PathLike, dir_fd: int | None) -> None:
    if dir_fd is None:
        fsync_dir(Path(path).parent)
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
    tmp = tmp_path(dst)
    os.link(src, tmp, src_dir_fd=src_dir_fd, follow_symlinks=False)
    try:
        os.replace(tmp, dst)
    except BaseException:
        remove_quietly(tmp)
        raise


# -- output folders --------------------------------------------------------------------


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
