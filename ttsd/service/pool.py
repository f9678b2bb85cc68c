"""The worker pool: one driver thread per worker process (or Ray actor) feeding it
batches, reading its answers, and restarting or retiring it when it dies."""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Any

from ttsd.config import Config
from ttsd.errors import DeviceLostError
from ttsd.log import get_logger
from ttsd.service.workers import Slot, WorkerDied

log = get_logger(__name__)


class WorkerPool:
    """Driver threads over worker handles; the daemon's model stage when it has several
    devices. ``release(ids, undo_attempt)`` and ``forget(ids)`` are the daemon's
    bookkeeping callbacks (store release + in-flight set)."""

    def __init__(self, cfg: Config, slots: list[Slot], batch_q: queue.Queue,
                 write_q: queue.Queue, stop: threading.Event, forget, on_close=None) -> None:
        self.cfg = cfg
        self.slots = slots
        self.batch_q = batch_q
        self.write_q = write_q
        self.stop = stop
        self.forget = forget
        self.on_close = on_close
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start every worker (in parallel); returns once each has come up or failed."""
        from ttsd.store.journal import Store

        store = Store(self.cfg.paths.db)
        try:
            store.workers_reset()
            for s in self.slots:
                store.worker_set(s.index, device=s.device, state="starting",
                                 backend=self.cfg.cluster.backend)
        finally:
            store.close()
        for s in self.slots:
            t = threading.Thread(target=self._guarded, args=(s,), daemon=True,
                                 name=f"ttsd-worker-{s.index}")
            t.start()
            self.threads.append(t)
        deadline = time.monotonic() + self.cfg.cluster.start_timeout_s + 5
        for s in self.slots:
            s.started_once.wait(max(0.0, deadline - time.monotonic()))

    def ready_count(self) -> int:
        return sum(1 for s in self.slots if s.state == "ready")

    def busy(self) -> bool:
        return any(s.outstanding for s in self.slots)

    def supervise(self, ping) -> None:
        """The daemon's model thread: wait for the drivers, ping the watchdog, and give
        up (DeviceLostError) when every device is out of rotation."""
        try:
            while any(t.is_alive() for t in self.threads):
                ping()
                if all(s.state == "out" for s in self.slots):
                    break
                time.sleep(0.2)
            # A driver ends on a stop or when its device goes out of rotation, the last
            # one a moment after its state changes: decide here, after the loop, or the
            # daemon goes on with no worker at all instead of exiting 75.
            if all(s.state == "out" for s in self.slots) or not self.stop.is_set():
                raise DeviceLostError("every device is out of rotation: " + "; ".join(
                    f"{s.device} #{s.index} {s.state}: {s.last_error}" for s in self.slots))
        finally:
            if self.on_close is not None:
                self.on_close()

    def summary(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for s in self.slots:
            states[s.state] = states.get(s.state, 0) + 1
        return {"workers": len(self.slots), "states": states,
                "devices": [s.device for s in self.slots]}

    # -------------------------------------------------------------- one driver

    def _guarded(self, slot: Slot) -> None:
        from ttsd.store.journal import Store

        store = Store(self.cfg.paths.db)
        try:
            self._drive(slot, store)
        except BaseException as exc:  # noqa: BLE001 - a driver bug must not lose batches
            log.error("worker.driver_crashed", worker=slot.index, error=str(exc),
                      traceback=traceback.format_exc())
            slot.last_error = f"driver crashed: {exc}"[:500]
            try:
                self._kill(slot)
            finally:
                self._lost(slot, store)
            slot.state = "out"
            store.worker_set(slot.index, state="out", last_error=slot.last_error)
        finally:
            slot.started_once.set()
            if slot.handle is not None:
                # Batches taken back from its queue: kill it rather than let it run them.
                slot.handle.close(wait=not slot.discard)
                slot.handle = None
            if slot.retire is not None:
                slot.retire()
            if slot.state != "out":
                slot.state = "stopped"
            store.worker_set(slot.index, state=slot.state)
            store.close()

    def _drive(self, slot: Slot, store) -> None:
        c = self.cfg.cluster
        head_since = 0.0
        stop_by: float | None = None
        while True:
            if slot.handle is None:
                if self.stop.is_set() or slot.state == "out":
                    return
                self._start(slot, store)
                continue
            if self.stop.is_set():
                # Warm stop: the batch the worker runs may finish (within the daemon's
                # stop time); those queued behind it never started: back to pending now,
                # their attempt undone, and the worker is killed rather than left to run
                # them.
                if stop_by is None:
                    stop_by = time.monotonic() + self._stop_grace()
                    self._take_back_queued(slot, store)
                if not slot.outstanding:
                    return
                if time.monotonic() >= stop_by:
                    log.warning("worker.stop_timeout", worker=slot.index, device=slot.device,
                                pid=slot.pid, batches_requeued=len(slot.outstanding))
                    self._kill(slot)
                    self._lost(slot, store)
                    return
            else:
                # Keep the worker fed: the batch it runs plus queue_ahead more.
                while not self.stop.is_set() and len(slot.outstanding) <= c.queue_ahead:
                    try:
                        batch = (self.batch_q.get_nowait() if slot.outstanding
                                 else self.batch_q.get(timeout=0.05))
                    except queue.Empty:
                        break
                    if not batch.requests:        # cache hits / failed lines only: no model
                        self.write_q.put(batch)
                        continue
                    try:
                        slot.handle.submit(batch.requests)
                    except WorkerDied as exc:
                        # It never reached the worker: not this batch's attempt.
                        self._requeue(store, batch, counted=False)
                        self._died(slot, store, str(exc))
                        break
                    if not slot.outstanding:
                        head_since = time.monotonic()
                    slot.outstanding.append(batch)
                if slot.handle is None:
                    continue
                if not slot.outstanding:
                    if not self.stop.is_set():
                        self._maybe_idle_release(slot, store)
                    continue
            try:
                reply = slot.handle.poll(0.1)
            except WorkerDied as exc:
                self._died(slot, store, str(exc))
                continue
            if reply is None:
                if time.monotonic() - head_since > c.batch_timeout_s:
                    self._died(slot, store, f"batch ran longer than cluster.batch_timeout_s "
                                            f"({c.batch_timeout_s:g} s): hung, killed")
                continue
            head_since = time.monotonic()
            self._finished(slot, store, slot.outstanding.popleft(), reply)

    def _stop_grace(self) -> float:
        """How long a stopping driver waits for the running batch: within the daemon's
        stop_timeout_s, leaving it time to write the batch and requeue what is left."""
        t = self.cfg.daemon.stop_timeout_s
        return max(0.0, t - min(5.0, t / 4))

    def _take_back_queued(self, slot: Slot, store) -> None:
        queued = list(slot.outstanding)[1:]
        if not queued:
            return
        for batch in queued:
            self._requeue(store, batch, counted=False)
            slot.outstanding.pop()
        slot.discard = True
        log.info("worker.queued_requeued", worker=slot.index, device=slot.device,
                 batches=len(queued), lines=sum(len(b.rows) for b in queued))

    def _start(self, slot: Slot, store) -> None:
        c = self.cfg.cluster
        slot.state = "starting"
        t0 = time.monotonic()
        try:
            slot.handle = slot.make()
            info = slot.handle.start(c.start_timeout_s)
        except WorkerDied as exc:
            slot.handle = None
            self._failure(slot, store, f"start failed: {exc}")
            return
        finally:
            slot.started_once.set()
        slot.state, slot.pid, slot.host = "ready", info.get("pid"), info.get("host")
        mem = info.get("memory") or {}
        store.worker_set(slot.index, state="ready", pid=slot.pid, host=slot.host,
                         gpu_name=info.get("name"), gpu_total=info.get("total_memory"),
                         gpu_allocated=mem.get("allocated"), gpu_reserved=mem.get("reserved"),
                         gpu_peak=mem.get("peak"), started_at=time.time(),
                         restarts=slot.restarts)
        log.info("worker.ready", worker=slot.index, device=slot.device, pid=slot.pid,
                 host=slot.host, backend=slot.handle.backend,
                 start_s=round(time.monotonic() - t0, 2), load_s=info.get("load_s"),
                 warmup_s=info.get("warmup_s"))

    def _finished(self, slot: Slot, store, batch, reply: dict[str, Any]) -> None:
        from ttsd.engine.records import Result

        batch.results = [Result(*fields) for fields in reply["results"]]
        batch.stats = reply["stats"]
        batch.prepare_ms = reply["prepare_ms"]
        batch.model_ms = reply["model_ms"]
        batch.device, batch.worker, batch.memory = slot.device, slot.index, reply["memory"]
        slot.last_work = time.monotonic()
        slot.released_since_work = False
        if reply.get("released") is not None:
            self._record_release(slot, store, reply["released"], "periodic")
        self.write_q.put(batch)

    def _maybe_idle_release(self, slot: Slot, store) -> None:
        idle_s = self.cfg.memory.idle_s
        if (idle_s <= 0 or slot.released_since_work
                or time.monotonic() - slot.last_work < idle_s):
            return
        slot.released_since_work = True
        try:
            freed, _mem = slot.handle.release(30.0)
        except WorkerDied as exc:
            self._died(slot, store, str(exc))
            return
        self._record_release(slot, store, freed, "idle")

    def _record_release(self, slot: Slot, store, freed: int, reason: str) -> None:
        store.record_release(int(freed), reason, slot.device, slot.index)
        log.info("gpu.memory_released", bytes=int(freed), reason=reason, worker=slot.index,
                 device=slot.device)

    # -------------------------------------------------------------- failures

    def _died(self, slot: Slot, store, reason: str) -> None:
        log.error("worker.died", worker=slot.index, device=slot.device, pid=slot.pid,
                  host=slot.host, error=reason, batches_requeued=len(slot.outstanding))
        self._kill(slot)   # first: no answer of the dead worker is read after this
        self._lost(slot, store)
        self._failure(slot, store, reason)

    def _kill(self, slot: Slot) -> None:
        """Once per handle (a second ray.kill would hit the actor Ray just restarted)."""
        if slot.handle is not None:
            slot.handle.kill()
            slot.handle = None

    def _lost(self, slot: Slot, store) -> None:
        """The worker's batches go back to pending. The one it was running keeps the
        attempt of its synthesized lines (it may be what killed the worker); the ones
        queued behind it never started and get their attempt back."""
        for i, batch in enumerate(slot.outstanding):
            self._requeue(store, batch, counted=i == 0)
        slot.outstanding.clear()

    def _requeue(self, store, batch, counted: bool) -> None:
        """One batch back to pending; ``counted``: its model lines keep their attempt."""
        model = {r.id for g in batch.groups for r in g} if counted else set()
        kept = [r.id for r in batch.rows if r.id in model]
        undone = [r.id for r in batch.rows if r.id not in model]
        if kept:
            store.release(kept, undo_attempt=False)
        if undone:
            store.release(undone, undo_attempt=True)
        if batch.dead:   # lines the feeder already failed: the Sink must still see them
            self.write_q.put(type(batch)([], "", dead=batch.dead))
        self.forget([r.id for r in batch.rows])

    def _failure(self, slot: Slot, store, reason: str) -> None:
        c = self.cfg.cluster
        now = time.monotonic()
        slot.failures.append(now)
        slot.failures_total += 1
        slot.last_error = reason[:500]
        while slot.failures and now - slot.failures[0] > c.failure_window_s:
            slot.failures.popleft()
        if len(slot.failures) >= c.max_failures:
            slot.state = "out"
            store.worker_set(slot.index, state="out", failures=slot.failures_total,
                             last_error=slot.last_error, pid=None)
            log.error("worker.out_of_rotation", worker=slot.index, device=slot.device,
                      failures=len(slot.failures), window_s=c.failure_window_s,
                      error=slot.last_error)
            return
        delay = min(c.restart_backoff_max_s,
                    c.restart_backoff_s * 2 ** (len(slot.failures) - 1))
        slot.state = "restarting"
        slot.restarts += 1
        store.worker_set(slot.index, state="restarting", failures=slot.failures_total,
                         restarts=slot.restarts, last_error=slot.last_error, pid=None)
        log.warning("worker.restarting", worker=slot.index, device=slot.device,
                    in_s=round(delay, 2), recent_failures=len(slot.failures),
                    error=slot.last_error[:200])
        self.stop.wait(delay)
