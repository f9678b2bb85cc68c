"""The writing step: a finished batch's line files, then one store transaction.

Each line is rendered and encoded once (``output.render``: its rate, loudness and format;
``encoders``: a 16-bit WAV on the writer thread, any other file in a pool of
processes), written atomically by the writer threads, and the same bytes are the
cache's copy. Atomic files and cache hits' copies are written through each output
folder's descriptor (``output.fsio.Folder``), one fsync per touched
folder, then one store transaction per batch, or per piece of one: the model thread
sends each audio call's complete lines ahead (``Batch.piece``). A folder that cannot be
written is reported to ``health`` (the feeder then waits), and its lines go back to
pending.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from ttsd import crash
from ttsd.cache import HitCheck, cache_path, place_hit
from ttsd.config import Config
from ttsd.engine.records import Result
from ttsd.engine.runtime import Engine
from ttsd.health import Health, fault
from ttsd.log import get_logger
from ttsd.markup.ssml import MarkupOptions, spoken_words
from ttsd.output.fsio import Folder, replace_with_link, write_atomic
from ttsd.output.render import LineAudio
from ttsd.output.timestamps import sidecar, timestamps_bytes
from ttsd.pipeline.batcher import Batch, occupied, out_path
from ttsd.pipeline.encoders import Encoded, Encoders
from ttsd.records import BatchStats, Done, Failed
from ttsd.store.journal import LineRow, Store, sqlite_ino

log = get_logger(__name__)


class Sink:
    """Writes a finished batch, or a piece of one: WAVs first (atomic), then one store
    transaction."""

    def __init__(self, cfg: Config, engine: Engine, threads: int, health: Health | None = None,
                 stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ttsd-wav")
        self.audio = LineAudio.of(cfg.output)
        self.encoders = Encoders(self.audio)
        self.markup = MarkupOptions.from_config(cfg)
        self.encoders.start()
        self.suffix = self.audio.suffix
        self.what = "WAV" if self.suffix == ".wav" else f"{self.suffix[1:]} file"
        self.health = health or Health()
        """Where a folder that cannot be written is reported (the feeder then waits)."""
        self.stop = stop or threading.Event()
        self._keeping: list[Future] = []
        """Cache copies of synthesized WAVs being written beside the next batches (their
        entries go into the store with the first commit after they are done)."""
        self._keeping_lock = threading.Lock()

    def close(self, store: Store | None = None) -> None:
        """Finish the cache copies under way (recording their entries in ``store``)."""
        if store is not None and self._keeping:
            wait(self._keeping)
            self.record_kept(store)
        self.pool.shutdown(wait=True)
        self.encoders.close()

    @property
    def keeping(self) -> bool:
        """Cache copies are under way (or done and not yet recorded)."""
        return bool(self._keeping)

    def record_kept(self, store: Store) -> None:
        """Record the entries of the cache copies done by now (between batches: a line
        said again a moment later is answered from the cache)."""
        rows = self._kept()
        if rows:
            self._journal(store.complete, [], [], rows, None, {})

    def _kept(self) -> list[dict]:
        """The entries of the cache copies done by now (the rest stay under way)."""
        with self._keeping_lock:
            done = [f for f in self._keeping if f.done()]
            self._keeping = [f for f in self._keeping if f not in done]
        return [row for f in done if (row := f.result()) is not None]

    def write(self, store: Store, batch: Batch) -> dict[str, int]:
        t0 = time.perf_counter()
        done: list[Done] = []
        failed: list[Failed] = []
        requeue: list[int] = []
        hit_keys: list[str] = []
        folders = _Folders(self._outbox_failed)
        try:
            self._adopt(batch, folders, done, requeue)
            self._place_hits(store, batch, folders, done, failed, requeue, hit_keys)
            groups = [(gi, g) for gi, g in enumerate(batch.groups) if gi not in batch.streamed]
            entries = self._write_wavs(batch, groups, folders, done, failed, requeue)
            done = folders.sync(done, requeue)
        finally:
            folders.close()
        if folders.used and not requeue:
            self.health.clear("outbox", "sink")
        finished = {d.line_id for d in done}
        cache_rows = [e for row_id, e in entries if row_id in finished] + self._kept()
        stats = None
        audio_s = sum(d.seconds for d in done)
        if batch.part_of is not None:   # a piece: its batch's stats come with the batch
            tally = batch.part_of.tally
            for k, v in (("audio_s", audio_s), ("write_ms", (time.perf_counter() - t0) * 1000),
                         ("hits", len(batch.hits))):
                tally[k] = tally.get(k, 0) + v
        elif batch.rows:
            s = batch.stats
            phonemes = (sum(p.phonemes for p in batch.prepared) if batch.prepared
                        else sum(r.phonemes for r in batch.results))
            stats = BatchStats(
                size=len(batch.rows), phonemes=phonemes,
                audio_s=audio_s + batch.tally.get("audio_s", 0), prepare_ms=batch.prepare_ms,
                model_ms=batch.model_ms,
                write_ms=(time.perf_counter() - t0) * 1000 + batch.tally.get("write_ms", 0),
                device=batch.device or str(self.engine.device),
                dtype=batch.dtype or str(self.engine.dtype).split(".")[-1],
                voice=batch.voice, padded_frames=s.frame_slots if s else 0,
                used_frames=s.frames if s else 0,
                extra={} if batch.worker is None else {"worker": batch.worker,
                                                       "memory": batch.memory})
        counters = {"cache_misses": len(groups),   # cache_hits: counted with hit_keys
                    "lines_synthesized": sum(len(g) for _gi, g in groups)}
        crash.point("before_commit")
        if not self._journal(store.complete, done, failed, cache_rows, stats, counters,
                             hit_keys):
            return {"done": 0, "failed": 0, "requeued": 0}
        crash.point("after_commit")
        if requeue:
            self._journal(store.release, requeue, undo_attempt=True)
        if failed:
            rows = {r.id: r for r in batch.rows}
            for line_id, error in failed:
                row = rows.get(line_id)
                log.warning("line.failed", file=row.file if row else "", error=error,
                            line=row.number if row else None)
        counts = {"done": len(done), "failed": len(failed), "requeued": len(requeue)}
        if batch.part_of is not None:
            for k, v in counts.items():
                batch.part_of.tally[k] = batch.part_of.tally.get(k, 0) + v
        return counts

    def _adopt(self, batch: Batch, folders: _Folders, done: list[Done], requeue: list[int]
               ) -> None:
        """Lines whose whole file an earlier attempt wrote (the feeder saw it): done."""
        for row in batch.existing:
            folder = folders.get(row.out_dir)
            try:
                if folder is None:
                    raise FileNotFoundError(row.out_dir)
                seconds = self.audio.seconds(f"{row.out_name}{self.suffix}", folder.fd)
            except (OSError, ValueError):   # gone or changed since the feeder looked
                requeue.append(row.id)
                continue
            folders.touch(folder)
            done.append(Done(row.id, str(out_path(row, self.suffix)), seconds, False))

    def _place_hits(self, store: Store, batch: Batch, folders: _Folders, done: list[Done],
                    failed: list[Failed], requeue: list[int], hit_keys: list[str]) -> None:
        """The batch's cache hits, placed in their folders on the writer threads."""
        link = self.cfg.cache.link
        jobs = []
        for row, entry in batch.hits:
            folder = folders.get(row.out_dir)
            if folder is None:
                requeue.append(row.id)
                continue
            jobs.append((row, entry, folder, self.pool.submit(
                place_hit, entry["path"], folder, f"{row.out_name}{self.suffix}",
                batch.sample_rate, link, audio=self.audio)))
        for row, entry, folder, fut in jobs:
            outcome, seconds = fut.result()
            dst = str(out_path(row, self.suffix))
            if outcome == "placed":
                folders.touch(folder)
                done.append(Done(row.id, dst, float(entry["seconds"]), True, entry.get("rate"),
                                 entry.get("lufs")))
                hit_keys.append(entry["key"])
            elif outcome == "adopted":   # a whole WAV of an earlier attempt
                folders.touch(folder)
                done.append(Done(row.id, dst, seconds, False))
            elif outcome == "gone":   # purged since the feeder looked: synthesize it after all
                gone = HitCheck()
                gone.evict.append(entry["key"])
                gone.save(store)
                requeue.append(row.id)
            elif outcome == "taken":   # anything else at the path stays, and the line fails
                log.error("wav.path_taken", path=dst, line=row.id)
                failed.append(Failed(row.id, occupied(dst, batch.sample_rate, self.what)))
            else:   # disk full, I/O error: the line stays pending
                self.health.trouble("outbox", folder.path, "a cache hit could not be placed",
                                    "sink")
                requeue.append(row.id)

    def _write_wavs(self, batch: Batch, groups: list[tuple[int, list[LineRow]]],
                    folders: _Folders, done: list[Done], failed: list[Failed], requeue: list[int]
                    ) -> list[tuple[int, dict]]:
        """The synthesized lines' files, on the writer threads; the first line of each
        group also leaves the cache its own copy. A group of several lines (the same
        text and settings, one result) is rendered and encoded once, in a job queued
        before its lines' writes, so every write that waits for it finds it started.
        Returns (line id, cache entry)."""
        results = {r.key: r for r in batch.results}
        jobs = []
        for gi, group in groups:
            res = results.get(gi)
            if res is None or res.audio is None:
                err = res.error if res is not None else "no result from the engine"
                failed.extend((row.id, err) for row in group)
                continue
            encoded = self.pool.submit(self.encoders.encode, res.audio, res.sample_rate,
                                       self.audio.louder(group[0].volume)) \
                if len(group) > 1 else None
            for k, row in enumerate(group):
                folder = folders.get(row.out_dir)
                if folder is None:
                    requeue.append(row.id)
                    continue
                keep = k == 0 and self.cfg.cache.enabled and row.cache_key
                jobs.append((row, res, folder, self.pool.submit(
                    self._write_one, row, res, folder, bool(keep), encoded)))
        entries = []
        for row, res, folder, fut in jobs:
            try:
                refused, entry, enc = fut.result()
            except OSError as exc:   # disk full, I/O error: the line stays pending
                self._outbox_failed(row.out_dir, exc)
                requeue.append(row.id)
                continue
            except ValueError as exc:   # samples that cannot be encoded (NaN): for good
                failed.append(Failed(row.id, f"the audio could not be encoded: {exc}"))
                continue
            if refused:   # for good: pending again, it would be refused again, forever
                log.error("wav.path_taken", path=str(out_path(row, self.suffix)), line=row.id)
                failed.append(Failed(row.id, refused))
                continue
            folders.touch(folder)
            done.append(Done(row.id, str(out_path(row, self.suffix)), enc.seconds, False,
                             enc.sample_rate, enc.lufs))
            if entry is not None:
                entries.append((row.id, entry))
            crash.point("after_rename")
        return entries

    def _outbox_failed(self, folder: str | os.PathLike, exc: OSError) -> None:
        """A write into the outbox failed: the outbox is blocked (the feeder stops
        taking lines and probes it with back-off) and the line goes back to pending."""
        self.health.trouble("outbox", folder, fault(exc) or str(exc), "sink")

    def _journal(self, write: Callable, *args, **kwargs) -> bool:
        """Do a store write, waiting out a journal that cannot be written (full disk,
        read-only) with back-off; False when a stop came first (the lines stay running,
        and the next start finishes them, adopting the WAVs already written)."""
        return self.health.retry("state", self.cfg.paths.db,
                                 lambda: write(*args, **kwargs), self.stop, "sink")

    def _write_one(self, row: LineRow, res: Result, folder: Folder, keep: bool,
                   encoded: Future | None = None) -> tuple[str | None, dict | None, Encoded]:
        """Renders, encodes and writes the line's file; a valid one already there (an
        earlier attempt's) is kept. Returns why the line fails for good (another file
        holds its path) or None; with ``keep``, the line's cache entry: with
        ``cache.link`` a hard link to the file (returned), else a file of its own
        written from the same bytes on the writer threads after this batch
        (``_keeping``), so that nothing done to the outbox changes it and its write is
        not on the way to the line's commit; and its encoded file. OSError
        (a full disk…) leaves the line pending; ValueError (samples that cannot be
        encoded) fails it. With ``output.timestamps`` the line's ``<name>.json`` is
        written first (and kept in the cache beside its file)."""
        name = f"{row.out_name}{self.suffix}"
        enc = encoded.result() if encoded is not None else \
            self.encoders.encode(res.audio, res.sample_rate, self.audio.louder(row.volume))
        stamps = None
        if self.audio.timestamps and res.timing is not None:
            words = spoken_words(row.said or row.text, self.markup) \
                if row.markup else row.text
            stamps = timestamps_bytes(res.timing, res.sample_rate, words)
            write_atomic(sidecar(name), stamps, overwrite=True, sync_dir=False,
                         dir_fd=folder.fd)
        try:
            write_atomic(name, enc.parts, crash_at="after_tmp", sync_dir=False, dir_fd=folder.fd)
        except FileExistsError:
            if not self.audio.file_ok(name, sample_rate=enc.sample_rate, dir_fd=folder.fd):
                return (occupied(out_path(row, self.suffix), enc.sample_rate, self.what),
                        None, enc)
        if not keep:
            return None, None, enc
        if self.cfg.cache.link:
            return None, self._entry(row, enc, stamps, lambda dst: replace_with_link(
                name, dst, link=True, src_dir_fd=folder.fd)), enc
        keeping = self.pool.submit(self._entry, row, enc, stamps, lambda dst: write_atomic(
            dst, enc.parts, overwrite=True, sync_dir=False))
        with self._keeping_lock:
            self._keeping.append(keeping)
        return None, None, enc

    def _entry(self, row: LineRow, enc: Encoded, stamps: bytes | None,
               make: Callable[[Path], object]) -> dict | None:
        """Make the line's cache file with ``make`` (fsynced, but without a folder fsync:
        one lost in a power cut is a miss later, never garbage under its name), its
        timestamps before it, and return its entry. The cache is an optimization: a file
        that cannot be made is logged and skipped."""
        dst = cache_path(self.cfg.paths.cache, row.cache_key, self.suffix)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if stamps is not None:
                write_atomic(sidecar(dst), stamps, overwrite=True, sync_dir=False)
            make(dst)
            st = os.lstat(dst)   # the stamp of a file written just now
        except (OSError, ValueError) as exc:
            log.warning("cache.store_failed", key=row.cache_key[:12], error=str(exc))
            return None
        return {"key": row.cache_key, "path": str(dst), "bytes": st.st_size,
                "seconds": enc.seconds, "voice": row.voice, "ino": sqlite_ino(st.st_ino),
                "mtime_ns": st.st_mtime_ns, "rate": enc.sample_rate, "lufs": enc.lufs}


class _Folders:
    """The output folders one batch writes into, each opened once (``Folder``) and
    synced once; a folder that cannot be opened is reported and its lines stay
    pending."""

    def __init__(self, report: Callable[[str, OSError], None]) -> None:
        self._report = report
        self._open: dict[str, Folder | None] = {}
        self._touched: dict[str, Folder] = {}
        self.used = False
        """Some folder took a write, link or sync."""

    def get(self, path: str) -> Folder | None:
        if path not in self._open:
            try:
                self._open[path] = Folder.open(path)
            except OSError as exc:
                self._report(path, exc)
                self._open[path] = None
        return self._open[path]

    def touch(self, folder: Folder) -> None:
        """``folder`` holds a WAV of this batch: synced before its line is done."""
        self._touched[str(folder.path)] = folder

    def sync(self, done: list[Done], requeue: list[int]
             ) -> list[Done]:
        """One fsync per touched folder, so every rename is durable before its line is
        done; lines in a folder that cannot be synced go back to pending."""
        failed: set[str] = set()
        for path, folder in self._touched.items():
            try:
                folder.sync()
                self.used = True
            except OSError as exc:
                self._report(path, exc)
                failed.add(path)
        if not failed:
            return done
        keep = []
        for d in done:
            if os.path.dirname(d.wav) in failed:
                requeue.append(d.line_id)
            else:
                keep.append(d)
        return keep

    def close(self) -> None:
        for folder in self._open.values():
            if folder is not None:
                folder.close()
