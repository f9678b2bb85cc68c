"""Several devices: one engine worker per device, fed by the daemon's batcher.

The daemon stays the only process that touches the store, the inbox and the outbox.
A worker holds an Engine on one device (its own warmed voices, its own memory
fraction) and answers ``run(requests)`` with its engine's samples, int16 when the
output is 16-bit (``EngineOptions.pcm16``: converted on the device, written as they are, so
the WAV bytes equal those of the in-process path); it phonemizes its own requests, so
host-side text work scales with the workers.

    Feeder ─▶ batch_q ─▶ driver thread per slot ─▶ worker (process or Ray actor)
                                 │ results                         (prepare + run)
                                 ▼
                              write_q ─▶ Sink (WAVs, one store transaction per batch)

Each driver keeps its worker fed (the batch running plus ``cluster.queue_ahead``
queued); idle drivers take the next batch, so batches go to the least-loaded worker.
A worker that dies (exit, signal, OOM kill, device error) or runs a batch past
``cluster.batch_timeout_s`` is killed; the batch it was running goes back to pending
with its attempt counted (a line that kills every worker it touches ends failed after
``daemon.max_attempts``; retried lines run alone, see Feeder.isolate_retries), the
batches queued behind it go back with their attempt undone, and the worker restarts
after an exponential back-off. ``cluster.max_failures`` failures within
``cluster.failure_window_s`` take the device out of rotation; when every device is out,
the daemon exits with DeviceLostError (status 75) for systemd to restart it.

On a warm stop (SIGTERM) each worker may finish the batch it runs (within
``daemon.stop_timeout_s``, else that batch goes back with its attempt counted); the
batches queued behind it go back to pending at once with their attempt undone, and the
worker is killed rather than left to run them.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from ttsd.config import Config
from ttsd.errors import DeviceLostError
from ttsd.log import get_logger

log = get_logger(__name__)


# ---------------------------------------------------------------------- devices

def pool_wanted(cfg: Config) -> bool:
    return cfg.cluster.backend == "ray" or len(local_devices(cfg)) > 1


def local_devices(cfg: Config) -> list[str]:
    """engine.devices resolved: "auto" = every visible GPU, else the CPU; [] = device."""
    devs = list(cfg.engine.devices)
    if devs == ["auto"]:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    return devs or [cfg.engine.device]


def cpu_threads(cfg: Config, n_cpu_workers: int) -> int:
    if cfg.cluster.cpus_per_worker:
        return cfg.cluster.cpus_per_worker
    return max(1, (os.cpu_count() or 1) // max(1, n_cpu_workers))


# ---------------------------------------------------------------------- the worker side

@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its engine: the daemon's own (frozen, picklable)
    config, its device and its torch threads. Sent to a process or a Ray actor."""

    cfg: Config
    device: str
    threads: int = 0


def spec_for(cfg: Config, device: str, threads: int = 0) -> WorkerSpec:
    return WorkerSpec(cfg, device, threads)


class WorkerCore:
    """The engine inside a worker process or Ray actor."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from ttsd.engine.device import configure_process
        from ttsd.engine.options import EngineOptions
        from ttsd.engine.runtime import open_engine

        t0 = time.perf_counter()
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        voice = spec.cfg.engine.voice
        # Each worker phonemizes its own batches in its own process (no processes).
        options = EngineOptions.from_config(spec.cfg, device=spec.device,
                                            phonemizer_processes=0)
        configure_process(options)
        self.engine = open_engine(options)
        self.engine.voice(voice)
        self.load_s = time.perf_counter() - t0
        self.warmup_s = 0.0
        if spec.cfg.engine.warmup:
            self.warmup_s = self.engine.warmup(voice)
        self.last_release = time.monotonic()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), **self.engine.device_info(),
                "memory": self.engine.memory(), "load_s": round(self.load_s, 2),
                "warmup_s": round(self.warmup_s, 2)}

    def prepare(self, requests: list) -> tuple[list, float]:
        t0 = time.perf_counter()
        return self.engine.prepare(requests), (time.perf_counter() - t0) * 1000

    def run_prepared(self, prepared: list, prepare_ms: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        results, stats = self.engine.run(prepared)
        if self.engine.device.type == "cuda":
            import torch
            torch.cuda.synchronize(self.engine.device)
        model_ms = (time.perf_counter() - t0) * 1000
        out = {"results": [(r.key, r.audio, r.sample_rate, r.error, r.phonemes)
                           for r in results],
               "stats": stats, "prepare_ms": prepare_ms, "model_ms": model_ms,
               "memory": self.engine.memory(), "released": None}
        every = self.spec.cfg.memory.free_memory_every_s
        if every > 0 and time.monotonic() - self.last_release >= every:
            out["released"] = self.release()
        return out

    def run(self, requests: list) -> dict[str, Any]:
        return self.run_prepared(*self.prepare(requests))

    def release(self) -> int:
        self.last_release = time.monotonic()
        return self.engine.release_memory()


def worker_main(conn: Any, spec: WorkerSpec) -> None:
    """A local worker process: a reader thread prepares requests as they arrive (so
    phonemizing overlaps the model), the main thread runs them in order and answers.
    EOF from the daemon (it died) ends the process; an error in either thread is
    answered and ends it (75: device lost)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the daemon decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        core = WorkerCore(spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the daemon, then exit
        conn.send(("error", f"worker failed to start: {exc!r}\n{traceback.format_exc()}"))
        os._exit(3)
    conn.send(("ready", core.info()))
    todo: queue.Queue = queue.Queue()

    def reader() -> None:
        try:
            while True:
                msg = conn.recv()
                if msg[0] != "run":
                    todo.put(msg)
                    continue
                try:
                    todo.put(("run", *core.prepare(msg[1])))
                except Exception as exc:  # noqa: BLE001 - raised again by the main thread
                    todo.put(("failed", exc))
                    return
        except (EOFError, OSError):
            os._exit(0)   # the daemon is gone: so are we, whatever the main thread does
        except BaseException as exc:  # noqa: BLE001
            todo.put(("crash", repr(exc)))

    threading.Thread(target=reader, name="ttsd-worker-reader", daemon=True).start()
    while True:
        msg = todo.get()
        kind = msg[0]
        try:
            if kind == "failed":
                raise msg[1]
            if kind == "run":
                conn.send(("ok", core.run_prepared(msg[1], msg[2])))
            elif kind == "release":
                conn.send(("released", core.release(), core.engine.memory()))
            elif kind == "stop":
                break
            else:
                conn.send(("error", f"worker reader failed: {msg[1]}"))
                break
        except BaseException as exc:  # noqa: BLE001 - a device error or a bug: restart us
            what = "device lost" if isinstance(exc, DeviceLostError) else "engine error"
            try:
                conn.send(("error", f"{what}: {exc}\n{traceback.format_exc()}"))
            finally:
                os._exit(75 if isinstance(exc, DeviceLostError) else 1)
    os._exit(0)


# ---------------------------------------------------------------------- handles

class WorkerDied(Exception):
    """The worker is gone (or must be killed); its outstanding batches are lost."""


class Handle(Protocol):
    """One worker as the daemon sees it (a local process or a Ray actor)."""

    backend: str

    def start(self, timeout: float) -> dict[str, Any]: ...
    def submit(self, requests: list) -> None: ...
    def poll(self, timeout: float) -> dict[str, Any] | None: ...
    def release(self, timeout: float) -> tuple[int, dict]: ...
    def kill(self) -> None: ...
    def close(self, wait: bool = True) -> None: ...


class ProcessHandle:
    """A worker process (multiprocessing 'spawn': a fresh interpreter, no inherited
    CUDA or thread state), talking over a pipe."""

    backend = "local"

    def __init__(self, spec: WorkerSpec, name: str) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_main, args=(child, spec), name=name, daemon=True)
        self._child = child

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def start(self, timeout: float) -> dict[str, Any]:
        self.proc.start()
        self._child.close()
        try:
            msg = self._recv(timeout, "start")
        except WorkerDied:
            self.kill()   # reap it and close our end of the pipe
            raise
        if msg is None:
            self.kill()
            raise WorkerDied(f"not ready within {timeout:.0f} s")
        if msg[0] != "ready":
            self.kill()
            raise WorkerDied(msg[1])
        return msg[1]

    def _recv(self, timeout: float, what: str) -> tuple | None:
        """The next message; None after ``timeout``; WorkerDied once the process is gone
        (a message it sent before dying is still delivered first)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.conn.poll(min(0.1, max(0.0, deadline - time.monotonic()))):
                    return self.conn.recv()
                alive = self.proc.is_alive()
            except (EOFError, OSError):
                alive = False
            if not alive:
                self.proc.join(1.0)
                raise WorkerDied(f"process {self.proc.pid} exited during {what} "
                                 f"({_exit_text(self.proc.exitcode)})")
            if time.monotonic() >= deadline:
                return None

    def submit(self, requests: list) -> None:
        try:
            self.conn.send(("run", requests))
        except (OSError, EOFError) as exc:
            raise WorkerDied(f"process {self.proc.pid}: cannot send ({exc})") from None

    def poll(self, timeout: float) -> dict[str, Any] | None:
        msg = self._recv(timeout, "a batch")
        if msg is None:
            return None
        if msg[0] == "error":
            self.proc.join(5.0)
            raise WorkerDied(msg[1].splitlines()[0])
        return msg[1]

    def release(self, timeout: float) -> tuple[int, dict]:
        try:
            self.conn.send(("release",))
        except (OSError, EOFError) as exc:
            raise WorkerDied(f"process {self.proc.pid}: cannot send ({exc})") from None
        msg = self._recv(timeout, "a memory release")
        if msg is None or msg[0] != "released":
            raise WorkerDied("no answer to a memory release")
        return msg[1], msg[2]

    def kill(self) -> None:
        if self.proc.pid is not None and self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.join(10.0)
        self.conn.close()

    def close(self, wait: bool = True) -> None:
        """Stop the worker once what it has queued is done; ``wait=False``: kill it."""
        if not wait:
            self.kill()
            return
        try:
            self.conn.send(("stop",))
        except (OSError, EOFError):
            pass
        self.proc.join(10.0)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# ---------------------------------------------------------------------- the pool

@dataclass
class Slot:
    index: int
    device: str
    make: Any                      # () -> Handle
    retire: Any = None             # () -> None: free what outlives a handle (Ray actor)
    handle: Any = None
    state: str = "starting"        # starting | ready | restarting | out | stopped
    pid: int | None = None
    host: str | None = None
    restarts: int = 0
    failures: deque = field(default_factory=deque)
    failures_total: int = 0
    last_error: str | None = None
    outstanding: deque = field(default_factory=deque)
    started_once: threading.Event = field(default_factory=threading.Event)
    last_work: float = field(default_factory=time.monotonic)
    released_since_work: bool = True
    discard: bool = False
    """Stopping with batches taken back from the worker's queue: close it without
    letting it run them."""


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

        batch.results = [Result(k, a, sr, err, ph)
                         for k, a, sr, err, ph in reply["results"]]
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


def local_slots(cfg: Config) -> list[Slot]:
    devices = local_devices(cfg)
    n_cpu = sum(1 for d in devices if d == "cpu")
    slots = []
    for i, dev in enumerate(devices):
        spec = spec_for(cfg, dev, cpu_threads(cfg, n_cpu) if dev == "cpu" else 1)
        slots.append(Slot(i, dev, make=lambda spec=spec, i=i: ProcessHandle(spec, f"ttsd-w{i}")))
    return slots
