"""The daemon: wires the stages into threads, handles signals, heartbeat and systemd.

Threads (data flows one way, through queues bounded in whole batches):

    files   ─ Ingest: inbox → claim → parse → store; finished files → manifest, done/
    feeder  ─ Feeder: store → batch (+ cache hits) → phonemes        ─┐ queue (prefetch)
              (engine.overlap_halves: → the text half too, on a side stream)
    model   ─ Synth: the engine on the device; pings the systemd watchdog  ─┐ queue
              (several devices or Ray: a WorkerPool, one driver thread per worker
               process/actor; see ttsd/workers.py)
    sink    ─ Sink: WAVs (a small pool) → one store transaction per batch (or piece:
              lines complete before their batch, batching.stream_writes)
    main    ─ signals, heartbeat, sd_notify STATUS, --once completion, SIGHUP reload

One daemon per state folder (``sitelock``). A place that cannot be written (a full or
read-only outbox, journal, done/ or failed/) is reported and waited out with back-off
(``health``): the feeder takes no lines for an outbox that cannot take their WAVs.

The first SIGTERM/SIGINT asks for a warm stop: no new claims or batches, the batch in
flight finishes (within daemon.stop_timeout_s) and lines taken but not started go back
to pending. A second signal stops at once (``_stop_now``), putting its lines back too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttsd import __version__

from ttsd.service import sitelock

from ttsd.service import workers
from ttsd.config import Config
from ttsd.engine.device import configure_process
from ttsd.engine.options import EngineOptions
from ttsd.engine.runtime import Engine, open_engine
from ttsd.errors import ConfigError, DeviceLostError, StoreDamagedError, TtsdError
from ttsd.health import MAX_RETRY_S, Health, fault, probe
from ttsd.ingest.files import Ingest, VoiceFacts, audio_format
from ttsd.log import get_logger
from ttsd.log import setup as log_setup
from ttsd.service.notify import Notifier
from ttsd.pipeline.sink import Batch, Feeder, Sink, Synth, answer_new_lines
from ttsd.service.progress import Bar
from ttsd.store.journal import NewLine, Store, damaged
from ttsd.output.fsio import remove_stale_temps

log = get_logger(__name__)
EXIT_OK = 0
EXIT_FAILED = 1
"""``run --once``: every file was finished, and some line or file failed."""
EXIT_CRASH = 70
"""A thread of the daemon crashed (a bug: the log has the traceback)."""
EXIT_DEVICE_LOST = 75
EXIT_TEMPFAIL = 75
"""A temporary failure: the device was lost, or ``run --once`` gave up waiting for a
place it cannot write (``daemon.once_blocked_s``)."""
IDLE_S = 1.0
"""The model counts as idle (the feeder takes ``batching.idle_batch`` of a batch) after
this long with no batch queued or running: the first batch of a burst."""


@dataclass
class Progress:
    lines_done: int = 0
    lines_failed: int = 0
    audio_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


def voice_facts(engine: Engine, name: str) -> VoiceFacts:
    lv = engine.voice(name)
    info = lv.info
    inf = info.inference
    return VoiceFacts(name, lv.digest, info.sample_rate, info.speaker_id, inf["noise_scale"],
                      inf["noise_w"], inf["length_scale"])


class Daemon:
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
        """With ``batching.stream_writes`` the write queue also holds the pieces of the
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
        self._signals()
        t0 = time.perf_counter()
        # A kill -9 while the converted voice was being cached leaves its temp behind;
        # the cache is shared with other processes (say, bench): only old temps go.
        removed = self._remove_stale_temps(cfg.paths.voices_cache, older_than_s=3600)
        pooled = workers.pool_wanted(cfg)
        devices = workers.local_devices(cfg)
        # With a worker pool the daemon's own engine only answers voice facts (CPU).
        options = EngineOptions.from_config(cfg, device="cpu" if pooled else devices[0])
        configure_process(options)
        self.engine = open_engine(options)
        if cfg.daemon.gil_switch_ms:
            sys.setswitchinterval(cfg.daemon.gil_switch_ms / 1000)
        default = cfg.engine.voice
        facts = {default: voice_facts(self.engine, default)}  # other voices load on first use
        gpu = any(d.startswith("cuda") for d in devices) if pooled else \
            self.engine.device.type == "cuda"
        self.ingest = Ingest(cfg, _LazyVoices(self.engine, facts), self.stop,
                             fmt=audio_format(cfg, gpu))
        self.ingest.on_lines = self.new_lines.set
        if cfg.cache.enabled:   # known lines are answered as they are parsed
            rates = {n: v.sample_rate for n, v in self.engine.voices.items()}

            self._hit_pool = ThreadPoolExecutor(max_workers=cfg.batching.writers,
                                                thread_name_prefix="ttsd-hit")

            def answer(store: Store, lines: list[NewLine], out_dir: Path) -> None:
                answer_new_lines(store, lines, out_dir, rates, cfg.cache.link, self._hit_pool)

            def answered(n: int) -> None:
                self.progress.lines_done += n
            self.ingest.answer, self.ingest.on_answered = answer, answered
        warm_s = 0.0
        if pooled:
            self._start_pool(store)
        elif cfg.engine.warmup:
            warm_s = self.engine.warmup(default)
        log.info("engine.ready", voice=default, device=str(self.engine.device),
                 dtype=str(self.engine.dtype).split(".")[-1], load_s=round(time.perf_counter() - t0, 2),
                 warmup_s=round(warm_s, 2))
        # The ~300,000 objects of torch, the voice and the engine live as long as the
        # process: keep them out of the cyclic collector, whose full passes over them
        # (≈ 140 ms on 2 CPU cores, holding the GIL) otherwise stall every thread now
        # and then (one every ~12,000 cached lines).
        gc.collect()
        gc.freeze()
        removed += (self._remove_stale_temps(cfg.paths.outbox)
                    + self._remove_stale_temps(cfg.paths.cache))
        requeued = 0

        def recover() -> None:
            nonlocal requeued
            requeued = store.recover(cfg.daemon.max_attempts)
        if not self.health.retry("state", cfg.paths.db, recover, self.stop, "start"):
            store.close()
            return EXIT_OK   # stopped while waiting for the journal
        self._files_step(store, self.ingest.recover)
        self.ingest.inbox.start()
        # The lines stage starts before the start-up scan, so that the first lines of a
        # big file dropped while we were down are taken as soon as their chunk is in the
        # store (``ingest.FIRST_CHUNK``), not after the whole file is parsed.
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
            except sqlite3.OperationalError as exc:
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

    def _files_step(self, store: Store, step: Callable[[Store], object]) -> bool:
        """One step of the files stage (claim, parse, journal, finish). A fault of the
        machine met on the way blocks the place it names (a full outbox, done/ or
        failed/ folder, or journal) and makes the next step resume what was cut off
        (``Ingest.recover``: files left parsing, claimed copies with no row). True when
        the step went through."""
        try:
            if self.ingest.resume:
                self.ingest.resume = False
                self.ingest.recover(store)
            step(store)
        except (OSError, sqlite3.OperationalError) as exc:
            # Any OSError: a folder ttsd cannot write now, for whatever reason (a user's
            # folder named manifest.csv too) is reported and retried, never a crash.
            why = fault(exc) or (str(exc) if isinstance(exc, OSError) else None)
            if why is None:
                raise
            place, path = self._place_of(exc)
            self.health.trouble(place, path, why, "files")
            self._files_blocked.add(place)
            self.ingest.resume = True
            return False
        for place in self._files_blocked:
            self.health.clear(place, "files")
        self._files_blocked.clear()
        return True

    def _place_of(self, exc: BaseException) -> tuple[str, str]:
        """The place whose fault ``exc`` is, and the path it names: "manifests" for the
        outbox (the files stage writes manifests there; the sink's WAVs are "outbox"),
        else done, failed, inbox or state."""
        paths = self.cfg.paths
        where = getattr(exc, "filename", None)
        if isinstance(exc, OSError) and where:
            full = os.path.abspath(os.fsdecode(where))
            for place in ("outbox", "done", "failed", "inbox", "state"):
                root = str(getattr(paths, place))
                if full == root or full.startswith(root + os.sep):
                    return "manifests" if place == "outbox" else place, full
            return "state", full
        return "state", str(paths.db)

    def _once_report(self) -> int:
        """``run --once``'s summary on stderr; EXIT_FAILED when a line or file failed."""
        store = Store(self.cfg.paths.db)
        try:
            got = store.run_summary(self.started_at)
        finally:
            store.close()
        files = (f"{got['files_done']:,} file{'' if got['files_done'] == 1 else 's'} done, "
                 f"{got['files_failed']:,} failed")
        total = got["lines_done"] + got["lines_failed"]
        lines = f"{got['lines_done']:,} line{'' if got['lines_done'] == 1 else 's'} done"
        if got["lines_failed"]:
            lines += f", {got['lines_failed']:,} of {total:,} lines failed"
        out = [f"ttsd run --once: {files}; {lines}"]
        for name, number, error in got["failures"]:
            out.append(f"  {name}{'' if number is None else f' line {number}'}: {error}")
        shown = len(got["failures"])
        if shown < got["files_failed"] + got["lines_failed"]:
            out.append(f"  … and {got['files_failed'] + got['lines_failed'] - shown:,} more "
                       "(the manifests and failed/*.error.txt have them all)")
        sys.stderr.write("\n".join(out) + "\n")
        return EXIT_FAILED if got["files_failed"] or got["lines_failed"] else EXIT_OK

    def _start_pool(self, store: Store) -> None:
        cfg = self.cfg
        if cfg.cluster.backend == "ray":
            from ttsd.service import ray_backend as cluster  # ray is imported only here, only for this backend
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

        self.pool = workers.WorkerPool(cfg, slots, self.batch_q, self.write_q, self.stop,
                                       forget, on_close)
        self.pool.start()
        log.info("workers.started", backend=cfg.cluster.backend, workers=len(slots),
                 ready=self.pool.ready_count(), devices=[s.device for s in slots])

    def _signals(self) -> None:
        """SIGTERM or SIGINT: a warm stop; a second one: ``_stop_now``. SIGHUP: the
        config is read again (``_reload``, from the main loop)."""
        def handler(signum: int, _frame: Any) -> None:
            if self.stop.is_set():
                self._stop_now(signum)
            log.info("daemon.stopping", signal=signal.Signals(signum).name)
            busy = self.pool.busy() if self.pool is not None else self.busy
            if busy:   # the batch in the model may finish: ask systemd for the time
                self.notifier.extend_timeout(self.cfg.daemon.stop_timeout_s)
            self.stop.set()

        def hangup(_signum: int, _frame: Any) -> None:
            self.reload.set()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGHUP, hangup)

    def _stop_now(self, signum: int) -> None:
        """The second stop signal: exit now (status 128 + the signal), the batch in
        flight abandoned, but nothing held is left behind: the lines taken go back to
        pending (their attempt counted, as for a crash: a line that hangs the model
        must not get endless tries), the phonemizer and worker processes are ended,
        and their semaphores released."""
        log.warning("daemon.force_stop", signal=signum)
        with contextlib.suppress(Exception):   # the journal may be the reason we hang
            store = Store(self.cfg.paths.db)
            try:
                store.recover(self.cfg.daemon.max_attempts)
            finally:
                store.close()
        end_children()
        os._exit(128 + signum)

    def _reload(self) -> None:
        """SIGHUP: read the config file again. What can change while running is applied
        (the log level, the [input] section but for polling); every other changed key is
        named as needing a restart; a config that does not load is refused, and the
        daemon goes on with the one it has. The inbox is looked at again too. (Logs go
        to stderr, the journal under systemd: there is no log file to reopen.)"""
        self.reload.clear()
        try:
            new = Config.load(self.cfg.source) if self.cfg.source else self.cfg
        except TtsdError as exc:
            log.error("config.reload_failed", error=str(exc))
            return
        old_d, new_d = self.cfg.to_dict(), new.to_dict()
        changed = sorted(f"{sec}.{key}" for sec in new_d for key in new_d[sec]
                         if new_d[sec][key] != old_d[sec].get(key))
        applied = [k for k in changed if k in LIVE_KEYS or
                   (k.startswith("input.") and k != "input.polling")]
        if "daemon.log_level" in applied:
            log_setup(new.daemon.log_level)
        if any(k.startswith("input.") for k in applied):
            self.ingest.use_input(new.input)
        self.cfg = dataclasses.replace(self.cfg, input=new.input, daemon=dataclasses.replace(
            self.cfg.daemon, log_level=new.daemon.log_level))
        self.ingest.inbox.rescan()
        rest = [k for k in changed if k not in applied]
        log.info("config.reloaded", source=str(self.cfg.source), applied=applied)
        if rest:
            log.warning("config.restart_needed", keys=rest,
                        hint="these take effect when the daemon is restarted")

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

    def _once_finished(self, store: Store) -> bool:
        """Every file the inbox held (settling ones included) is finished. The order
        of the checks follows a file's way: it leaves the inbox's watch list when its
        claim begins (``in_hand``), and leaves ``in_hand`` once its row is in the store,
        so no file can slip between two of them unseen."""
        if self.ingest.inbox.pending() or self.ingest.in_hand:
            return False
        busy = self.pool.busy() if self.pool is not None else self.busy
        return (not busy and self.batch_q.empty() and self.write_q.empty()
                and store.pending_count() == 0 and not store.files_in("parsing", "queued"))

    def _files_loop(self) -> None:
        store = Store(self.cfg.paths.db)
        try:
            while not self.stop.is_set():
                if not self._files_step(store, self.ingest.step):
                    for place in self._files_blocked:
                        self.health.wait(place, self.stop)
                    continue
                self.stop.wait(0.2)
            self._files_step(store, self.ingest.finish_ready)
        finally:
            self.ingest.inbox.stop()
            store.close()

    def _feeder_loop(self) -> None:
        store = Store(self.cfg.paths.db)
        rates = {n: v.sample_rate for n, v in self.engine.voices.items()}
        max_attempts = self.cfg.daemon.max_attempts
        if self.pool is None:
            feeder = self.feeder = Feeder(self.cfg, self.engine, rates)
        else:   # workers phonemize; a retried line runs alone
            gpu = any("cuda" in s.device or "gpu" in s.device for s in self.pool.slots)
            feeder = Feeder(self.cfg, self.engine, rates, prepare=False, gpu=gpu,
                            isolate_retries=True)
        try:
            while not self.stop.is_set():
                if not self._outbox_open() or not self._journal_open(store, feeder):
                    continue
                # A line that was in flight when the process died runs alone, with
                # nothing else taken: if it kills the process again, no other line
                # loses an attempt.
                if self.in_flight and store.suspect_next(max_attempts):
                    self.stop.wait(0.02)
                    continue
                with self._lock:   # no batch queued or running, for a while: a burst
                    idle = self.pool is None and self.model_batches == 0 and \
                        time.monotonic() - self.last_work > IDLE_S
                # (a feeder slower than the model leaves it idle for moments, and
                # gets whole batches: halving them would only pad more)
                try:
                    batch = feeder.next_batch(store, self.stop, idle=idle)
                except sqlite3.OperationalError as exc:
                    why = fault(exc)
                    if why is None:
                        raise
                    self.health.trouble("state", self.cfg.paths.db, why, "feeder")
                    continue
                if batch is None:
                    self.new_lines.wait(0.05)   # a stop is seen within 50 ms, as before
                    self.new_lines.clear()
                    continue
                with self._lock:
                    self.in_flight.update(r.id for r in batch.rows)
                    self.model_batches += self.pool is None
                while not self.stop.is_set():
                    try:
                        self.batch_q.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                else:
                    self._release(store, [r.id for r in batch.rows])
                    with self._lock:
                        self.in_flight.difference_update(r.id for r in batch.rows)
                        self.model_batches -= self.pool is None
                if any(r.attempts > 1 for r in batch.rows):
                    while self.in_flight and not self.stop.is_set():
                        self.stop.wait(0.02)
        finally:
            store.close()

    def _outbox_open(self) -> bool:
        """False while the outbox is blocked (a write failed): the feeder takes no
        lines, which would only be synthesized to fail again. When its retry is due,
        the failing folder is probed with a write; once it takes one, one batch may try
        (``Health.start_trial``): the sink's success clears the outbox, its failure
        doubles the back-off, so a disk with room for the probe only is not a loop."""
        blocked = self.health.blocked("outbox")
        if blocked is None:
            return True
        if not self.health.due("outbox"):
            self.health.wait("outbox", self.stop)
            return False
        try:
            probe(Path(blocked.path), root=Path(blocked.path) == self.cfg.paths.outbox)
        except OSError as exc:
            self.health.trouble("outbox", blocked.path, fault(exc) or str(exc), "sink")
            return False
        self.health.start_trial("outbox")
        return True

    def _journal_open(self, store: Store, feeder: Feeder) -> bool:
        """False while the journal is blocked and its retry is not due; first puts
        back the lines a failed ``next_batch`` had taken."""
        if not self.health.due("state"):
            self.health.wait("state", self.stop)
            return False
        if feeder.unreleased:
            if not self._release(store, feeder.unreleased):
                return False
            feeder.unreleased = []
        return True

    def _release(self, store: Store, line_ids: list[int]) -> bool:
        """Lines back to pending (their attempt undone), or, when the journal cannot
        take it, the journal marked blocked and False (a restart puts them back)."""
        try:
            store.release(line_ids)
        except sqlite3.OperationalError as exc:
            why = fault(exc)
            if why is None:
                raise
            self.health.trouble("state", self.cfg.paths.db, why, "feeder")
            return False
        self.health.clear("state", "feeder")
        return True

    def _model_loop(self) -> None:
        if self.pool is not None:
            try:
                self.pool.supervise(self.notifier.watchdog)
            finally:
                self.write_q.put(None)
            return
        store = Store(self.cfg.paths.db)
        synth = Synth(self.engine)
        streams = self._streams()
        mem = self.cfg.memory
        try:
            while True:
                if not self._planning_stuck():
                    self.notifier.watchdog()
                try:
                    batch = self.batch_q.get(timeout=0.2)
                except queue.Empty:
                    if self.stop.is_set():
                        break
                    self._maybe_release(store, mem.idle_s, "idle", idle=True)
                    continue
                if self.stop.is_set():   # taken but not started: back to pending
                    self._release(store, [r.id for r in batch.rows])
                    with self._lock:
                        self.in_flight.difference_update(r.id for r in batch.rows)
                    break
                self.busy = True
                done = synth.run(batch, self.write_q.put if streams else None)
                if streams:   # the sink is at most `prefetch` whole batches behind
                    while not self.write_slots.acquire(timeout=0.2):
                        if self.fatal is not None:
                            break
                self.write_q.put(done)
                self.last_work = time.monotonic()
                self.busy = False
                with self._lock:
                    self.model_batches -= 1
                if mem.free_memory_every_s > 0:
                    self._maybe_release(store, mem.free_memory_every_s, "periodic")
                if self.stop.is_set():   # the batch in flight is done; no new one starts
                    break
        finally:
            self.write_q.put(None)
            store.close()

    def _planning_stuck(self) -> bool:
        """The feeder's text half (``engine.overlap_halves``: on the device too) has run
        past the watchdog interval: stop pinging, so that systemd restarts a daemon whose
        GPU hangs there."""
        since = self.feeder.planning_since if self.feeder is not None else None
        interval = self.notifier.watchdog_interval_s
        return since is not None and interval is not None and \
            time.monotonic() - since > interval

    def _maybe_release(self, store: Store, every: float, reason: str, idle: bool = False) -> None:
        now = time.monotonic()
        since = now - (self.last_work if idle else self.last_release)
        if every <= 0 or since < every or (idle and self.last_release > self.last_work):
            return
        if self.engine.device.type != "cuda":   # a CPU's cached memory is not the driver's
            return
        freed = self.engine.release_memory()
        self.last_release = now
        try:
            store.record_release(freed, reason, str(self.engine.device))
        except sqlite3.OperationalError as exc:
            if fault(exc) is None:
                raise
        log.info("gpu.memory_released", bytes=freed, reason=reason)

    def _streams(self) -> bool:
        """The model thread sends pieces of batches (``batching.stream_writes``; not
        with a worker pool, whose processes return whole batches)."""
        return self.cfg.batching.stream_writes and not workers.pool_wanted(self.cfg)

    def _sink_loop(self) -> None:
        streams = self._streams()
        store = Store(self.cfg.paths.db)
        sink = Sink(self.cfg, self.engine, self.cfg.batching.writers, self.health, self.stop)
        try:
            while True:
                try:   # while cache copies are under way, record them as they finish
                    batch = self.write_q.get(timeout=0.05 if sink.keeping else None)
                except queue.Empty:
                    sink.record_kept(store)
                    continue
                if batch is None:
                    break
                counts = sink.write(store, batch)
                with self._lock:
                    self.in_flight.difference_update(r.id for r in batch.rows)
                self.progress.lines_done += counts["done"]
                self.progress.lines_failed += counts["failed"] + len(batch.dead)
                if batch.part_of is not None:   # a piece; its batch is logged whole
                    continue
                if streams:
                    self.write_slots.release()
                if batch.rows:
                    where = {} if batch.worker is None else {"worker": batch.worker,
                                                              "device": batch.device}
                    t = batch.tally
                    st = batch.stats   # where the model's time went (None: no model work)
                    calls = {} if st is None else {
                        "text_ms": round(st.text_ms, 1), "audio_ms": round(st.audio_ms, 1),
                        "audio_gpu_ms": round(st.audio_gpu_ms, 1),
                        "audio_launch_ms": round(st.audio_launch_ms, 1),
                        "text_calls": st.text_calls, "audio_calls": st.audio_calls,
                        "audio_graphed": st.audio_graphed}
                    log.info("batch.done", lines=len(batch.rows),
                             hits=len(batch.hits) + int(t.get("hits", 0)), **where,
                             model_ms=round(batch.model_ms, 1),
                             prepare_ms=round(batch.prepare_ms, 1), **calls,
                             **{k: v + int(t.get(k, 0)) for k, v in counts.items()})
        finally:
            sink.close(store)
            store.close()

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

    def _status_text(self, store: Store) -> str:
        if self.pool is not None:
            ready = self.pool.ready_count()
            where = f"workers {ready}/{len(self.pool.slots)} ready"
        else:
            where = f"device {self.engine.device}"
        text = (f"queue {store.pending_count()} lines; done {self.progress.lines_done}; "
                f"failed {self.progress.lines_failed}; {where}")
        blocked = self.health.text()
        return f"{blocked}; {text}" if blocked else text

    def _heartbeat(self, store: Store, state: str = "running") -> None:
        info: dict[str, Any] = {"version": __version__, "heartbeat_s": self.cfg.daemon.heartbeat_s,
                                "queue": store.pending_count()}
        if self.pool is not None:   # per-device facts are in the workers table
            summary = self.pool.summary()
            info.update(device=f"{self.cfg.cluster.backend} workers: "
                               + ", ".join(summary["devices"]),
                        dtype=self.cfg.engine.dtype, workers=summary)
        else:
            info.update(self.engine.device_info())
            mem = self.engine.memory()
            info.update(gpu_allocated=mem["allocated"], gpu_reserved=mem["reserved"],
                        gpu_peak=mem["peak"], gpu_name=info.get("name"))
        text = self._status_text(store)
        info["status"] = text
        info["blocked"] = self.health.report()
        sitelock.note(self._site_lock, {"at": time.time(), "state": state,
                                        "blocked": info["blocked"]})
        try:
            store.heartbeat(os.getpid(), self.started_at, state, info)
        except sqlite3.OperationalError as exc:
            why = fault(exc)
            if why is None:
                raise
            self.health.trouble("state", self.cfg.paths.db, why, "heartbeat")
        else:
            self.health.clear("state", "heartbeat")
        self.notifier.status(text)

    def _print_progress(self, store: Store, final: bool = False) -> None:
        """Draw the progress bar: the lines of the files taken since the start, done or
        failed of all of them, and the audio made per second."""
        if self.bar is None:
            return
        total, finished, audio = store.run_progress(self.started_at)
        self.bar.show(finished, total, audio, time.time() - self.started_at)
        if final:
            self.bar.close()


LIVE_KEYS = ("daemon.log_level",)
"""Keys besides [input] (but input.polling) that a SIGHUP applies while running."""


def end_children(grace_s: float = 2.0) -> None:
    """End this process's child processes (phonemizers, workers): terminated, killed
    after ``grace_s``, reaped, and multiprocessing's semaphores and queues released as
    at a normal exit (its exit hook), so that nothing is left behind or reported as
    leaked when the process then leaves with ``os._exit``."""
    import multiprocessing.util

    import psutil

    me = psutil.Process()
    tracker = getattr(getattr(multiprocessing, "resource_tracker", None),
                      "_resource_tracker", None)
    keep = {getattr(tracker, "_pid", None)}
    children = [c for c in me.children(recursive=True) if c.pid not in keep]
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _gone, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    with contextlib.suppress(Exception):
        multiprocessing.util._exit_function()


class _LazyVoices(dict):
    """Voice facts by name, loading a voice the first time a line asks for it."""

    def __init__(self, engine: Engine, loaded: dict[str, VoiceFacts]) -> None:
        super().__init__(loaded)
        self.engine = engine

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if name in self:
            return self[name]
        if name not in self.engine.voices:
            return default
        try:
            self[name] = voice_facts(self.engine, name)
        except Exception as exc:  # noqa: BLE001 - an unusable voice fails its lines alone
            log.error("voice.unusable", voice=name, error=str(exc))
            return default
        return self[name]

    def __iter__(self):
        return iter(self.engine.voices)
