"""The daemon: wires the stages into threads, handles signals, heartbeat and systemd.

Threads (data flows one way, through queues bounded in whole batches):

    files   ─ Ingest: inbox → claim → parse → store; finished files → manifest, done/
    feeder  ─ Feeder: store → batch (+ cache hits) → phonemes        ─┐ queue (prefetch)
              (EngineOptions.overlap_halves: → the text half too, on a side stream)
    model   ─ Synth: the engine on the device; pings the systemd watchdog  ─┐ queue
              (several devices or Ray: a WorkerPool, one driver thread per worker
               process/actor; see service/pool.py)
    sink    ─ Sink: WAVs (a small pool) → one store transaction per batch (or piece:
              lines complete before their batch)
    main    ─ signals, heartbeat, sd_notify STATUS, --once completion, SIGHUP reload

One daemon per state folder (``sitelock``). A place that cannot be written (a full or
read-only outbox, journal, done/ or failed/) is reported and waited out with back-off
(``health``): the feeder takes no lines for an outbox that cannot take their WAVs.

The first SIGTERM/SIGINT asks for a warm stop: no new claims or batches, the batch in
flight finishes (within daemon.stop_timeout_s) and lines taken but not started go back
to pending. A second signal stops at once (``_stop_now``), putting its lines back too.
"""

from __future__ import annotations

import gc
import math
import os
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttsd import __version__
from ttsd.cache import answer_new_lines, audio_format
from ttsd.config import Config
from ttsd.engine.device import off_this_thread
from ttsd.engine.options import EngineOptions
from ttsd.engine.runtime import start_engine
from ttsd.errors import ConfigError, DeviceLostError, StoreDamagedError
from ttsd.health import MAX_RETRY_S, Health, fault, probe
from ttsd.ingest.files import Ingest
from ttsd.jobs import LazyVoices, voice_facts
from ttsd.log import get_logger
from ttsd.output.dispose import remove_stale_temps
from ttsd.output.render import LineAudio
from ttsd.pipeline.batcher import Batch, Feeder
from ttsd.service import sitelock, workers
from ttsd.service.control import (
    EXIT_CRASH,
    EXIT_DEVICE_LOST,
    EXIT_OK,
    EXIT_TEMPFAIL,
    Control,
)
from ttsd.service.loops import StageLoops
from ttsd.service.notify import Notifier
from ttsd.service.pool import WorkerPool
from ttsd.service.progress import Bar
from ttsd.store.errors import OperationalError
from ttsd.store.journal import NewLine, Store, damaged

log = get_logger(__name__)

GIL_SWITCH_S = 0.001
"""Python's thread switch interval in the daemon (its default is 5 ms): the model thread
gets the GIL back sooner from the feeder and the sink (docs/performance.md)."""

@dataclass
class Progress:
    lines_done: int = 0
    lines_failed: int = 0
    audio_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


class Daemon(StageLoops, Control):
    """The whole daemon on one site: builds the stages, starts their threads, waits."""

    def __init__(self, cfg: Config, *, once: bool = False, progress: bool = False) -> None:
        self.cfg = cfg
        self.once = once
        self.show_progress = progress
        self.bar = Bar(sys.stderr) if progress else None
        self.stop = threading.Event()
        self.reload = threading.Event()
        """Set by SIGHUP: the main loop reads the config again."""
        self.new_lines = threading.Event()
        """Set by ingest when lines reach the store: the idle feeder takes them at once
        instead of at its next poll."""
        self.fatal: BaseException | None = None
        self.health = Health()
        """Places that cannot be written now (full, read-only, gone): waited out."""
        self.notifier = Notifier()
        self.started_at = time.time()
        self.progress = Progress()
        self.batch_q: queue.Queue[Batch | None] = queue.Queue(maxsize=cfg.batching.prefetch)
        self.write_q: queue.Queue[Batch | None] = queue.Queue(
            maxsize=0 if self._streams() else cfg.batching.prefetch)
        self.write_slots = threading.Semaphore(cfg.batching.prefetch)
        """When the model streams, the write queue also holds the pieces of the
        batch in the model, which must never block the model thread; whole batches
        waiting for the sink are bounded by this instead (``prefetch``)."""
        self.in_flight: set[int] = set()
        self._lock = threading.Lock()
        self.last_work = -math.inf
        """monotonic() when the model last finished a batch (never, at first: the
        first batch is a burst's first)."""
        self.last_release = time.monotonic()
        self.busy = False
        self.model_batches = 0
        """Batches handed to the model thread and not finished by it (the feeder's
        ``idle``: 0 means the GPU waits for the next batch)."""
        self.feeder: Feeder | None = None
        self._hit_pool: ThreadPoolExecutor | None = None
        """Places the cache hits of files being parsed (several copies at a time)."""
        self._files_blocked: set[str] = set()
        """Places the files stage found blocked (cleared by its next good step)."""
        self.gave_up = ""
        """``run --once``: why it stopped waiting for a blocked place (empty: it did not)."""
        self.pool: Any = None
        self._ray_started = False

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        """Open the site, build and warm the stages, serve until stopped; the exit status."""
        store = self._open_site()
        removed = self._build(store)
        requeued = self._recover(store)
        if requeued is None:
            store.close()
            return EXIT_OK   # stopped while waiting for the journal
        self._serve(store, requeued, removed)
        return self._exit_status()

    def _open_site(self) -> Store:
        """The site's folders, its lock and its journal; the outbox tried once."""
        cfg = self.cfg
        try:
            cfg.paths.state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state folder {cfg.paths.state} cannot be created: "
                              f"{exc.strerror}") from None
        try:
            self._site_lock = sitelock.acquire(cfg.paths.state)   # before anything is touched
        except OSError as exc:
            raise ConfigError(f"state folder {cfg.paths.state} is not writable: its lock file "
                              f"cannot be created ({exc.strerror})") from None
        store = self._open_store()   # a clear error first if the state folder is unusable
        self.progress_from = store.done_totals() if self.bar is not None else None
        for p in (cfg.paths.inbox, cfg.paths.outbox, cfg.paths.done, cfg.paths.failed,
                  cfg.paths.work, cfg.paths.cache):
            try:
                p.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                store.close()
                raise ConfigError(f"folder {p} cannot be created: {exc.strerror}") from None
        try:   # a restart on a full outbox synthesizes nothing until it has room
            probe(cfg.paths.outbox, root=True)
        except OSError as exc:
            self.health.trouble("outbox", cfg.paths.outbox, fault(exc) or str(exc), "sink")
        return store

    def _build(self, store: Store) -> int:
        """The engine (or worker pool), warmed up, and the ingest stage; how many stale
        temp files were removed."""
        cfg = self.cfg
        self._signals()
        t0 = time.perf_counter()
        # A kill -9 while the converted voice was being cached leaves its temp behind;
        # the cache is shared with other processes (say, bench): only old temps go.
        removed = self._remove_stale_temps(cfg.paths.voices_cache, older_than_s=3600)
        pooled = workers.pool_wanted(cfg)
        devices = workers.local_devices(cfg)
        # With a worker pool the daemon's own engine only answers voice facts (CPU).
        options = EngineOptions.from_config(cfg, device="cpu" if pooled else devices[0])
        self.engine = start_engine(options)
        sys.setswitchinterval(GIL_SWITCH_S)
        default = cfg.engine.voice
        facts = {default: voice_facts(self.engine, default)}  # other voices load on first use
        gpu = any(workers.is_gpu(d) for d in devices) if pooled else \
            self.engine.device.type == "cuda"
        self.ingest = Ingest(cfg, LazyVoices(self.engine, facts), self.stop,
                             fmt=audio_format(cfg, gpu))
        self.ingest.on_lines = self.new_lines.set
        if cfg.cache.enabled:   # known lines are answered as they are parsed
            rates = {n: v.sample_rate for n, v in self.engine.voices.items()}
            audio = LineAudio.of(cfg.output)
            self._hit_pool = ThreadPoolExecutor(max_workers=cfg.batching.writers,
                                                thread_name_prefix="ttsd-hit")

            def answer(store: Store, lines: list[NewLine], out_dir: Path) -> None:
                answer_new_lines(store, lines, out_dir, rates, cfg.cache.link, self._hit_pool,
                                 audio)

            def answered(n: int) -> None:
                self.progress.lines_done += n
            self.ingest.answer, self.ingest.on_answered = answer, answered
        warm_s = 0.0
        if pooled:
            self._start_pool(store)
        elif cfg.engine.warmup:   # the rest while the model thread is idle (warm_step)
            warm_s = off_this_thread(self.engine.device, lambda: self.engine.warmup(
                default, defer=self.engine.warms_up_later))
        pending = self.engine.pending_warmup
        log.info("engine.ready", voice=default, device=str(self.engine.device),
                 dtype=str(self.engine.dtype).split(".")[-1], load_s=round(time.perf_counter() - t0, 2),
                 warmup_s=round(warm_s, 2), warmup_steps_left=len(pending) if pending else 0)
        # The ~300,000 objects of torch, the voice and the engine live as long as the
        # process: keep them out of the cyclic collector, whose full passes over them
        # (≈ 140 ms on 2 CPU cores, holding the GIL) otherwise stall every thread now
        # and then (one every ~12,000 cached lines).
        gc.collect()
        gc.freeze()
        return removed + (self._remove_stale_temps(cfg.paths.outbox)
                          + self._remove_stale_temps(cfg.paths.cache))

    def _recover(self, store: Store) -> int | None:
        """Lines left running by the last process go back to pending (waiting out a
        journal that cannot be written); how many, or None if stopped meanwhile."""
        requeued = 0

        def recover() -> None:
            nonlocal requeued
            requeued = store.recover(self.cfg.daemon.max_attempts)
        if not self.health.retry("state", self.cfg.paths.db, recover, self.stop, "start"):
            return None
        return requeued

    def _serve(self, store: Store, requeued: int, removed: int) -> None:
        """Start the stage threads and the watcher, then run the main loop until stopped;
        everything is shut down on the way out."""
        self._files_step(store, self.ingest.recover)
        self.ingest.inbox.start()
        # The lines stage starts before the start-up scan, so that the first lines of a
        # big file dropped while we were down are taken as soon as their chunk is in the
        # store (``ingest.files.FIRST_CHUNK``), not after the whole file is parsed.
        threads = [threading.Thread(target=self._guard(f), name=f"ttsd-{n}", daemon=True)
                   for n, f in (("feeder", self._feeder_loop), ("sink", self._sink_loop),
                                ("model", self._model_loop))]
        self._model_loop_thread = threads.pop()
        files = threading.Thread(target=self._guard(self._files_loop), name="ttsd-files",
                                 daemon=True)
        try:
            for t in [*threads, self._model_loop_thread]:
                t.start()
            self._files_step(store, self.ingest.step)   # the start-up scan
            log.info("daemon.started", pid=os.getpid(), version=__version__,
                     requeued=requeued, stale_temps=removed, queue=store.pending_count())
            self.notifier.ready(self._status_text(store))
            files.start()   # after the scan: one thread at a time runs ``Ingest.step``
            threads.append(files)
            self._main_loop(store)
        finally:
            self.stop.set()
            self.notifier.stopping()
            if files.ident is None:   # never started (its loop stops the inbox)
                self.ingest.inbox.stop()
            self._shutdown(store, threads)

    def _exit_status(self) -> int:
        """How the run ended: a damaged journal is raised (exit 4), a crashed thread or
        lost device, ``--once`` giving up or its report."""
        cfg = self.cfg
        if isinstance(self.fatal, StoreDamagedError):
            raise self.fatal
        if damaged(self.fatal):   # met mid-run, past the open's checks
            raise StoreDamagedError(cfg.paths.db, str(self.fatal))
        if self.fatal is not None:
            return EXIT_DEVICE_LOST if isinstance(self.fatal, DeviceLostError) else EXIT_CRASH
        if self.once and self.gave_up:
            sys.stderr.write(f"ttsd run --once: gave up after {cfg.daemon.once_blocked_s:g} s: "
                             f"{self.gave_up}\n")
            return EXIT_TEMPFAIL
        if self.once:
            return self._once_report()
        return EXIT_OK

    def _open_store(self) -> Store:
        """The store, once the journal can be opened: a full or failing disk is waited
        out with back-off (systemd hears why and is asked for the time), a state folder
        that cannot be written at all is a ConfigError, a damaged journal
        StoreDamagedError."""
        while True:
            try:
                store = Store(self.cfg.paths.db)
            except OperationalError as exc:
                why = fault(exc)
                if why is None:
                    raise
                self.health.trouble("state", self.cfg.paths.db, why, "start")
                self.notifier.status(f"starting: {self.health.text()}")
                self.notifier.extend_timeout(MAX_RETRY_S + 30)
                self.health.wait("state", self.stop)
                if self.stop.is_set():
                    raise ConfigError(f"stopped while the journal {self.cfg.paths.db} could "
                                      f"not be opened: {why}") from None
                continue
            self.health.clear("state", "start")
            try:
                store.check()   # damage anywhere stops us before we write (exit 4)
            except BaseException:
                store.close()
                raise
            return store

    def _remove_stale_temps(self, folder: Path, older_than_s: float = 0.0) -> int:
        """``remove_stale_temps``, reporting (not raising) a folder it cannot clean."""
        try:
            return remove_stale_temps(folder, older_than_s)
        except OSError as exc:
            log.warning("writer.stale_temps_left", folder=str(folder), error=str(exc))
            return 0

    def _start_pool(self, store: Store) -> None:
        cfg = self.cfg
        if cfg.cluster.backend == "ray":
            from ttsd.service import (
                ray_backend as cluster,  # ray is imported only here, only for this backend
            )
            self._ray_started = cluster.connect(cfg)
            slots = cluster.ray_slots(cfg)
        else:
            slots = workers.local_slots(cfg)

        def forget(ids: list[int]) -> None:
            with self._lock:
                self.in_flight.difference_update(ids)

        def on_close() -> None:
            if self._ray_started:
                from ttsd.service import ray_backend as cluster
                cluster.shutdown(True)

        self.pool = WorkerPool(cfg, slots, self.batch_q, self.write_q, self.stop,
                                       forget, on_close)
        self.pool.start()
        log.info("workers.started", backend=cfg.cluster.backend, workers=len(slots),
                 ready=self.pool.ready_count(), devices=[s.device for s in slots])

    def _guard(self, fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - outermost loop of a thread
                if not isinstance(exc, DeviceLostError):
                    log.error("daemon.thread_crashed", thread=threading.current_thread().name,
                              error=str(exc), traceback=traceback.format_exc())
                else:
                    log.error("engine.device_lost", error=str(exc))
                self.fatal = exc
                self.stop.set()
        return run

    # ------------------------------------------------------------------ loops

    def _main_loop(self, store: Store) -> None:
        beat = self.cfg.daemon.heartbeat_s
        while not self.stop.is_set():
            self._heartbeat(store)
            if self.once and self._once_finished(store):
                log.info("daemon.once_done", files_done=self.ingest.finished_files,
                         files_failed=self.ingest.failed_files)
                break
            if self.once and self.health.blocked_for_s() > self.cfg.daemon.once_blocked_s:
                self.gave_up = self.health.text()
                log.error("daemon.once_gave_up", after_s=self.cfg.daemon.once_blocked_s,
                          blocked=self.gave_up)
                break
            if self.reload.is_set():
                self._reload()
            if self.show_progress:
                self._print_progress(store)
            self.stop.wait(min(beat, 0.5))
        if self.show_progress:
            self._print_progress(store, final=True)

    # ------------------------------------------------------------------ stop

    def _shutdown(self, store: Store, threads: list[threading.Thread]) -> None:
        deadline = time.monotonic() + self.cfg.daemon.stop_timeout_s
        for t in [*threads, self._model_loop_thread]:
            if t.ident is not None:   # started
                t.join(timeout=max(0.1, deadline - time.monotonic()))
        # Batches prepared but never run go back to pending, their attempt undone.
        leftovers = []
        while True:
            try:
                b = self.batch_q.get_nowait()
            except queue.Empty:
                break
            if b is not None:
                leftovers.extend(r.id for r in b.rows)
        if leftovers:
            self._release(store, leftovers)
        self._heartbeat(store, state="stopped")
        if self._hit_pool is not None:
            self._hit_pool.shutdown(wait=True)
        self.engine.close()
        log.info("daemon.stopped", requeued=len(leftovers), blocked=self.health.text() or None)
        store.close()

    # ------------------------------------------------------------------ reporting
