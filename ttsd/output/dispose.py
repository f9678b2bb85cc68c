"""Finished inputs leave the work folder: to done/, or to failed/ with NAME.error.txt.

A name already there gets ``-2``, ``-3``... as outbox folders do; the move is a rename
that never replaces, or a copy then unlink across filesystems. Temps left by a
``kill -9`` are removed at start (``remove_stale_temps``).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from ttsd.ingest.names import fit_name as _fit
from ttsd.log import get_logger
from ttsd.output.fsio import (
    NAME_MAX,
    copy_file,
    fsync_dir,
    remove_quietly,
    rename_noreplace,
    tmp_path,
    write_atomic,
)

log = get_logger(__name__)

ERROR_SUFFIX = ".error.txt"


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
    tmp = tmp_path(dst)
    if stat.S_ISREG(st.st_mode):
        copy_file(src, dst)
        fsync_dir(dst.parent)
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
            remove_quietly(tmp)
            raise
        fsync_dir(dst.parent)
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
    adding "-2", "-3"… before the suffix rather than overwrite. With ``error``,
    ``<final name>.error.txt`` (the reason, led by ``name`` unless it already is) is
    written beside it first, so the input is never there without its reason. Symlinks and FIFOs are renamed, never
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
                remove_quietly(note)
            continue
        except BaseException:
            if error is not None:
                remove_quietly(note)
            raise
        fsync_dir(folder)
        fsync_dir(path.parent)
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
