"""Lines stage: store → batch (+ cache) → engine → WAVs → store.

Three steps, each run by its own thread in the daemon and connected by queues (bounded
in whole batches), so phonemizing and writing overlap with the model:

- ``Feeder.next_batch``: takes pending lines (marking them running, attempts + 1),
  answers what it can without the model (a WAV already on disk from an interrupted
  attempt, a cache hit that was not one yet when its line was parsed: most hits never
  get here, ``answer_new_lines`` answers them as their file is parsed), dedupes
  identical lines, and phonemizes the rest;
- ``Synth.run``: the model, on the device: both halves one after the other, or
  (``engine.overlap_halves``, the default on a GPU) only the audio half, the feeder
  having run the text half (``Engine.plan``, on a side stream) beside the previous
  batch's audio half — ahead end to end in four H200 runs out of four, see
  ttsd/engine/PERFORMANCE.md;
- ``Sink.write``: atomic WAVs and cache hits' copies, written through each output
  folder's descriptor (``writer.Folder``), one fsync per touched folder, then one
  store transaction per batch — or per piece of one: with ``batching.stream_writes``
  the model thread sends each audio call's complete lines ahead (``Batch.piece``). A
  folder that cannot be written is reported to ``health`` (the feeder then waits), and
  its lines go back to pending.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ttsd import crash
from ttsd.config import Config
from ttsd.engine.records import Prepared, Request, Result, RunStats
from ttsd.engine.runtime import GPU_BATCH, Engine, Plan
from ttsd.health import Health, fault
from ttsd.log import get_logger
from ttsd.records import BatchStats
from ttsd.store.journal import LineRow, NewLine, Store, gave_up, sqlite_ino
from ttsd.output.fsio import Folder, link_or_copy, replace_with_link, wav_info, wav_ok, write_wav

log = get_logger(__name__)


@dataclass
class Batch:
    rows: list[LineRow]
    voice: str
    sample_rate: int | None = None
    """The voice's rate, as the feeder checked WAVs against it."""
    existing: list[LineRow] = field(default_factory=list)
    hits: list[tuple[LineRow, dict]] = field(default_factory=list)
    groups: list[list[LineRow]] = field(default_factory=list)
    """Lines to synthesize, grouped by cache key; request ``key`` = group index."""
    prepared: list[Prepared] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    """The model's work; with worker processes they phonemize it themselves."""
    plan: Plan | None = None
    """``engine.overlap_halves``: the text half done by the feeder, waiting for ``Synth``."""
    results: list[Result] = field(default_factory=list)
    stats: RunStats | None = None
    prepare_ms: float = 0.0
    model_ms: float = 0.0
    dead: list[int] = field(default_factory=list)
    device: str = ""
    """Set by a worker pool: the device (and ``worker`` its slot) that ran the batch."""
    dtype: str = ""
    worker: int | None = None
    memory: dict = field(default_factory=dict)
    part_of: Batch | None = None
    """Set on a piece: lines of ``part_of`` whose audio was complete while the rest of
    it was still in the model (``Engine.finish``'s stream); the batch itself comes
    last, with the lines not streamed and the stats of the whole. A piece commits its
    lines and counters but no batches row: if the process dies before its batch is
    committed, those lines are done (and stay done) without a batches row."""
    streamed: set[int] = field(default_factory=set)
    """Group indices sent in pieces (the sink skips them in the batch itself)."""
    tally: dict[str, float] = field(default_factory=dict)
    """The sink's counts of this batch's pieces (done, failed, requeued, hits, audio_s,
    write_ms), folded into the batch's stats and log line."""

    def piece(self, results: list[Result]) -> Batch:
        """The lines of ``results`` (keys: group indices) as a batch of their own; the
        first piece also takes the lines answered without the model."""
        groups = [self.groups[r.key] for r in results]
        self.streamed.update(r.key for r in results)
        answered = self.existing + [row for row, _e in self.hits]   # in its rows too, so
        p = Batch([row for g in groups for row in g] + answered,   # they leave in_flight
                  self.voice, self.sample_rate,
                  existing=self.existing, hits=self.hits, groups=groups,
                  results=[dataclasses.replace(r, key=i) for i, r in enumerate(results)],
                  device=self.device, dtype=self.dtype, worker=self.worker, part_of=self)
        self.existing, self.hits = [], []
        return p


ANSWER_TAKE = 1024
"""The most rows one batch takes while they are answered without the model."""
PEEK = 64
PEEK_TAKE = 256
"""Before a take smaller than this, the next ``PEEK`` pending lines are looked up in the
cache; when most are there, the take starts at ``PEEK_TAKE`` (then grows to
``ANSWER_TAKE``) instead of growing from the model's batch size (1 on the CPU). Measured
on 2,000 hits: a first take of 256 beat 64, 128, 512 and 1,024 (a big first take
delays the first WAV and overlaps the feeder with the sink less); a cap of 1,024 beat
512, 2,048 and 4,096."""


def wav_path(row: LineRow) -> Path:
    return Path(row.out_dir) / f"{row.out_name}.wav"


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.wav"


def occupied(path: str | os.PathLike, sample_rate: int | None) -> str:
    """The error of a line whose output path holds something that is not its WAV (a
    user's file, a folder, a link, a WAV of another rate). ttsd never overwrites it,
    and retrying cannot help, so the line fails with this instead of going back to
    pending."""
    rate = f" at {sample_rate} Hz" if sample_rate else ""
    return (f"{os.fspath(path)} already exists and is not a valid WAV{rate}; ttsd does not "
            "overwrite it: move it away and submit the line again")


class Feeder:
    """``prepare=False`` (worker pools): the batch carries requests, and each worker
    phonemizes its own, so host-side text work scales with the workers.
    ``isolate_retries``: a line started before without finishing (its worker died)
    runs alone, so a line that kills workers fails by itself after max_attempts
    without taking its batch neighbours' attempts with it."""

    def __init__(self, cfg: Config, engine: Engine, sample_rates: dict[str, int], *,
                 prepare: bool = True, size: int = 0, gpu: bool | None = None,
                 isolate_retries: bool = False) -> None:
        self.cfg = cfg
        self.engine = engine
        self.sample_rates = sample_rates
        self.prepare = prepare
        self.isolate_retries = isolate_retries
        self.plan = prepare and engine.overlaps
        """Run the text half here (``Engine.plan``), beside the model thread's audio half."""
        self.planning_since: float | None = None
        """monotonic() when the text half in progress started (None: not planning)."""
        gpu = engine.device.type == "cuda" if gpu is None else gpu
        model_batch = cfg.batching.max_batch_size or size or (GPU_BATCH if gpu else 1)
        self.size = cfg.batching.lines(model_batch, gpu)
        """Lines per batch (``batching.lines_per_batch``); the engine runs their
        sentences ``model_batch`` at a time, sorted by length."""
        self.take_size = self.size
        """Rows taken at once: grows while lines are answered without the model (cache
        hits, WAVs already written), so a re-run of known lines costs one lookup, one
        folder fsync and one transaction per up to ``ANSWER_TAKE`` lines."""
        self.unreleased: list[int] = []
        """Lines taken (running) by a ``next_batch`` that failed before it returned them
        (a journal write refused by a full disk): the caller puts them back to pending."""

    def next_batch(self, store: Store, stop, idle: bool = False) -> Batch | None:
        """Up to ``size`` lines of one voice; waits ``max_wait_ms`` for a fuller batch.
        ``idle``: the model has nothing to run, so all of this batch's host work and
        text half is time the GPU waits: take ``batching.idle_batch`` of a batch."""
        answering = self.take_size != self.size
        if self.take_size < PEEK_TAKE and self.cfg.cache.enabled:
            looked, hits = store.cached_ahead(PEEK)
            if looked and hits * 2 >= looked:   # mostly known lines ahead: a bigger take
                self.take_size = PEEK_TAKE
                answering = True
        limit = self.take_size
        if idle and not answering:
            limit = max(1, round(self.size * self.cfg.batching.idle_batch))
        rows, dead = store.take(limit, self.cfg.daemon.max_attempts)
        taken = [r.id for r in rows]
        try:
            return self._shape(store, stop, rows, dead, limit, answering, taken)
        except BaseException:
            self.unreleased.extend(taken)   # running, in no batch: the caller releases them
            raise

    def _shape(self, store: Store, stop, rows: list[LineRow], dead: list[LineRow], limit: int,
               answering: bool, taken: list[int]) -> Batch | None:
        """``next_batch`` after its take: tops the batch up, sorts out what the model
        need not do, and prepares the rest (``taken`` grows with a second take)."""
        # A partial batch waits max_wait_ms for more lines — unless its lines are mostly
        # answered without the model (a bigger take, or cache rows ahead): then waiting
        # fills no model call.
        if rows and len(rows) < limit and self.cfg.batching.max_wait_ms > 0 \
                and not answering \
                and rows[0].attempts == 1 and not stop.is_set():  # a suspect stays alone
            time.sleep(self.cfg.batching.max_wait_ms / 1000)
            more, dead2 = store.take(limit - len(rows), self.cfg.daemon.max_attempts,
                                     fresh_only=True)
            taken.extend(r.id for r in more)
            rows, dead = rows + more, dead + dead2
        for row in dead:
            log.warning("line.failed", file=row.file, line=row.number,
                        error=gave_up(row.attempts))
        if not rows:
            return Batch([], "", dead=dead) if dead else None
        voice = rows[0].voice
        other = [r for r in rows if r.voice != voice]
        if other:  # one voice per batch; the rest go back without losing an attempt
            store.release([r.id for r in other])
            rows = [r for r in rows if r.voice == voice]
        if self.isolate_retries and len(rows) > 1:
            retried = next((r for r in rows if r.attempts > 1), None)
            if retried is not None:
                store.release([r.id for r in rows if r is not retried])
                rows = [retried]
        batch = Batch(rows, voice, dead=dead)
        self._answer_without_model(store, batch)
        if len(batch.groups) > self.size:   # a big take met new lines: keep a model batch
            extra = [r for g in batch.groups[self.size:] for r in g]
            batch.groups = batch.groups[:self.size]
            keep = {r.id for r in extra}
            batch.rows = [r for r in batch.rows if r.id not in keep]
            store.release(sorted(keep))
        answered = len(batch.existing) + len(batch.hits)
        self.take_size = (min(ANSWER_TAKE, self.take_size * 4) if answered >= len(rows) // 2
                          else self.size)
        t0 = time.perf_counter()
        requests = [Request(i, g[0].text, g[0].voice, g[0].speaker_id, g[0].length_scale,
                            g[0].noise_scale, g[0].noise_w, g[0].seed)
                    for i, g in enumerate(batch.groups)]
        batch.requests = requests
        if self.prepare:
            batch.prepared = self.engine.prepare(requests)
        batch.prepare_ms = (time.perf_counter() - t0) * 1000
        crash.point("mid_batch")
        if self.plan and batch.prepared:
            self.planning_since = time.monotonic()
            try:
                batch.plan = self.engine.plan(batch.prepared)
            finally:
                self.planning_since = None
        return batch

    def _answer_without_model(self, store: Store, batch: Batch) -> None:
        """Sorts the batch's rows: a WAV already in the outbox, a cache hit, or work for
        the model. Only a line taken before (attempts > 1: the process died or stopped
        while it was in flight) can have a WAV of its own in the outbox; a first take
        (attempts == 1) cannot, so its outbox path is not looked at (``Sink.write``
        still refuses to overwrite, and adopts a valid WAV it finds there)."""
        sr = batch.sample_rate = self.sample_rates.get(batch.voice)
        by_key: dict[str, list[LineRow]] = {}
        use_cache = self.cfg.cache.enabled
        cached = store.cache_get_many([r.cache_key for r in batch.rows if r.cache_key]) \
            if use_cache else {}
        check = _HitCheck()
        for row in batch.rows:
            if row.attempts > 1 and wav_ok(wav_path(row), sample_rate=sr):
                batch.existing.append(row)   # written before a crash, never committed
                continue
            key = row.cache_key
            if use_cache and key:
                entry = cached.get(key)
                if entry is not None and check.ok(entry, sr):
                    batch.hits.append((row, entry))
                    continue
            by_key.setdefault(key or f"line-{row.id}", []).append(row)
        check.save(store)
        batch.groups = list(by_key.values())


class _HitCheck:
    """Cache entries checked for one batch or chunk: one file check per key
    (``_cache_file_ok``); the damaged or missing are evicted and the newly checked
    stamped by ``save``."""

    def __init__(self) -> None:
        self.checked: dict[str, bool] = {}
        self.evict: list[str] = []
        self.stamps: list[tuple[str, int, int]] = []

    def ok(self, entry: dict, sample_rate: int | None) -> bool:
        key = entry["key"]
        ok = self.checked.get(key)
        if ok is None:
            ok = self.checked[key] = _cache_file_ok(entry, sample_rate, self.stamps)
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
        except sqlite3.OperationalError as exc:
            if fault(exc) is None:
                raise
            log.warning("cache.check_not_recorded", error=str(exc))


def place_hit(src: str, folder: Folder, name: str, sample_rate: int | None, link: bool,
              checked: bool = False) -> tuple[str, float | None]:
    """Put a cache hit's file at its line's WAV ``name`` in ``folder``: a copy that shares
    nothing with the cache (or, with ``cache.link``, a hard link). No folder fsync: the
    caller's. Returns ("placed", None), also when the path holds those very bytes
    already (placed before a crash); ("adopted", seconds): another whole WAV of an
    earlier attempt was there already and is kept; ("gone", None): the cache file was
    purged or is no longer a regular file (a miss: synthesize the line); ("taken",
    None): something that is not its WAV holds the path (never overwritten: the line
    fails, ``occupied``); ("error", None): the copy failed (disk full, I/O error: the
    line stays pending). ``checked``: ``src`` was just found a regular file."""
    try:
        link_or_copy(src, name, link=link, sync_dir=False, checked=checked, dst_dir_fd=folder.fd)
        return "placed", None
    except (FileNotFoundError, ValueError):
        return "gone", None
    except FileExistsError:
        if _same_bytes(src, folder, name):   # placed before a crash
            return "placed", None
        if wav_ok(name, sample_rate=sample_rate, dir_fd=folder.fd):
            return "adopted", wav_info(name, folder.fd)[2]
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
                     pool: Executor | None = None) -> None:
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
    check = _HitCheck()
    hits = []
    for ln in todo:
        entry = cached.get(ln.cache_key)
        sr = sample_rates.get(ln.voice or "")
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
            return place_hit(entry["path"], folder, f"{ln.out_name}.wav", sr, link,
                             checked=True)
        outcomes = pool.map(place, hits) if pool is not None else map(place, hits)
        for (ln, entry, _sr), (outcome, seconds) in zip(hits, outcomes):
            dst = str(folder.path / f"{ln.out_name}.wav")
            if outcome == "placed":
                ln.wav, ln.seconds, ln.cached = dst, float(entry["seconds"]), True
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
                   stamps: list[tuple[str, int, int]]) -> bool:
    """Whether a cache entry's file can answer a hit: the file the sink wrote (or last
    checked), unchanged: same inode, mtime and size, one lstat. A stamped file that no
    longer has its stamp was changed by someone since (an edit in place, with
    ``cache.link`` through an outbox WAV linked to it, or a replacement) and is a miss:
    the line is synthesized again, and nothing done outside ttsd is ever served. (An
    edit that restores the old mtime and keeps the size is not seen.) An entry from
    before stamps gets the full check — regular, the entry's size, a whole RIFF/WAVE
    header at the voice's rate — and, if it passes, a new stamp in ``stamps`` (key,
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
    if not wav_ok(path, sample_rate=sample_rate, size=entry["bytes"]):
        return False
    stamps.append((entry["key"], sqlite_ino(st.st_ino), st.st_mtime_ns))
    return True


class Synth:
    """Runs prepared batches through the engine (the only thread touching the GPU)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, batch: Batch, emit: Callable[[Batch], None] | None = None) -> Batch:
        """Both halves, or the audio half of a batch the feeder planned; ``model_ms``
        counts both halves either way. ``emit``: called with each piece of the batch
        (``Batch.piece``) whose lines are complete before the batch is, so that the sink
        writes them while the model runs the rest; the returned batch holds the rest.
        A piece is sent when the next one is ready, so the last call's lines come with
        the batch itself (one transaction, not an extra one for the stats alone)."""
        if batch.prepared:
            t0 = time.perf_counter()
            held: list[Result] = []

            def stream(results: list[Result]) -> None:
                nonlocal held
                if held:
                    emit(batch.piece(held))
                held = results

            use = stream if emit is not None else None
            if batch.plan is not None:
                results, batch.stats = self.engine.finish(batch.plan, use)
                batch.plan = None   # frees the text half's tensors
                text_ms = batch.stats.text_ms
            else:
                results, batch.stats = self.engine.run(batch.prepared, use)
                text_ms = 0.0
            batch.results = held + results
            if self.engine.device.type == "cuda":
                import torch
                torch.cuda.synchronize(self.engine.device)
            batch.model_ms = (time.perf_counter() - t0) * 1000 + text_ms
        return batch


class Sink:
    """Writes a finished batch, or a piece of one: WAVs first (atomic), then one store
    transaction."""

    def __init__(self, cfg: Config, engine: Engine, threads: int, health: Health | None = None,
                 stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ttsd-wav")
        self.subtype = cfg.output.subtype
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
        done: list[tuple[int, str, float, bool]] = []
        failed: list[tuple[int, str]] = []
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
        finished = {d[0] for d in done}
        cache_rows = [e for row_id, e in entries if row_id in finished] + self._kept()
        stats = None
        audio_s = sum(d[2] for d in done)
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

    @staticmethod
    def _adopt(batch: Batch, folders: _Folders, done: list, requeue: list[int]) -> None:
        """Lines whose whole WAV an earlier attempt wrote (the feeder saw it): done."""
        for row in batch.existing:
            folder = folders.get(row.out_dir)
            try:
                if folder is None:
                    raise FileNotFoundError(row.out_dir)
                seconds = wav_info(f"{row.out_name}.wav", folder.fd)[2]
            except (OSError, ValueError):   # gone or changed since the feeder looked
                requeue.append(row.id)
                continue
            folders.touch(folder)
            done.append((row.id, str(wav_path(row)), seconds, False))

    def _place_hits(self, store: Store, batch: Batch, folders: _Folders, done: list,
                    failed: list, requeue: list[int], hit_keys: list[str]) -> None:
        """The batch's cache hits, placed in their folders on the writer threads."""
        link = self.cfg.cache.link
        jobs = []
        for row, entry in batch.hits:
            folder = folders.get(row.out_dir)
            if folder is None:
                requeue.append(row.id)
                continue
            jobs.append((row, entry, folder, self.pool.submit(
                place_hit, entry["path"], folder, f"{row.out_name}.wav", batch.sample_rate,
                link)))
        for row, entry, folder, fut in jobs:
            outcome, seconds = fut.result()
            dst = str(wav_path(row))
            if outcome == "placed":
                folders.touch(folder)
                done.append((row.id, dst, float(entry["seconds"]), True))
                hit_keys.append(entry["key"])
            elif outcome == "adopted":   # a whole WAV of an earlier attempt
                folders.touch(folder)
                done.append((row.id, dst, seconds, False))
            elif outcome == "gone":   # purged since the feeder looked: synthesize it after all
                gone = _HitCheck()
                gone.evict.append(entry["key"])
                gone.save(store)
                requeue.append(row.id)
            elif outcome == "taken":   # anything else at the path stays, and the line fails
                log.error("wav.path_taken", path=dst, line=row.id)
                failed.append((row.id, occupied(dst, batch.sample_rate)))
            else:   # disk full, I/O error: the line stays pending
                self.health.trouble("outbox", folder.path, "a cache hit could not be placed",
                                    "sink")
                requeue.append(row.id)

    def _write_wavs(self, batch: Batch, groups: list[tuple[int, list[LineRow]]],
                    folders: _Folders, done: list, failed: list, requeue: list[int]
                    ) -> list[tuple[int, dict]]:
        """The synthesized lines' WAVs, on the writer threads; the first line of each
        group also leaves the cache its own copy. Returns (line id, cache entry)."""
        results = {r.key: r for r in batch.results}
        jobs = []
        for gi, group in groups:
            res = results.get(gi)
            if res is None or res.audio is None:
                err = res.error if res is not None else "no result from the engine"
                failed.extend((row.id, err) for row in group)
                continue
            for k, row in enumerate(group):
                folder = folders.get(row.out_dir)
                if folder is None:
                    requeue.append(row.id)
                    continue
                keep = k == 0 and self.cfg.cache.enabled and row.cache_key
                jobs.append((row, res, folder, self.pool.submit(
                    self._write_one, row, res, folder, bool(keep))))
        entries = []
        for row, res, folder, fut in jobs:
            try:
                refused, entry = fut.result()
            except OSError as exc:   # disk full, I/O error: the line stays pending
                self._outbox_failed(row.out_dir, exc)
                requeue.append(row.id)
                continue
            if refused:   # for good: pending again, it would be refused again, forever
                log.error("wav.path_taken", path=str(wav_path(row)), line=row.id)
                failed.append((row.id, refused))
                continue
            folders.touch(folder)
            done.append((row.id, str(wav_path(row)), res.seconds, False))
            if entry is not None:
                entries.append((row.id, entry))
            crash.point("after_rename")
        return entries

    def _outbox_failed(self, folder: str | os.PathLike, exc: OSError) -> None:
        """A write into the outbox failed: the outbox is blocked (the feeder stops
        taking lines and probes it with back-off) and the line goes back to pending."""
        self.health.trouble("outbox", folder, fault(exc) or str(exc), "sink")

    def _journal(self, write: Callable, *args, **kwargs) -> bool:
        """Run a store write, waiting out a journal that cannot be written (full disk,
        read-only) with back-off; False when a stop came first (the lines stay running,
        and the next start finishes them, adopting the WAVs already written)."""
        return self.health.retry("state", self.cfg.paths.db,
                                 lambda: write(*args, **kwargs), self.stop, "sink")

    def _write_one(self, row: LineRow, res: Result, folder: Folder, keep: bool
                   ) -> tuple[str | None, dict | None]:
        """Writes the line's WAV; a valid one already there (an earlier attempt's) is
        kept. Returns why the line fails for good (another file holds its path), or
        None; and with ``keep``, the line's cache entry: with ``cache.link`` a hard link
        to the WAV (returned), else a file of its own written from the same audio on
        the writer threads after this batch (``_keeping``), so that nothing done to the
        outbox changes it and its write is not on the way to the line's commit. OSError
        (a full disk…) leaves the line pending."""
        name = f"{row.out_name}.wav"
        try:
            write_wav(name, res.audio, res.sample_rate, self.subtype, sync_dir=False,
                      dir_fd=folder.fd)
        except FileExistsError:
            if not wav_ok(name, sample_rate=res.sample_rate, dir_fd=folder.fd):
                return occupied(wav_path(row), res.sample_rate), None
        if not keep:
            return None, None
        if self.cfg.cache.link:
            return None, self._entry(row, res, lambda dst: replace_with_link(
                name, dst, link=True, src_dir_fd=folder.fd))
        keeping = self.pool.submit(self._entry, row, res, lambda dst: write_wav(
            dst, res.audio, res.sample_rate, self.subtype, overwrite=True, sync_dir=False))
        with self._keeping_lock:
            self._keeping.append(keeping)
        return None, None

    def _entry(self, row: LineRow, res: Result, make: Callable[[Path], object]) -> dict | None:
        """Make the line's cache file with ``make`` (fsynced, but without a folder fsync:
        one lost in a power cut is a miss later, never garbage under its name) and
        return its entry. The cache is an optimization: a file that cannot be made is
        logged and skipped."""
        dst = cache_path(self.cfg.paths.cache, row.cache_key)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            make(dst)
            st = os.lstat(dst)   # the stamp of a file written just now
        except (OSError, ValueError) as exc:
            log.warning("cache.store_failed", key=row.cache_key[:12], error=str(exc))
            return None
        return {"key": row.cache_key, "path": str(dst), "bytes": st.st_size,
                "seconds": res.seconds, "voice": row.voice, "ino": sqlite_ino(st.st_ino),
                "mtime_ns": st.st_mtime_ns}


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

    def sync(self, done: list[tuple[int, str, float, bool]], requeue: list[int]
             ) -> list[tuple[int, str, float, bool]]:
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
            if os.path.dirname(d[1]) in failed:
                requeue.append(d[0])
            else:
                keep.append(d)
        return keep

    def close(self) -> None:
        for folder in self._open.values():
            if folder is not None:
                folder.close()
