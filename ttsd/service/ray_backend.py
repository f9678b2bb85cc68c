"""Past one host: the same engine worker as a Ray actor (``[cluster] backend = "ray"``).

Ray is an optional extra (``pip install -e .[ray]``); this module imports it only inside
its functions, and ttsd imports this module only when the backend is ray.

One actor per GPU of the cluster (``num_gpus=1``, placed by Ray, which also sets
``CUDA_VISIBLE_DEVICES``), or, with no GPU, one per ``cluster.cpus_per_worker`` CPUs.
The daemon on the head node still reads the inbox and writes the outbox and the store;
actors only turn requests into audio, returned as int16 arrays. Actors are created with
``max_restarts=-1`` and ``max_task_retries=0``: Ray restarts a lost actor, the daemon
requeues the batches it lost (a task is never silently retried) and applies the same
back-off and out-of-rotation rules as for local workers (ttsd/service/workers.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from typing import Any

from ttsd.config import Config
from ttsd.engine.options import FACTORY_ENV, MODEL_ENV
from ttsd.log import get_logger
from ttsd.service.workers import Slot, WorkerCore, WorkerDied, WorkerSpec, spec_for

log = get_logger(__name__)

_lock = threading.Lock()
_actor_cls: Any = None


def _actor_class() -> Any:
    global _actor_cls
    import ray

    with _lock:
        if _actor_cls is None:
            class TtsdWorker:
                def __init__(self, spec: WorkerSpec) -> None:
                    self.core = WorkerCore(spec)

                def info(self) -> dict[str, Any]:
                    return self.core.info()

                def run(self, requests: list) -> dict[str, Any]:
                    return self.core.run(requests)

                def release(self) -> tuple[int, dict]:
                    return self.core.release(), self.core.engine.memory()

            _actor_cls = ray.remote(TtsdWorker)
    return _actor_cls


def connect(cfg: Config) -> bool:
    """Join (or, with address "local", start) the Ray cluster; True when started here."""
    import ray

    if ray.is_initialized():
        return False
    c = cfg.cluster
    saved = _handlers()   # ray.init installs its own SIGTERM handler (sys.exit(15)):
    try:                  # the daemon's warm stop must stay in charge
        started = _init(ray, c)
    finally:
        _restore(saved)
    res = ray.cluster_resources()
    log.info("ray.connected", address=c.address, started_here=started,
             nodes=len([n for n in ray.nodes() if n.get("Alive")]),
             cpus=res.get("CPU", 0), gpus=res.get("GPU", 0))
    return started


def _handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore(saved: dict[int, Any]) -> None:
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)


def _init(ray: Any, c: Any) -> bool:
    if c.address == "local":   # a private instance: its workers inherit our environment
        need = c.workers * max(1, c.cpus_per_worker)
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                 log_to_driver=False)
        started = True
    else:
        given = {k: os.environ[k] for k in (MODEL_ENV, FACTORY_ENV) if os.environ.get(k)}
        env = {"env_vars": given} if given else None
        ray.init(address=c.address, log_to_driver=False, runtime_env=env)
        started = False
    return started


def shutdown(started_here: bool) -> None:
    import ray

    if started_here and ray.is_initialized():
        ray.shutdown()


def ray_slots(cfg: Config) -> list[Slot]:
    import ray

    c = cfg.cluster
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per = max(1, c.cpus_per_worker)
    n = c.workers or gpus or max(1, cpus // per)
    use_gpu = gpus > 0
    slots = []
    for i in range(n):
        spec = spec_for(cfg, "cuda" if use_gpu else "cpu", 0 if use_gpu else per)
        options = ({"num_gpus": 1} if use_gpu else {"num_cpus": per})
        actor = _Actor(spec, options, f"ray:{'gpu' if use_gpu else 'cpu'}")
        slots.append(Slot(i, actor.label, make=actor.handle, retire=actor.retire))
    return slots


class _Actor:
    """One slot's actor, kept across Ray's restarts of it."""

    def __init__(self, spec: WorkerSpec, options: dict[str, Any], label: str) -> None:
        self.spec = spec
        self.options = {**options, "max_restarts": -1, "max_task_retries": 0}
        self.label = label
        self.actor: Any = None

    def retire(self) -> None:
        """Out of rotation or stopping: kill the actor for good."""
        import ray

        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)
            self.actor = None

    def handle(self) -> RayHandle:
        if self.actor is None:
            self.actor = _actor_class().options(**self.options).remote(self.spec)
        return RayHandle(self)


class RayHandle:
    backend = "ray"

    def __init__(self, owner: _Actor) -> None:
        self.owner = owner
        self.refs: deque = deque()
        self.lost = False
        """The actor process died (Ray restarts it): killing it again would kill the
        restarted one."""

    def _get(self, ref: Any, timeout: float | None) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            raise
        except RayActorError as exc:   # the actor died; Ray restarts it
            self.lost = True
            raise WorkerDied(f"Ray actor lost: {str(exc).splitlines()[0]}") from None
        except RayError as exc:        # the task raised (device lost, engine bug)
            raise WorkerDied(f"Ray task failed: {str(exc).splitlines()[0][:300]}") from None

    def start(self, timeout: float) -> dict[str, Any]:
        """Wait until the actor answers (Ray may still be restarting it)."""
        import ray
        from ray import exceptions as rex

        unavailable = getattr(rex, "ActorUnavailableError", ())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerDied(f"Ray actor not ready within {timeout:.0f} s "
                                 "(no free GPU/CPU in the cluster?)")
            try:
                return ray.get(self.owner.actor.info.remote(), timeout=left)
            except rex.GetTimeoutError:
                continue
            except unavailable:          # restarting: ask again
                time.sleep(0.2)
            except rex.RayError as exc:
                raise WorkerDied(f"Ray actor failed to start: "
                                 f"{str(exc).splitlines()[0][:300]}") from None

    def submit(self, requests: list) -> None:
        self.refs.append(self.owner.actor.run.remote(requests))

    def poll(self, timeout: float) -> dict[str, Any] | None:
        import ray

        ready, _ = ray.wait([self.refs[0]], timeout=timeout)
        if not ready:
            return None
        return self._get(self.refs.popleft(), None)

    def release(self, timeout: float) -> tuple[int, dict]:
        from ray.exceptions import GetTimeoutError

        try:
            return self._get(self.owner.actor.release.remote(), timeout)
        except GetTimeoutError:
            raise WorkerDied("no answer to a memory release") from None

    def kill(self) -> None:
        """Kill the actor's process; Ray restarts it (its queued tasks fail)."""
        import ray

        self.refs.clear()
        if self.owner.actor is not None and not self.lost:
            ray.kill(self.owner.actor, no_restart=False)

    def close(self, wait: bool = True) -> None:
        """Kill the actor for good (its queued tasks with it): the driver has read every
        answer it wants by now."""
        self.refs.clear()
        self.owner.retire()
