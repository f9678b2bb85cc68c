"""``ttsd status``: what the daemon is doing, read from the store (and psutil), never asked.

Like ``rq info``, status reads the heartbeat row the daemon writes every
``heartbeat_s`` and checks its pid with psutil; it never talks to the process. It
opens the store read-only (WAL: a reader never blocks the daemon's writes and is
never blocked by them) and runs a handful of short, index-friendly queries in one
read snapshot, so the numbers are one consistent state: it answers in well under a
second with 100k lines, while another connection holds the write lock.

``collect`` returns a ``StatusReport`` (``status_report``); its ``to_json()`` is
``ttsd status --json``, and ``status_text.render`` turns it into a compact block for a
terminal.

Speed is audio seconds per second spent working: the union of the batches' working
intervals, so idle time and batches that overlap on several devices are not counted
twice (``Store.throughput``). Cache hits and misses are lines: done from the cache vs
done by synthesis. GPU memory and its releases are shown only for a CUDA device.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import psutil

from ttsd.config import PathsConfig
from ttsd.errors import ConfigError, StoreDamagedError
from ttsd.service import sitelock
from ttsd.service.status_report import (
    AudioTotal,
    CacheFacts,
    DaemonFacts,
    DeviceFacts,
    FileCounts,
    LineCounts,
    StatusReport,
    StoreFacts,
    WorkerFacts,
    finite,
)
from ttsd.store.errors import DatabaseError, damaged
from ttsd.store.journal import Store
from ttsd.store.records import Heartbeat, WorkerRow
from ttsd.units import human_duration

LATENCY_WINDOW = 1000
"""Batch latency percentiles are taken over this many most recent batches."""
RECENT_S = 3600.0
"""The recent speed window: batches committed in the last hour."""
MIN_STALE_S = 10.0
"""A heartbeat is stale after max(MIN_STALE_S, STALE_BEATS × heartbeat_s)."""
STALE_BEATS = 5
DEFAULT_HEARTBEAT_S = 2.0
"""Assumed when the heartbeat's info does not say (DaemonConfig.heartbeat_s default)."""
CPU_SAMPLE_S = 0.1
"""CPU% is measured over at least this long (overlapping the store queries)."""
PID_REUSE_SLACK_S = 2.0
"""A live pid whose process started later than this after the daemon's start is not it."""
STOPPED_STATES = ("stopped",)
"""Heartbeat states the daemon writes when it exits cleanly."""


# ---------------------------------------------------------------------- collect

def collect(paths: PathsConfig, now: float | None = None) -> StatusReport:
    """Everything ``ttsd status`` shows.

    A missing store means the daemon never ran here: daemon state "down", zeros
    elsewhere. A store that exists but cannot be read raises ConfigError.
    """
    now = time.time() if now is None else now
    report = StatusReport(now=now, store=StoreFacts(str(paths.db)))
    store = Store.open_readonly(paths.db)
    if store is None or not store.has_tables():
        if store is not None:
            store.close()
        report.daemon.reason = f"never ran here (no store at {paths.db})"
        _starting(paths, report)
        return report
    report.store.exists = True
    proc: psutil.Process | None = None
    cpu_started = 0.0
    try:
        with store.snapshot():   # one read snapshot for every query below
            beat = store.last_heartbeat()
            if beat is not None:
                proc = _daemon(report, beat, now)
                if proc is not None:
                    cpu_started = _cpu_start(proc)
            _counts(store, report)
            _speed(store, report, now)
            report.memory_releases = store.gpu_releases()
            stopped = report.daemon.state != "up"
            report.workers = [_worker(w, stopped) for w in store.worker_rows()]
    except DatabaseError as exc:
        if damaged(exc):
            raise StoreDamagedError(paths.db, str(exc)) from None
        raise ConfigError(f"cannot read the store {paths.db}: {exc}") from None
    finally:
        store.close()
    if proc is not None:
        _process_facts(proc, cpu_started, report.daemon)
    _blocked(paths, report)
    return report


def _starting(paths: PathsConfig, report: StatusReport) -> None:
    """No journal yet, but a daemon holds the state folder: it is starting (or waiting
    for a disk it cannot write: its note says so)."""
    pid = sitelock.holder(paths.state)
    if pid is None:
        return
    d = report.daemon
    d.state = "starting"
    d.pid = pid if pid > 0 else None
    d.reason = (f"pid {pid if pid > 0 else '?'} holds the state folder but has not set up "
                f"its journal {paths.db} yet (starting, or waiting for a disk it cannot "
                "write: its log and systemd's STATUS= say which)")
    _blocked(paths, report)


def _blocked(paths: PathsConfig, report: StatusReport) -> None:
    """The places the running daemon cannot write, from its lock file's note (written
    in place, so it is fresh even when a full disk keeps the heartbeat out of the
    journal)."""
    note = sitelock.read_note(paths.state)
    if not note:
        return
    report.blocked = [b for b in note.get("blocked") or () if isinstance(b, dict)]
    if report.daemon.state == "stale" and report.blocked and finite(note.get("at")):
        d = report.daemon
        d.state, d.reason = "up", None
        d.heartbeat_age_s = report.now - note["at"]


def stale_after(heartbeat_s: float | None) -> float:
    """Seconds after which a heartbeat is stale: max(10 s, 5 × the heartbeat interval)."""
    beat = heartbeat_s if finite(heartbeat_s) and heartbeat_s > 0 else DEFAULT_HEARTBEAT_S
    return max(MIN_STALE_S, STALE_BEATS * float(beat))


def _daemon(report: StatusReport, beat: Heartbeat, now: float) -> psutil.Process | None:
    """Fill ``daemon`` and ``device`` from the heartbeat; the daemon's Process when up."""
    d, info = report.daemon, beat.info
    pid, started, at = beat.pid, beat.started_at, beat.at
    d.pid, d.started_at, d.heartbeat_at, d.heartbeat_state = pid, started, at, beat.state
    d.status, d.version = _str(info.get("status")), _str(info.get("version"))
    d.heartbeat_age_s = now - at if finite(at) else None
    report.device = DeviceFacts(
        device=_str(info.get("device")), dtype=_str(info.get("dtype")),
        gpu_name=_str(info.get("gpu_name")), gpu_allocated=_num(info.get("gpu_allocated")),
        gpu_reserved=_num(info.get("gpu_reserved")), gpu_peak=_num(info.get("gpu_peak")))

    if beat.state in STOPPED_STATES:
        d.reason = "stopped cleanly"
        return None
    proc = _live_process(pid, started)
    if proc is None:
        d.reason = f"pid {pid} is not running (it stopped without saying so)"
        return None
    limit = stale_after(_num(info.get("heartbeat_s")))
    age = d.heartbeat_age_s
    if age is None or age > limit:
        d.state = "stale"
        d.reason = (f"pid {pid} is alive but its last heartbeat is "
                    f"{'missing' if age is None else human_duration(age) + ' old'} "
                    f"(limit {human_duration(limit)}): hung?")
        return proc
    d.state = "up"
    d.uptime_s = now - started if finite(started) else None
    return proc


def _live_process(pid: Any, started_at: Any) -> psutil.Process | None:
    """The process behind ``pid`` if it is alive and not a later process given the same pid."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return None
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if finite(started_at) and proc.create_time() > started_at + PID_REUSE_SLACK_S:
            return None
    except psutil.AccessDenied:
        pass  # alive, but hidden from us (hidepid, another user): trust the heartbeat
    except psutil.Error:
        return None
    return proc


def _cpu_start(proc: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        proc.cpu_percent(None)  # primes the counter; read again after the queries
    return time.monotonic()


def _process_facts(proc: psutil.Process, cpu_started: float, d: DaemonFacts) -> None:
    try:
        d.rss_bytes = proc.memory_info().rss
        left = CPU_SAMPLE_S - (time.monotonic() - cpu_started)
        if left > 0:
            time.sleep(left)
        d.cpu_percent = proc.cpu_percent(None)
    except psutil.Error:
        pass  # another user's process under hidepid, or it just exited


def _counts(store: Store, report: StatusReport) -> None:
    """Lines, files, audio, and the cache: its entries and size, and hits and misses
    per done line. A hit is a done line whose WAV came from the cache (a copy, or with
    ``cache.link`` a link), a miss a done line that did not (synthesized); a batch
    synthesized again after a failed write adds no miss."""
    states, done = store.line_states(), store.done_totals()
    report.lines = LineCounts(done=states.done, failed=states.failed, pending=states.pending,
                              running=states.running, cached=done.cached)
    report.queue_depth = states.pending + states.running
    report.audio = AudioTotal(seconds=done.audio_s, hours=done.audio_s / 3600.0)
    files = store.file_states()
    report.files = FileCounts(done=files.done, failed=files.failed,
                              in_progress=files.parsing + files.queued)
    cache = store.cache_totals()
    hits = done.cached
    misses = max(0, states.done - hits)
    report.cache = CacheFacts(entries=cache.entries, bytes=cache.bytes, hits=hits,
                              misses=misses,
                              hit_rate=hits / (hits + misses) if hits + misses else None)


def _speed(store: Store, report: StatusReport, now: float) -> None:
    sp = report.speed
    t = store.batch_totals()
    sp.batches = t.batches
    if t.lines and t.model_ms is not None:
        sp.ms_per_line = t.model_ms / t.lines
    if t.model_ms and t.audio_s is not None:
        sp.model_x_realtime = t.audio_s / (t.model_ms / 1000.0)
    if t.padded_frames:
        sp.padding_efficiency = (t.used_frames or 0) / t.padded_frames
    recent_ms = store.recent_model_ms(LATENCY_WINDOW)
    sp.latency_batches = len(recent_ms)
    sp.latency_p50_ms = percentile(recent_ms, 50)
    sp.latency_p95_ms = percentile(recent_ms, 95)
    recent, overall = store.throughput(since=now - RECENT_S), store.throughput(since=None)
    sp.x_realtime_working_last_hour = recent.x_realtime
    sp.x_realtime_working_overall = overall.x_realtime
    sp.working_s_last_hour, sp.working_s_overall = recent.working_s, overall.working_s
    sp.audio_s_last_hour = recent.audio_s
    if report.device.device is None:  # daemon never beat: the last batch says
        last = store.last_batch_device()
        if last is not None:
            report.device.device, report.device.dtype = last.device, last.dtype


def _worker(w: WorkerRow, stopped: bool) -> WorkerFacts:
    """One worker slot: device, host, state, batches, x-realtime (audio s ÷ model s),
    GPU memory, restarts, and its GPU memory releases. A slot of a daemon that is not
    up is stopped (unless it was out)."""
    model_s = (w.model_ms or 0) / 1000.0
    return WorkerFacts(
        slot=w.slot, device=w.device, backend=w.backend, host=w.host, pid=w.pid,
        state="stopped" if stopped and w.state not in ("out",) else w.state,
        batches=w.batches, lines=w.lines, audio_s=w.audio_s,
        x_realtime=w.audio_s / model_s if model_s > 0 else None,
        restarts=w.restarts, failures=w.failures, last_error=w.last_error,
        gpu_name=w.gpu_name, gpu_total=w.gpu_total, gpu_allocated=w.gpu_allocated,
        gpu_reserved=w.gpu_reserved, gpu_peak=w.gpu_peak, releases=w.releases,
        released_bytes=w.released_bytes, last_release_at=w.last_release_at)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0–100), interpolating linearly between the closest ranks
    (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _num(x: Any) -> float | int | None:
    return x if finite(x) else None


def _str(x: Any) -> str | None:
    return str(x) if x is not None else None
