"""The cache: a line said before is answered with the file it got then.

An entry is keyed by everything that changes a line's audio (``cache_key``); its file is
kept under ``state/cache/`` by the sink, and a hit is placed at the line's outbox path as
a copy that shares nothing with the cache (a reflink where the filesystem has them), or
with ``cache.link`` a hard link. A hit is checked before it is used (``HitCheck``): a
file that changed since ttsd wrote it is a miss, never served. Most hits are answered as
their file is parsed (``answer_new_lines``); the rest by the feeder.
"""

from __future__ import annotations

import hashlib
import os
import stat
import unicodedata
from concurrent.futures import Executor
from pathlib import Path

from ttsd import crash
from ttsd.config import Config
from ttsd.engine.options import ENGINE_VERSION, auto_dtype, fuses
from ttsd.health import fault
from ttsd.jobs import Job
from ttsd.log import get_logger
from ttsd.output.formats import read_small
from ttsd.output.fsio import Folder, link_or_copy, write_atomic
from ttsd.output.render import LineAudio
from ttsd.output.timestamps import sidecar
from ttsd.store.errors import OperationalError
from ttsd.store.journal import NewLine, Store, sqlite_ino

log = get_logger(__name__)


def cache_path(cache_dir: Path, key: str, suffix: str = ".wav") -> Path:
    return cache_dir / key[:2] / f"{key}{suffix}"


class HitCheck:
    """Cache entries checked for one batch or chunk: one file check per key
    (``_cache_file_ok``); the damaged or missing are evicted and the newly checked
    stamped by ``save``."""

    def __init__(self, audio: LineAudio | None = None) -> None:
        self.audio = audio or LineAudio()
        """The format a file is checked as (an entry made before stamps)."""
        self.checked: dict[str, bool] = {}
        self.evict: list[str] = []
        self.stamps: list[tuple[str, int, int]] = []

    def ok(self, entry: dict, sample_rate: int | None) -> bool:
        key = entry["key"]
        ok = self.checked.get(key)
        if ok is None:
            ok = self.checked[key] = _cache_file_ok(entry, sample_rate, self.stamps, self.audio)
            if not ok:
                self.evict.append(key)   # damaged or missing: a miss
        return ok

    def gone(self, key: str) -> None:
        """The entry's file went away after its check (purged): a miss from now on."""
        if self.checked.get(key) is not False:
            self.checked[key] = False
            self.evict.append(key)

    def save(self, store: Store) -> None:
        """Record the evictions and stamps (both only spare later checks: a journal that
        cannot take them now is no reason to stop)."""
        try:
            if self.evict:
                store.cache_evict(self.evict)
            if self.stamps:
                store.cache_stamp(self.stamps)
        except OperationalError as exc:
            if fault(exc) is None:
                raise
            log.warning("cache.check_not_recorded", error=str(exc))


def place_hit(src: str, folder: Folder, name: str, sample_rate: int | None, link: bool,
              checked: bool = False, audio: LineAudio | None = None
              ) -> tuple[str, float | None]:
    """Put a cache hit's file at its line's file ``name`` in ``folder``: a copy that shares
    nothing with the cache (or, with ``cache.link``, a hard link). No folder fsync: the
    caller's. Returns ("placed", None), also when the path holds those very bytes
    already (placed before a crash); ("adopted", seconds): another whole file of an
    earlier attempt was there already and is kept; ("gone", None): the cache file was
    purged or is no longer a regular file (a miss: synthesize the line); ("taken",
    None): something that is not its file (of ``audio``'s format) holds the path (never
    overwritten: the line fails, ``occupied``); ("error", None): the copy failed (disk
    full, I/O error: the line stays pending). ``checked``: ``src`` was just found a
    regular file."""
    try:
        if audio is not None and audio.timestamps:   # its timestamps first, as the sink does
            write_atomic(sidecar(name), read_small(sidecar(src)), overwrite=True,
                         sync_dir=False, dir_fd=folder.fd)
        link_or_copy(src, name, link=link, sync_dir=False, checked=checked, dst_dir_fd=folder.fd)
        return "placed", None
    except (FileNotFoundError, ValueError):
        return "gone", None
    except FileExistsError:
        if _same_bytes(src, folder, name):   # placed before a crash
            return "placed", None
        audio = audio or LineAudio()
        if audio.file_ok(name, sample_rate=sample_rate, dir_fd=folder.fd):
            try:
                return "adopted", audio.seconds(name, folder.fd)
            except (OSError, ValueError):
                pass
        return "taken", None
    except OSError as exc:
        log.error("wav.place_failed", path=str(folder.path / name), error=str(exc))
        return "error", None


def _same_bytes(src: str, folder: Folder, name: str) -> bool:
    """The file at ``name`` holds ``src``'s bytes: the same file (a link), or a copy of
    it (compared byte for byte; only a restart after a crash gets here)."""
    try:
        a = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        b = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=folder.fd)
    except OSError:
        os.close(a)
        return False
    try:
        sa, sb = os.fstat(a), os.fstat(b)
        if not stat.S_ISREG(sb.st_mode) or sa.st_size != sb.st_size:
            return False
        if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
            return True
        while True:
            x, y = os.read(a, 1 << 20), os.read(b, 1 << 20)
            if x != y:
                return False
            if not x:
                return True
    except OSError:
        return False
    finally:
        os.close(a)
        os.close(b)


def answer_new_lines(store: Store, lines: list[NewLine], out_dir: Path,
                     sample_rates: dict[str, int], link: bool = False,
                     pool: Executor | None = None, audio: LineAudio | None = None) -> None:
    """Answer the cache hits among a file's lines as they are parsed, before they reach
    the store: each hit's WAV placed in ``out_dir`` (``place_hit``; several at a time on
    ``pool``), the folder fsynced once, and the line marked done (``wav``; ``cached``
    for the cache's audio) so that ``Store.add_lines`` inserts it done and counts its
    cache use.

    A known line then costs one insert instead of an insert, a take and a completion
    (three transactions' worth of row writes). The lines not answered here (misses, a
    cache file that went away, a path already taken, an outbox that cannot be written)
    stay pending: the feeder and sink meet them as they would have. A crash after the
    copies and before the insert leaves them, and the restart's re-parse finds them
    again: ``place_hit`` counts the cache's very bytes at the path as placed."""
    todo = [ln for ln in lines if ln.cache_key and not ln.error and ln.out_name]
    cached = store.cache_get_many([ln.cache_key for ln in todo]) if todo else {}
    if not cached:
        return
    audio = audio or LineAudio()
    check = HitCheck(audio)
    hits = []
    for ln in todo:
        entry = cached.get(ln.cache_key)
        sr = sample_rates.get(ln.voice or "")
        sr = sr and audio.rate(sr)
        if entry is not None and check.ok(entry, sr):
            hits.append((ln, entry, sr))
    if not hits:
        check.save(store)
        return
    try:
        folder = Folder.open(out_dir)
    except OSError as exc:   # the sink meets the folder again, and reports it
        log.warning("wav.folder_unusable", folder=str(out_dir), error=str(exc))
        check.save(store)
        return
    answered: list[NewLine] = []
    try:
        # The entry's check has just lstat'ed the cache file (``checked``): a file swapped
        # for a symlink in the microseconds between would be placed as one; the cache
        # folder is the daemon's own.
        def place(hit: tuple) -> tuple[str, float | None]:
            ln, entry, sr = hit
            return place_hit(entry["path"], folder, f"{ln.out_name}{audio.suffix}", sr, link,
                             checked=True, audio=audio)
        outcomes = pool.map(place, hits) if pool is not None else map(place, hits)
        for (ln, entry, _sr), (outcome, seconds) in zip(hits, outcomes):
            dst = str(folder.path / f"{ln.out_name}{audio.suffix}")
            if outcome == "placed":
                ln.wav, ln.seconds, ln.cached = dst, float(entry["seconds"]), True
                ln.rate, ln.lufs = entry.get("rate"), entry.get("lufs")
                answered.append(ln)
            elif outcome == "adopted":
                ln.wav, ln.seconds, ln.cached = dst, seconds, False
                answered.append(ln)
            elif outcome == "gone":
                check.gone(entry["key"])
        check.save(store)
        if answered:
            crash.point("after_hit_links")
            try:   # the copies are durable before their lines are done
                folder.sync()
            except OSError as exc:
                log.error("wav.folder_sync_failed", folder=str(out_dir), error=str(exc))
                for ln in answered:   # pending: the feeder meets them again (and adopts)
                    ln.wav, ln.seconds, ln.cached = None, None, False
    finally:
        folder.close()


def _cache_file_ok(entry: dict, sample_rate: int | None,
                   stamps: list[tuple[str, int, int]], audio: LineAudio) -> bool:
    """Whether a cache entry's file can answer a hit: the file the sink wrote (or last
    checked), unchanged: same inode, mtime and size, one lstat. A stamped file that no
    longer has its stamp was changed by someone since (an edit in place, with
    ``cache.link`` through an outbox WAV linked to it, or a replacement) and is a miss:
    the line is synthesized again, and nothing done outside ttsd is ever served. (An
    edit that restores the old mtime and keeps the size is not seen.) An entry from
    before stamps gets the full check — regular, the entry's size, a whole file of the
    output's format at its rate (``LineAudio.file_ok``) — and, if it passes, a new stamp
    in ``stamps`` (key,
    inode, mtime_ns)."""
    path = entry["path"]
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry["bytes"]:
        return False
    if entry.get("ino") is not None:   # stamped: unchanged since, or changed by someone
        return sqlite_ino(st.st_ino) == entry["ino"] and st.st_mtime_ns == entry["mtime_ns"]
    if not audio.file_ok(path, sample_rate=sample_rate, size=entry["bytes"]):
        return False
    stamps.append((entry["key"], sqlite_ino(st.st_ino), st.st_mtime_ns))
    return True


AUDIO_KEYS = ("engine.voice", "engine.speaker", "engine.speed", "engine.noise_scale",
              "engine.noise_w", "engine.seed", "engine.sentence_silence_s", "engine.dtype",
              "engine.device", "engine.devices", "engine.compile", "engine.fused", "output.format",
              "output.subtype", "output.bitrate_kbps", "output.sample_rate",
              "output.loudness_lufs", "output.true_peak_dbtp", "output.volume",
              "output.timestamps", "input.markup", "input.markup_unknown",
              "input.paragraph_pause_s", "input.lexicon")
"""The config keys that change a line's audio bytes, each one in its cache key: voice,
speaker, speed, noise and seed as the line's own fields, the others through
``audio_format`` (device and devices by the kind of device they resolve to). A new
setting must be added here or to the test's list of those that do not. (Timestamps do
not change the audio, but an entry made with them keeps their file too.)"""


def audio_format(cfg: Config, gpu: bool) -> str:
    """The settings besides the line's own that decide its audio bytes, as one string
    of the cache key: the output format and levels (``LineAudio.key``; a 16-bit WAV
    at the voice's own levels keeps the key it had before there were others, so its
    cache stays valid), the silence between sentences, and the
    numerics (device kind, decoder dtype, compiled audio half, fused decoder kernels)
    of an engine on a GPU or not (``gpu``). Audio is not identical across devices,
    dtypes or compiled kernels."""
    e = cfg.engine
    dtype = e.dtype if e.dtype != "auto" else auto_dtype(gpu)
    compiled = e.compile in ("on", "ahead") or (e.compile == "auto" and gpu)
    audio = LineAudio.of(cfg.output)
    fmt = audio.format.key() if audio.levels.plain else audio.key()
    if cfg.output.timestamps:
        fmt += "|timestamps"
    fused = "/fused" if gpu and fuses(e.fused, e.compile) else ""
    return (f"{fmt}|silence={e.sentence_silence_s!r}|"
            f"{'cuda' if gpu else 'cpu'}/{dtype}/compile={'on' if compiled else 'off'}{fused}")


def line_format(fmt: str, volume: float | None = None, pause_after: float | None = None,
                markup: str = "") -> str:
    """``audio_format`` for a line with its own CSV ``volume`` and ``pause_after`` (None:
    none), and for an SSML line ``markup`` (``MarkupOptions.key``: how SSML is read)."""
    if volume is not None and volume != 1.0:
        fmt += f"|line_volume={volume!r}"
    if pause_after:
        fmt += f"|pause_after={pause_after!r}"
    return f"{fmt}|{markup}" if markup else fmt


def cache_key(text: str, job: Job, fmt: str) -> str:
    """Everything that decides a line's WAV bytes, hashed: its text, its job and the
    audio format (``audio_format``)."""
    return key_with(hashlib.sha256(key_prefix(job, fmt)), text)


def key_with(prefix: hashlib._Hash, text: str) -> str:
    """The key of ``text`` after ``prefix``, the hash of ``key_prefix`` (not changed:
    ``Ingest`` keeps one per voice and parameters and finishes a copy per line)."""
    h = prefix.copy()
    h.update(unicodedata.normalize("NFC", text).encode())
    return h.hexdigest()


def key_prefix(job: Job, fmt: str) -> bytes:
    """What ``cache_key`` hashes before the text: the same for every line of a voice,
    speaker and speed (``Ingest`` hashes it once and copies the hash for each line)."""
    v = job.voice
    parts = [ENGINE_VERSION, v.name, v.digest, str(v.sample_rate), str(job.speaker_id),
             repr(round(job.length_scale, 6)), repr(round(job.noise_scale, 6)),
             repr(round(job.noise_w, 6)), str(job.seed), fmt, ""]
    return "\x1f".join(parts).encode()
