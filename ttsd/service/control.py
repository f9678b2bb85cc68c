"""The daemon's control side: signals, reload, heartbeat, progress and the --once report."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any

from ttsd import __version__
from ttsd.config import Config
from ttsd.errors import TtsdError
from ttsd.health import fault
from ttsd.log import get_logger
from ttsd.log import setup as log_setup
from ttsd.service import sitelock
from ttsd.store.errors import OperationalError
from ttsd.store.journal import Store

log = get_logger(__name__)

RESTART_INPUT_KEYS = ("input.polling", "input.markup", "input.markup_unknown",
                      "input.paragraph_pause_s")
"""``[input]`` keys a SIGHUP does not apply (the watcher, and how the engine reads SSML:
a line's cache key and its audio must follow the same settings)."""

EXIT_OK = 0


EXIT_FAILED = 1
"""``run --once``: every file was finished, and some line or file failed."""


EXIT_CRASH = 70
"""A thread of the daemon crashed (a bug: the log has the traceback)."""


EXIT_DEVICE_LOST = 75


EXIT_TEMPFAIL = 75
"""A temporary failure: the device was lost, or ``run --once`` gave up waiting for a
place it cannot write (``daemon.once_blocked_s``)."""


class Control:
    """Signals, SIGHUP reload, heartbeat and reports of ``Daemon`` (a mixin: they share
    its state)."""

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
                   (k.startswith("input.") and k not in RESTART_INPUT_KEYS)]
        kept = {name: getattr(self.cfg.input, name)
                for name in (k.split(".")[1] for k in RESTART_INPUT_KEYS)}
        new = dataclasses.replace(new, input=dataclasses.replace(new.input, **kept))
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
        except OperationalError as exc:
            why = fault(exc)
            if why is None:
                raise
            self.health.trouble("state", self.cfg.paths.db, why, "heartbeat")
        else:
            self.health.clear("state", "heartbeat")
        self.notifier.status(text)

    def _print_progress(self, store: Store, final: bool = False) -> None:
        """Draw the progress bar: the lines of the files taken since the start, done or
        failed of all of them, and the audio made per second (from the journal's
        counters: no line rows are read)."""
        if self.bar is None:
            return
        p = store.progress(self.started_at, self.progress_from)
        self.bar.show(p.finished, p.lines, p.audio_s, time.time() - self.started_at)
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

