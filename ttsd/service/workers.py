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
from typing import TYPE_CHECKING, Any, Protocol

from ttsd.config import Config
from ttsd.errors import DeviceLostError
from ttsd.log import get_logger
from ttsd.service.messages import (
    Answer,
    Failure,
    PreparedRun,
    ReaderFailed,
    Ready,
    Release,
    Released,
    Run,
    Stop,
)

if TYPE_CHECKING:
    from ttsd.engine.options import EngineOptions

log = get_logger(__name__)


# ---------------------------------------------------------------------- devices

def pool_wanted(cfg: Config) -> bool:
    return cfg.cluster.backend in ("ray", "processes") or len(local_devices(cfg)) > 1


def local_devices(cfg: Config) -> list[str]:
    """engine.devices resolved: "auto" = every visible GPU, else the CPU; [] = device,
    whose "auto" is the GPU when there is one, else the CPU (a worker's batch size and
    the output's cache key follow from the device being a GPU or not)."""
    import torch

    devs = list(cfg.engine.devices)
    if devs == ["auto"]:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if devs:
        return devs
    if cfg.engine.device == "auto":
        return ["cuda" if torch.cuda.is_available() else "cpu"]
    return [cfg.engine.device]


def is_gpu(device: str) -> bool:
    """Whether a slot's device names a GPU: "cuda", "cuda:N" or Ray's "ray:gpu"."""
    return device.startswith("cuda") or device == "ray:gpu"


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


def worker_options(spec: WorkerSpec) -> EngineOptions:
    """The engine options of a worker on ``spec.device``. A GPU worker runs espeak-ng in
    phonemizer processes, as the daemon's own engine does: on its reader thread it would
    hold the interpreter that the model thread launches the GPU's work from. A CPU
    worker phonemizes in its own process: its cores are its engine's
    (``cluster.cpus_per_worker``)."""
    from ttsd.engine.options import EngineOptions

    if is_gpu(spec.device):
        return EngineOptions.from_config(spec.cfg, device=spec.device)
    return EngineOptions.from_config(spec.cfg, device=spec.device, phonemizer_processes=0)


class WorkerCore:
    """The engine inside a worker process or Ray actor."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from ttsd.engine.runtime import start_engine

        t0 = time.perf_counter()
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        voice = spec.cfg.engine.voice
        self.engine = start_engine(worker_options(spec))
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

    def plan(self, prepared: list) -> Any:
        """The text half of ``prepared`` queued now (``Engine.plan``), when the engine
        overlaps its halves (a GPU); else None: ``run_prepared`` runs both."""
        return self.engine.plan(prepared) if self.engine.overlaps else None

    def run_prepared(self, prepared: list, prepare_ms: float, plan: Any = None
                     ) -> dict[str, Any]:
        t0 = time.perf_counter()
        results, stats = (self.engine.finish(plan) if plan is not None
                          else self.engine.run(prepared))
        if self.engine.device.type == "cuda":
            import torch
            torch.cuda.synchronize(self.engine.device)
        model_ms = (time.perf_counter() - t0) * 1000
        out = {"results": [(r.key, r.audio, r.sample_rate, r.error, r.phonemes, r.timing)
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
    phonemizing, and on a GPU the text half, overlap the audio half of the batch
    before), the main thread runs them in order and answers.
    EOF from the daemon (it died) ends the process; an error in either thread is
    answered and ends it (75: device lost)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the daemon decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        core = WorkerCore(spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the daemon, then exit
        conn.send(Failure(f"worker failed to start: {exc!r}\n{traceback.format_exc()}"))
        os._exit(3)
    conn.send(Ready(core.info()))
    todo: queue.Queue = queue.Queue()

    def reader() -> None:
        try:
            while True:
                msg = conn.recv()
                if not isinstance(msg, Run):
                    todo.put(msg)
                    continue
                try:
                    prepared, ms = core.prepare(msg.requests)
                    todo.put(PreparedRun(prepared, ms, core.plan(prepared)))
                except Exception as exc:  # noqa: BLE001 - raised again by the main thread
                    todo.put(ReaderFailed(exc))
                    return
        except (EOFError, OSError):
            os._exit(0)   # the daemon is gone: so are we, whatever the main thread does
        except BaseException as exc:  # noqa: BLE001
            todo.put(Failure(f"worker reader failed: {exc!r}"))

    threading.Thread(target=reader, name="ttsd-worker-reader", daemon=True).start()
    while True:
        msg = todo.get()
        try:
            if isinstance(msg, ReaderFailed):
                raise msg.error
            if isinstance(msg, PreparedRun):
                conn.send(Answer(core.run_prepared(msg.prepared, msg.prepare_ms, msg.plan)))
            elif isinstance(msg, Release):
                conn.send(Released(core.release(), core.engine.memory()))
            elif isinstance(msg, Stop):
                break
            else:   # the reader's own Failure
                conn.send(msg)
                break
        except BaseException as exc:  # noqa: BLE001 - a device error or a bug: restart us
            what = "device lost" if isinstance(exc, DeviceLostError) else "engine error"
            try:
                conn.send(Failure(f"{what}: {exc}\n{traceback.format_exc()}"))
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
        if not isinstance(msg, Ready):
            self.kill()
            raise WorkerDied(msg.text if isinstance(msg, Failure) else repr(msg))
        return msg.info

    def _recv(self, timeout: float, what: str) -> Any:
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
            self.conn.send(Run(requests))
        except (OSError, EOFError) as exc:
            raise WorkerDied(f"process {self.proc.pid}: cannot send ({exc})") from None

    def poll(self, timeout: float) -> dict[str, Any] | None:
        msg = self._recv(timeout, "a batch")
        if msg is None:
            return None
        if isinstance(msg, Failure):
            self.proc.join(5.0)
            raise WorkerDied(msg.text.splitlines()[0])
        return msg.reply

    def release(self, timeout: float) -> tuple[int, dict]:
        try:
            self.conn.send(Release())
        except (OSError, EOFError) as exc:
            raise WorkerDied(f"process {self.proc.pid}: cannot send ({exc})") from None
        msg = self._recv(timeout, "a memory release")
        if not isinstance(msg, Released):
            raise WorkerDied("no answer to a memory release")
        return msg.freed, msg.memory

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
            self.conn.send(Stop())
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


def local_slots(cfg: Config) -> list[Slot]:
    devices = local_devices(cfg)
    n_cpu = sum(1 for d in devices if d == "cpu")
    slots = []
    for i, dev in enumerate(devices):
        spec = spec_for(cfg, dev, cpu_threads(cfg, n_cpu) if dev == "cpu" else 1)
        slots.append(Slot(i, dev, make=lambda spec=spec, i=i: ProcessHandle(spec, f"ttsd-w{i}")))
    return slots
