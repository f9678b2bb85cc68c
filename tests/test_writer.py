"""Outputs (ttsd.output): atomic WAVs, cache copies and links, manifests, disposition
(docs/reliability.md: formula-cells, atomic-wav, disk-full-outbox, damaged-cache-file and
input-disposition)."""

from __future__ import annotations

import csv
import errno
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import ttsd.output.fsio as writer
from ttsd.output import dispose as dispose_module
from ttsd.output import wav
from ttsd.output.dispose import dispose, remove_stale_temps
from ttsd.output.fsio import Folder, link_or_copy, rename_noreplace, replace_with_link
from ttsd.output.manifest import ManifestRow, write_manifest
from ttsd.output.wav import wav_info, wav_ok, write_wav

SR = 22050


def tone(seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(SR * seconds), dtype=np.float32) / SR
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def temps(folder: Path) -> list[str]:
    return [n for _, _, files in os.walk(folder) for n in files if n.endswith(".tmp")]


def run_with_timeout(fn: Callable[[], object], timeout: float = 5.0) -> object:
    """Run ``fn`` in a daemon thread; fail (instead of hanging) if it blocks."""
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked (a FIFO opened?)"
    return box[0]


# -- WAV -------------------------------------------------------------------------------


def test_write_wav_roundtrip_and_clip(tmp_path: Path) -> None:
    """atomic-wav: the returned size is the file's; samples are clipped to [-1, 1]."""
    x = tone()
    x[:10] = 3.0
    x[10:20] = -3.0
    out = tmp_path / "0001.wav"
    n = write_wav(out, x, SR)
    assert n == out.stat().st_size
    y, sr = sf.read(out, dtype="float32")
    assert sr == SR and y.shape == x.shape
    assert y.max() <= 1.0 and y.min() >= -1.0
    assert np.allclose(y[20:], x[20:], atol=1 / 16000)
    assert wav_info(out) == (SR, len(x), len(x) / SR)
    assert temps(tmp_path) == []
    for subtype in ("PCM_24", "PCM_32", "FLOAT"):
        p = tmp_path / f"{subtype}.wav"
        write_wav(p, x, SR, subtype)
        assert sf.info(str(p)).subtype == subtype and wav_ok(p, sample_rate=SR)


def test_write_wav_never_overwrites(tmp_path: Path) -> None:
    """id-collision and atomic-wav: an existing WAV is never replaced unless asked."""
    out = tmp_path / "a.wav"
    write_wav(out, tone(0.1), SR)
    before = out.read_bytes()
    with pytest.raises(FileExistsError):
        write_wav(out, tone(0.2), SR)
    assert out.read_bytes() == before
    write_wav(out, tone(0.2), SR, overwrite=True)
    assert wav_info(out)[1] == int(SR * 0.2)
    assert temps(tmp_path) == []


def test_write_wav_rejects_nan_and_bad_shapes(tmp_path: Path) -> None:
    """nan-audio: NaN/Inf audio is never written; nothing is left behind."""
    out = tmp_path / "nan.wav"
    for bad in (np.array([0.1, np.nan], dtype=np.float32),
                np.array([np.inf], dtype=np.float32), np.zeros((2, 10), dtype=np.float32)):
        with pytest.raises(ValueError):
            write_wav(out, bad, SR)
    assert list(tmp_path.iterdir()) == []


def test_tmp_is_hidden_in_same_folder_and_final_appears_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """atomic-wav: order is write → fsync(tmp) → rename → fsync(dir); the tmp is
    ".<name>.*.tmp" in the same folder, and the final name does not exist until the data
    is synced."""
    out = tmp_path / "sub" / "0001.wav"
    out.parent.mkdir()
    calls: list[tuple[str, list[str]]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((target, sorted(os.listdir(out.parent))))
        real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", spy)
    write_wav(out, tone(0.1), SR)
    (tmp_target, listing), (dir_target, after) = calls
    tmp_name = Path(tmp_target).name
    assert Path(tmp_target).parent == out.parent
    assert tmp_name.startswith(".0001.wav.") and tmp_name.endswith(".tmp")
    assert listing == [tmp_name], "final name must not exist before fsync(tmp)"
    assert Path(dir_target) == out.parent and after == ["0001.wav"]


def test_concurrent_reader_never_sees_partial_wav(tmp_path: Path) -> None:
    """atomic-wav: a reader polling the folder while 40 WAVs are written only ever sees
    complete files under a .wav name."""
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            for name in os.listdir(tmp_path):
                if name.endswith(".wav") and not wav_ok(tmp_path / name, sample_rate=SR):
                    bad.append(name)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(40):
            write_wav(tmp_path / f"{i:04d}.wav", tone(1.0), SR)
    finally:
        stop.set()
        t.join()
    assert bad == []
    assert temps(tmp_path) == []


def test_crash_inside_soundfile_leaves_nothing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """atomic-wav: an exception raised inside soundfile's write (after it wrote some bytes)
    leaves no partial WAV and no tmp. (PCM_24: PCM_16 no longer goes through soundfile;
    its own encoder is covered by the next test.)"""
    def exploding(file: object, data: object, *args: object, **kw: object) -> None:
        file.write(b"RIFF\x00\x00")  # type: ignore[attr-defined]
        raise RuntimeError("simulated crash inside libsndfile")

    monkeypatch.setattr(sf, "write", exploding)
    with pytest.raises(RuntimeError, match="simulated"):
        write_wav(tmp_path / "x.wav", tone(0.1), SR, "PCM_24")
    assert list(tmp_path.iterdir()) == []


def test_crash_inside_pcm16_encoder_leaves_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """atomic-wav: the same for the PCM_16 encoder (numpy, no soundfile)."""
    def exploding(clipped: object) -> None:
        raise MemoryError("simulated crash inside the PCM_16 encoder")

    monkeypatch.setattr(wav, "pcm16", exploding)
    with pytest.raises(MemoryError, match="simulated"):
        write_wav(tmp_path / "x.wav", tone(0.1), SR)
    assert list(tmp_path.iterdir()) == []


def _fail_tmp_writes(monkeypatch: pytest.MonkeyPatch, err: int, after_bytes: int = 100) -> None:
    """Make os.write (and copy_file_range) into any *.tmp file write ``after_bytes`` and
    then fail with ``err``."""
    real_write = os.write

    def write(fd: int, data: object) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            written = os.fstat(fd).st_size
            if written >= after_bytes:
                raise OSError(err, os.strerror(err))
            return real_write(fd, bytes(data)[: after_bytes - written])  # type: ignore[arg-type]
        return real_write(fd, data)  # type: ignore[arg-type]

    real_copy = os.copy_file_range

    def copy_file_range(src: int, dst: int, count: int, *args: object) -> int:
        if os.readlink(f"/proc/self/fd/{dst}").endswith(".tmp"):
            written = os.fstat(dst).st_size
            if written >= after_bytes:
                raise OSError(err, os.strerror(err))
            count = min(count, after_bytes - written)
        return real_copy(src, dst, count, *args)

    monkeypatch.setattr(writer.os, "write", write)
    monkeypatch.setattr(writer.os, "copy_file_range", copy_file_range)


def test_disk_full_wav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """disk-full-outbox: ENOSPC mid-write → OSError(ENOSPC) after cleanup; no partial
    file, no tmp; the same write succeeds once space is back."""
    _fail_tmp_writes(monkeypatch, errno.ENOSPC)
    out = tmp_path / "full.wav"
    with pytest.raises(OSError) as info:
        write_wav(out, tone(0.5), SR)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_wav(out, tone(0.5), SR)
    assert wav_ok(out, sample_rate=SR)


def test_io_error_on_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """disk-full-outbox: EIO from fsync(tmp) → OSError; the final name never appears."""
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer.os, "fsync", broken)
    with pytest.raises(OSError) as info:
        write_wav(tmp_path / "x.wav", tone(0.1), SR)
    assert info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_wav_ok_detects_damage(tmp_path: Path) -> None:
    """damaged-cache-file: deleted, truncated to 44 B, truncated mid-data, garbage, symlink,
    directory,
    wrong rate and wrong expected size all fail the cache check."""
    good = tmp_path / "good.wav"
    size = write_wav(good, tone(0.5), SR)
    assert wav_ok(good) and wav_ok(good, sample_rate=SR) and wav_ok(good, size=size)
    assert not wav_ok(good, sample_rate=16000)
    assert not wav_ok(good, size=size + 1)

    gone = tmp_path / "gone.wav"
    write_wav(gone, tone(0.1), SR)
    gone.unlink()
    assert not wav_ok(gone)

    for cut in (44, 1000, size // 2):
        p = tmp_path / f"cut{cut}.wav"
        p.write_bytes(good.read_bytes()[:cut])
        assert not wav_ok(p), cut

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(os.urandom(4096))
    assert not wav_ok(garbage)
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, dtype=np.float32), SR)
    assert not wav_ok(empty)
    link = tmp_path / "link.wav"
    link.symlink_to(good)
    assert not wav_ok(link)
    (tmp_path / "dir.wav").mkdir()
    assert not wav_ok(tmp_path / "dir.wav")
    with pytest.raises(ValueError):
        wav_info(garbage)
    with pytest.raises(FileNotFoundError):
        wav_info(gone)


def test_wav_ok_reads_headers_like_libsndfile(tmp_path: Path) -> None:
    """damaged-cache-file: the cache check parses the RIFF header itself (no libsndfile open); it
    must agree with libsndfile on every format ttsd writes, on chunks before the data
    (also past the first 4 KiB) and on headers that lie about their data."""
    import struct

    for subtype in ("PCM_16", "PCM_24", "PCM_32", "FLOAT"):
        p = tmp_path / f"{subtype}.wav"
        write_wav(p, tone(0.3), SR, subtype)
        assert wav_ok(p, sample_rate=SR) and not wav_ok(p, sample_rate=SR // 2), subtype
        assert sf.info(str(p)).samplerate == SR

    good = (tmp_path / "PCM_16.wav").read_bytes()
    fmt_end = 12 + 8 + struct.unpack("<I", good[16:20])[0]
    for junk_len in (10, 6000):   # a LIST chunk before the data; past 4 KiB → libsndfile
        junk = b"LIST" + struct.pack("<I", junk_len) + b"\0" * junk_len
        body = good[12:fmt_end] + junk + good[fmt_end:]
        p = tmp_path / f"junk{junk_len}.wav"
        p.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body)
        assert sf.info(str(p)).frames > 0
        assert wav_ok(p, sample_rate=SR), junk_len
        assert not wav_ok(p, sample_rate=16000), junk_len

    lying = bytearray(good)   # data chunk claims more bytes than the file has
    data_at = good.index(b"data")
    lying[data_at + 4:data_at + 8] = struct.pack("<I", len(good))
    p = tmp_path / "lying.wav"
    p.write_bytes(bytes(lying))
    assert not wav_ok(p)
    no_fmt = good[:12] + good[fmt_end:]   # no fmt chunk at all
    p = tmp_path / "nofmt.wav"
    p.write_bytes(no_fmt[:4] + struct.pack("<I", len(no_fmt) - 8) + no_fmt[8:])
    assert not wav_ok(p)


# -- cache hits ------------------------------------------------------------------------


def test_link_or_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """damaged-cache-file and id-collision: ``link_or_copy`` hard-links (``cache.link``),
    or copies (verified) when asked to or when linking fails; never overwrites; never
    follows a symlinked source."""
    cache = tmp_path / "cache" / "ab.wav"
    cache.parent.mkdir()
    write_wav(cache, tone(0.2), SR)
    out = tmp_path / "out"
    out.mkdir()

    link_or_copy(cache, out / "a.wav")
    assert (out / "a.wav").stat().st_ino == cache.stat().st_ino
    link_or_copy(cache, out / "b.wav", link=False)
    assert (out / "b.wav").stat().st_ino != cache.stat().st_ino
    assert (out / "b.wav").read_bytes() == cache.read_bytes()

    def cross_device(*args: object, **kw: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with monkeypatch.context() as m:
        m.setattr(writer.os, "link", cross_device)
        link_or_copy(cache, out / "c.wav")
    assert (out / "c.wav").read_bytes() == cache.read_bytes()
    assert (out / "c.wav").stat().st_ino != cache.stat().st_ino

    with pytest.raises(FileExistsError):
        link_or_copy(cache, out / "a.wav", link=False)
    with pytest.raises(FileNotFoundError):
        link_or_copy(tmp_path / "cache" / "missing.wav", out / "d.wav")
    sym = tmp_path / "cache" / "sym.wav"
    sym.symlink_to("/etc/hostname")
    with pytest.raises(ValueError):
        link_or_copy(sym, out / "e.wav")
    assert sorted(os.listdir(out)) == ["a.wav", "b.wav", "c.wav"]


def test_replace_with_link_repairs_a_cache_file(tmp_path: Path) -> None:
    """damaged-cache-file: the cache file of an evicted entry (truncated, or a symlink planted in
    its place) is replaced by the fresh WAV in one rename; a symlink's target and other
    links to the old inode are left alone; no temp file stays."""
    fresh = tmp_path / "out" / "0001.wav"
    fresh.parent.mkdir()
    write_wav(fresh, tone(0.2), SR)
    cache = tmp_path / "cache"
    cache.mkdir()
    old = cache / "k1.wav"
    write_wav(old, tone(0.3), SR)
    other = tmp_path / "out" / "old-link.wav"
    os.link(old, other)
    os.truncate(old, 44)
    replace_with_link(fresh, old)
    assert old.stat().st_ino == fresh.stat().st_ino and wav_ok(old, sample_rate=SR)
    assert other.stat().st_size == 44
    target = tmp_path / "target.wav"
    target.write_bytes(b"keep")
    sym = cache / "k2.wav"
    sym.symlink_to(target)
    replace_with_link(fresh, sym, link=False)
    assert not sym.is_symlink() and sym.read_bytes() == fresh.read_bytes()
    assert target.read_bytes() == b"keep"
    assert sorted(os.listdir(cache)) == ["k1.wav", "k2.wav"]


def test_copy_disk_full_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """disk-full-outbox: ENOSPC while copying a cache hit → OSError; no partial WAV, no tmp."""
    cache = tmp_path / "hit.wav"
    write_wav(cache, tone(1.0), SR)
    out = tmp_path / "out"
    out.mkdir()
    _fail_tmp_writes(monkeypatch, errno.ENOSPC, after_bytes=1000)
    with pytest.raises(OSError) as info:
        link_or_copy(cache, out / "x.wav", link=False)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(out) == []


# -- manifest --------------------------------------------------------------------------


def test_manifest_columns_and_formula_guard(tmp_path: Path) -> None:
    """formula-cells: id, text, wav and error cells starting with = + - @ TAB CR get a "'"."""
    rows = [
        ManifestRow("0001", 1, "Hello, world", "0001.wav", 1.23456, False, "", 22050, -16.004),
        ManifestRow("=HYPERLINK(\"http://x\")", 2, "@SUM(A1)", "", None, False,
                    "-bad speed"),
        ManifestRow("+1", 3, "\t=1+1", "x.wav", 0.5, True, "\rx"),
        ManifestRow("a\nb", 4, 'quote " and , comma', "y.wav", 2.0, True, ""),
        ManifestRow("s", 5, "<b>x</b>", "s.wav", 1.0, False, "", markup=True,
                    said="=[[ x ]]"),
    ]
    folder = Folder.open(tmp_path / "out")
    path = folder.path / "manifest.csv"
    write_manifest(folder, rows)
    with open(path, newline="", encoding="utf-8") as f:
        got = list(csv.reader(f))
    assert got[0] == ["id", "line", "text", "wav", "seconds", "cached", "error", "format",
                      "sample_rate", "lufs", "timestamps", "markup", "said"]
    assert got[1] == ["0001", "1", "Hello, world", "0001.wav", "1.235", "false", "", "wav",
                      "22050", "-16.00", "", "", ""]
    assert got[2] == ["'=HYPERLINK(\"http://x\")", "2", "'@SUM(A1)", "", "", "false",
                      "'-bad speed", "", "", "", "", "", ""]
    assert got[3] == ["'+1", "3", "'\t=1+1", "x.wav", "0.500", "true", "'\rx", "wav", "", "",
                      "", "", ""]
    assert got[5][-2:] == ["ssml", "'=[[ x ]]"]
    assert got[4] == ["a\nb", "4", 'quote " and , comma', "y.wav", "2.000", "true", "", "wav",
                      "", "", "", "", ""]
    write_manifest(folder, rows[:1])  # rewriting replaces atomically
    folder.close()
    assert len(path.read_text().splitlines()) == 2
    assert temps(tmp_path) == []


# -- disposition -----------------------------------------------------------------------


def test_dispose_done_and_failed(tmp_path: Path) -> None:
    """input-disposition: inputs move to done/ or failed/ (+ NAME.error.txt); names never
    overwritten."""
    work = tmp_path / "work"
    work.mkdir()
    done, failed = tmp_path / "done", tmp_path / "failed"
    finals = []
    for i in range(3):
        src = work / f"{i:016x}--chapter1.txt"
        src.write_text(f"v{i}\n")
        finals.append(dispose(src, done, "chapter1.txt"))
    assert [p.name for p in finals] == ["chapter1.txt", "chapter1-2.txt", "chapter1-3.txt"]
    assert [p.read_text() for p in finals] == ["v0\n", "v1\n", "v2\n"]
    assert list(work.iterdir()) == []

    src = work / "0000000000000000--bad.csv"
    src.write_bytes(b"\x00\x01")
    out = dispose(src, failed, "bad.csv", error="bad.csv: binary file (NUL at byte 0)")
    assert out == failed / "bad.csv" and out.read_bytes() == b"\x00\x01"
    assert (failed / "bad.csv.error.txt").read_text() == "bad.csv: binary file (NUL at byte 0)\n"

    # a stale error file alone also blocks the name: the reason never goes to the wrong input
    (failed / "x.txt.error.txt").write_text("old\n")
    src = work / "1111111111111111--x.txt"
    src.write_text("x")
    out = dispose(src, failed, "x.txt", error="x.txt, line 3: too long")
    assert out.name == "x-2.txt"
    assert (failed / "x-2.txt.error.txt").read_text() == "x.txt, line 3: too long\n"
    assert (failed / "x.txt.error.txt").read_text() == "old\n"
    assert temps(tmp_path) == []


def test_dispose_symlink_fifo_and_odd_names(tmp_path: Path) -> None:
    """not-a-regular-file and input-disposition: a symlink or FIFO is renamed as itself (never
    followed or opened);
    suffix-less, hidden and very long names work."""
    work, failed = tmp_path / "work", tmp_path / "failed"
    work.mkdir()
    link = work / "a--a.txt"
    link.symlink_to("/etc/hostname")
    fifo = work / "b--c.txt"
    os.mkfifo(fifo)
    out1 = run_with_timeout(lambda: dispose(link, failed, "a.txt", error="a symbolic link"))
    out2 = run_with_timeout(lambda: dispose(fifo, failed, "c.txt", error="a FIFO"))
    assert os.readlink(out1) == "/etc/hostname"  # type: ignore[arg-type]
    assert (failed / "a.txt.error.txt").read_text() == "a.txt: a symbolic link\n"
    assert os.path.exists(out2) and not os.path.isfile(out2)  # type: ignore[arg-type]

    for name in ("README", ".hidden", "é" * 127 + ".txt"):
        for _ in range(2):
            src = work / "tmp-input"
            src.write_text("x")
            out = dispose(src, failed, name, error="why")
            assert len(os.fsencode(out.name + ".error.txt")) <= 255
            assert (failed / (out.name + ".error.txt")).exists()
    assert {p.name for p in failed.iterdir() if not p.name.endswith(".error.txt")} >= {
        "README", "README-2", ".hidden", ".hidden-2"}
    with pytest.raises(ValueError):
        dispose(work / "x", failed, "../escape.txt")


def test_dispose_across_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """input-disposition: done/ on another filesystem (EXDEV) → atomic copy then unlink; symlinks
    are
    recreated as links, FIFOs as FIFOs; never overwrites."""
    work, done = tmp_path / "work", tmp_path / "done"
    work.mkdir()
    real = writer.rename_noreplace

    def exdev(src: Path, dst: Path, *dir_fd: int | None) -> None:
        if Path(src).parent == work:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst, *dir_fd)

    monkeypatch.setattr(dispose_module, "rename_noreplace", exdev)
    (done).mkdir()
    (done / "a.txt").write_text("existing")
    src = work / "x--a.txt"
    src.write_text("payload")
    out = dispose(src, done, "a.txt")
    assert out.name == "a-2.txt" and out.read_text() == "payload" and not src.exists()
    assert (done / "a.txt").read_text() == "existing"

    link = work / "x--l.txt"
    link.symlink_to("/etc/hostname")
    assert os.readlink(dispose(link, done, "l.txt")) == "/etc/hostname"
    fifo = work / "x--f.txt"
    os.mkfifo(fifo)
    out = run_with_timeout(lambda: dispose(fifo, done, "f.txt"))
    assert os.path.exists(out) and not os.path.isfile(out)  # type: ignore[arg-type]
    assert list(work.iterdir()) == [] and temps(tmp_path) == []


def test_rename_noreplace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """id-collision: the no-replace rename refuses to clobber, with and without renameat2."""
    a, b = tmp_path / "a", tmp_path / "b"
    for use_renameat2 in (True, False):
        if not use_renameat2:
            monkeypatch.setattr(writer, "_renameat2", lambda: None)
        a.write_text("a")
        b.write_text("b")
        with pytest.raises(FileExistsError):
            rename_noreplace(a, b)
        assert a.read_text() == "a" and b.read_text() == "b"
        b.unlink()
        rename_noreplace(a, b)
        assert not a.exists() and b.read_text() == "a"
        b.unlink()


# -- crash leftovers -------------------------------------------------------------------


def test_remove_stale_temps(tmp_path: Path) -> None:
    """kill-9: ".*.tmp" files a crash left (at any depth) are removed; nothing else is."""
    (tmp_path / "book" / "deep").mkdir(parents=True)
    stale = [tmp_path / ".manifest.csv.0a1b2c3d.tmp", tmp_path / "book" / ".0001.wav.ffff0000.tmp",
             tmp_path / "book" / "deep" / ".x.tmp"]
    keep = [tmp_path / "book" / "0001.wav", tmp_path / "notes.tmp", tmp_path / ".tmp",
            tmp_path / "book" / ".hidden"]
    for p in stale + keep:
        p.write_bytes(b"x")
    (tmp_path / "book" / ".dir.tmp").mkdir()
    assert remove_stale_temps(tmp_path) == 3
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert remove_stale_temps(tmp_path / "missing") == 0


@pytest.mark.usefixtures("frozen_heap")
def test_encode_is_pure_bytes() -> None:
    """atomic-wav: encoding happens in memory before any file exists."""
    data = wav.encode_wav(tone(0.1), SR)
    info = sf.info(io.BytesIO(data))
    assert data[:4] == b"RIFF" and info.samplerate == SR and info.frames == int(SR * 0.1)
    t0 = time.monotonic()
    wav.encode_wav(tone(10.0), SR)
    assert time.monotonic() - t0 < 1.0


# -- PCM_16 without libsndfile ------------------------------------------------------------


def _libsndfile_wav(samples: np.ndarray, rate: int) -> bytes:
    """What soundfile/libsndfile writes for these float32 samples (clipped to [-1, 1])."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), rate,
             subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _edge_samples() -> np.ndarray:
    """Values where a float → int16 rule can go wrong: ±1, ±0, every k/32768 and
    k/32767 step, half and quarter steps, the neighbours of each (nextafter), values
    where x·2³¹ has a fraction (|x| < 2⁻⁸: the rounding before the shift), tiny
    negatives, subnormals, and values past ±1 (clipped)."""
    k = np.arange(-32768, 32769, dtype=np.float64)
    steps = np.concatenate([k / 32768, k / 32767, (k + 0.5) / 32768, (k + 0.25) / 32768,
                            (k + 0.75) / 32768]).astype(np.float32)
    near = np.concatenate([np.nextafter(steps, np.float32(2)), np.nextafter(steps, np.float32(-2))])
    m = np.arange(-130, 131, dtype=np.float64) * 65536   # multiples of 2¹⁶ in x·2³¹ units
    frac = np.concatenate([m + d for d in (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75, 1.5, -1.5)])
    tiny = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-30, -1e-30, 1e-10, -1e-10,
                     2.0**-32, -(2.0**-32), 2.0**-33, -(2.0**-33), 3 * 2.0**-33,
                     -3 * 2.0**-33, 1.0, -1.0, 1.5, -1.5, 3.0, -3.0, 1e30, -1e30,
                     np.float32(1) - np.float32(2.0**-24), -1 + 2.0**-24], dtype=np.float32)
    return np.concatenate([steps, near, (frac / 2.0**31).astype(np.float32), tiny])


@pytest.mark.parametrize("rate", [SR, 8000, 16000, 44100, 48000, 1, 2**31 - 1])
def test_pcm16_encoder_is_byte_identical_to_libsndfile(
        rate: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """PCM_16 WAVs are built without libsndfile, and are byte for byte what it writes:
    the 44-byte header and every sample, over edge values, seeded random signals of
    several lengths (empty, 1, odd), and float64 input."""
    rng = np.random.default_rng(20240611)
    edges = _edge_samples()
    signals = [edges, edges[::-1].copy(), np.zeros(0, np.float32),
               np.array([-0.0], np.float32), np.array([1.0], np.float32),
               np.array([-1.0], np.float32), np.array([-1e-10], np.float32)]
    for n in (1, 2, 3, 1001, 4096, 22_050, 140_001):
        signals.append((rng.standard_normal(n) * 0.3).astype(np.float32))
        signals.append(rng.uniform(-1.2, 1.2, n).astype(np.float32))
    signals.append(rng.standard_normal(7777) * 0.5)   # float64: cast to float32 first
    signals.append(rng.standard_normal(33).astype(np.float32)[::3])   # not contiguous
    expected = [_libsndfile_wav(x, rate) for x in signals]

    def no_soundfile(*args: object, **kw: object) -> None:
        raise AssertionError("PCM_16 must not go through soundfile")

    monkeypatch.setattr(sf, "write", no_soundfile)
    for x, want in zip(signals, expected):
        got = wav.encode_wav(x, rate)
        assert got[:44] == want[:44], (rate, len(x))
        if got != want:
            a, b = np.frombuffer(got[44:], "<i2"), np.frombuffer(want[44:], "<i2")
            i = int(np.nonzero(a != b)[0][0]) if len(a) == len(b) else -1
            raise AssertionError(f"rate {rate}, {len(x)} samples: first difference at "
                                 f"sample {i}: {x[i]!r} → {a[i]} (libsndfile {b[i]})")
    assert len(expected[2]) == 44   # an empty WAV is a bare header


def _check_bit_patterns(start: int, stop: int, step: int = 1) -> None:
    """encode_wav == libsndfile for the float32 bit patterns start, start+step… < stop,
    and their negatives."""
    chunk = (1 << 23) * step
    for sign in (0, 0x80000000):
        for lo in range(start, stop, chunk):
            bits = np.arange(lo, min(lo + chunk, stop), step, dtype=np.uint32) | np.uint32(sign)
            x = bits.view(np.float32)
            assert wav.encode_wav(x, SR) == _libsndfile_wav(x, SR), hex(lo | sign)


def _bits(x: float) -> int:
    return int(np.float32(x).view(np.uint32))


def test_pcm16_encoder_matches_libsndfile_where_rounding_matters() -> None:
    """Every float32 in the binades where libsndfile's lrintf(x·2³¹) >> 16 differs from
    floor(x·32768) — [2⁻³⁴, 2⁻³¹) (tiny negatives round to 0) and [2⁻¹⁶, 2⁻¹⁴) (a
    round up carries into the next step) — both signs, plus every 101st float32 of
    [0, 1]: ~10⁸ values."""
    _check_bit_patterns(_bits(2.0**-34), _bits(2.0**-31))
    _check_bit_patterns(_bits(2.0**-16), _bits(2.0**-14))
    _check_bit_patterns(0, _bits(1.0) + 1, 101)


@pytest.mark.slow
def test_pcm16_encoder_matches_libsndfile_for_every_float32() -> None:
    """All 2,130,706,434 float32 values in [-1, 1] (anything else is clipped to ±1)."""
    _check_bit_patterns(0, _bits(1.0) + 1)


def test_other_subtypes_still_use_libsndfile() -> None:
    x = tone(0.05)
    for subtype in ("PCM_24", "PCM_32", "FLOAT"):
        buf = io.BytesIO()
        sf.write(buf, x, SR, subtype=subtype, format="WAV")
        assert wav.encode_wav(x, SR, subtype) == buf.getvalue()
    with pytest.raises(TypeError):   # soundfile still judges a rate that is not an int
        wav.encode_wav(x, 22050.0)   # type: ignore[arg-type]


def test_write_wav_without_folder_sync_is_complete(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``sync_dir=False`` skips only the folder fsync (the caller does it once per
    batch): the file's data is fsynced, the file is complete, readable by soundfile
    and the same bytes as with the folder fsync."""
    folder_syncs: list[Path] = []
    real = writer.fsync_dir
    monkeypatch.setattr(writer, "fsync_dir", lambda p: (folder_syncs.append(p), real(p))[1])
    file_syncs: list[str] = []
    real_fsync = writer.os.fsync

    def fsync(fd: int) -> None:
        file_syncs.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    x = tone(1.0)
    x[:5] = [1.0, -1.0, 0.0, -1e-10, 2.0]
    for subtype in ("PCM_16", "PCM_24"):
        fast, slow = tmp_path / f"nosync-{subtype}.wav", tmp_path / f"sync-{subtype}.wav"
        folder_syncs.clear()
        file_syncs.clear()
        n = write_wav(fast, x, SR, subtype, sync_dir=False)
        assert folder_syncs == [] and len(file_syncs) == 1 and file_syncs[0].endswith(".tmp")
        write_wav(slow, x, SR, subtype)
        assert folder_syncs == [tmp_path]
        assert n == fast.stat().st_size and fast.read_bytes() == slow.read_bytes()
        assert wav_ok(fast, sample_rate=SR)
        data, rate = sf.read(str(fast), dtype="float32")
        assert rate == SR and len(data) == len(x)
        assert np.abs(data - np.clip(x, -1, 1)).max() <= 2.0 / 32768
        writer.fsync_dir(tmp_path)
    assert temps(tmp_path) == []


def test_int16_pcm_writes_the_bytes_of_its_floats(tmp_path: Path) -> None:
    """The engine's ``pcm16`` output (int16, converted on the device by torch) is
    written as it is: the same WAV bytes as the float samples through the numpy encoder
    (libsndfile's rule), edge values of the rounding included; other subtypes too."""
    import torch

    from ttsd.engine.device import pcm16 as torch_pcm16

    rng = np.random.default_rng(5)
    edges = np.array([1.0, -1.0, 0.0, -1e-10, 1e-10, (65536 - 0.5) / 2**31,
                      -(65536 - 0.5) / 2**31, 0.5 / 32768, -0.5 / 32768, 2**-8, -2**-8],
                     dtype=np.float32)
    x = np.concatenate([rng.uniform(-1, 1, 50_000), edges,
                        rng.uniform(-1, 1, 50_000) * 2**-8]).astype(np.float32)
    pcm = torch_pcm16(torch.from_numpy(x)).numpy()
    assert pcm.dtype == np.int16
    assert np.array_equal(pcm, wav.pcm16(x))
    assert wav.encode_wav(pcm, 22050) == wav.encode_wav(x, 22050)
    for subtype in ("FLOAT", "PCM_24"):
        floats = pcm / np.float32(32768.0)
        assert wav.encode_wav(pcm, 22050, subtype) == wav.encode_wav(floats, 22050, subtype)
    write_wav(tmp_path / "a.wav", pcm, 22050)
    back, sr = sf.read(str(tmp_path / "a.wav"), dtype="int16")
    assert sr == 22050 and np.array_equal(back, pcm)
    with pytest.raises(ValueError, match="1-D"):
        wav.encode_wav(pcm[:100_000].reshape(2, -1), 22050)


def test_int16_wav_in_parts_survives_short_writes_and_disk_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An int16 WAV goes out as its header and its samples (writev, no joined copy): a
    short write (a signal, a pipe-like file system) resumes where it stopped, and the
    file is byte for byte encode_wav's; ENOSPC mid-write leaves nothing (disk-full-outbox)."""
    pcm = (np.random.default_rng(9).integers(-32768, 32768, 150_001)).astype(np.int16)
    real_writev, real_write = os.writev, os.write
    calls = []

    def short_writev(fd: int, bufs: list) -> int:
        calls.append(len(bufs))
        return real_writev(fd, [bytes(b)[:1000] for b in bufs][:2])   # at most 2 KB

    def short_write(fd: int, data) -> int:
        return real_write(fd, bytes(data)[:777])

    monkeypatch.setattr(writer.os, "writev", short_writev)
    monkeypatch.setattr(writer.os, "write", short_write)
    n = write_wav(tmp_path / "a.wav", pcm, SR)
    assert calls and calls[0] == 2   # header and samples, not one joined bytes object
    assert (tmp_path / "a.wav").read_bytes() == wav.encode_wav(pcm, SR)
    assert n == 44 + 2 * pcm.size
    back, sr = sf.read(str(tmp_path / "a.wav"), dtype="int16")
    assert sr == SR and np.array_equal(back, pcm)

    def full(fd: int, bufs: list) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "writev", full)
    with pytest.raises(OSError) as info:
        write_wav(tmp_path / "b.wav", pcm, SR)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]
