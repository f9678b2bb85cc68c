"""The daemon's stage threads: files, feeder, model and sink loops.

Each loop runs on its own thread and hands whole batches to the next through a bounded
queue; a place that cannot be written is waited out through ``health``.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from pathlib import Path

from ttsd.health import fault, probe
from ttsd.log import get_logger
from ttsd.pipeline.batcher import Feeder
from ttsd.pipeline.runner import Synth
from ttsd.pipeline.sink import Sink
from ttsd.service import workers
from ttsd.store.errors import OperationalError
from ttsd.store.journal import Store

log = get_logger(__name__)

IDLE_S = 1.0
"""The model counts as idle (the feeder takes ``batching.idle_batch`` of a batch) after
this long with no batch queued or running: the first batch of a burst."""


class StageLoops:
    """The thread bodies of ``Daemon`` (a mixin: they share its state)."""

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
        except (OSError, OperationalError) as exc:
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
            gpu = any(workers.is_gpu(s.device) for s in self.pool.slots)
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
                except OperationalError as exc:
                    why = fault(exc)
                    if why is None:
                        raise
                    self.health.trouble("state", self.cfg.paths.db, why, "feeder")
                    continue
                if batch is None:
                    self.new_lines.wait(0.05)   # a stop is seen within 50 ms
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
        except OperationalError as exc:
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
                warming = self.engine.pending_warmup is not None
                try:
                    batch = self.batch_q.get(timeout=0.0 if warming else 0.2)
                except queue.Empty:
                    if self.stop.is_set():
                        break
                    if warming:   # the rest of the warm-up, a step at a time while idle
                        self.engine.warm_step()
                        continue
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
        """The feeder's text half (``EngineOptions.overlap_halves``: on the device too) has run
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
        except OperationalError as exc:
            if fault(exc) is None:
                raise
        log.info("gpu.memory_released", bytes=freed, reason=reason)

    def _streams(self) -> bool:
        """The model thread sends pieces of batches (always; not
        with a worker pool, whose processes return whole batches)."""
        return not workers.pool_wanted(self.cfg)

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

