"""``ttsd status``: what the daemon is doing, read from the store (and psutil), never asked.

Like ``rq info``, status reads the heartbeat row the daemon writes every
``heartbeat_s`` and checks its pid with psutil; it never talks to the process. It
opens the store read-only (WAL: a reader never blocks the daemon's writes and is
never blocked by them) and runs a handful of short, index-friendly queries in one
read transaction, so the numbers are one consistent snapshot (RELIABILITY row 30:
answers in well under a second with 100k lines, while another connection holds the
write lock).

``collect`` returns a JSON-able dict (``ttsd status --json``); ``render`` turns it
into a compact block for a terminal.

Speed is audio seconds per second spent working: the union of the batches' working
intervals, so idle time and batches that overlap on several devices are not counted
twice (``throughput``). Cache hits and misses are lines: done from the cache vs done by
synthesis. GPU memory and its releases are shown only for a CUDA device.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ttsd.config import PathsConfig
from ttsd.errors import ConfigError, StoreDamagedError
from ttsd.service import sitelock
from ttsd.store.journal import DONE_AUDIO_US, DONE_CACHED, Store, damaged

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
GPU_DEVICE_PREFIX = "cuda"
"""A device whose name starts with this (``cuda``, ``cuda:1``; ROCm too) is a GPU; only
there do GPU memory and memory releases mean something."""
_GPU_RELEASE = f"device LIKE '{GPU_DEVICE_PREFIX}%'"
"""SQL: a releases row recorded on a GPU (a CPU's release frees nothing)."""


# ---------------------------------------------------------------------- collect

def collect(paths: PathsConfig, now: float | None = None) -> dict[str, Any]:
    """Everything ``ttsd status`` shows, as a JSON-able dict (see ``_empty``).

    A missing store means the daemon never ran here: daemon state "down", zeros
    elsewhere. A store that exists but cannot be read raises ConfigError.
    """
    now = time.time() if now is None else now
    report = _empty(paths.db, now)
    store = Store.open_readonly(paths.db)
    if store is None or not _has_tables(store):
        if store is not None:
            store.close()
        report["daemon"]["reason"] = f"never ran here (no store at {paths.db})"
        _starting(paths, report)
        return report
    report["store"]["exists"] = True
    proc: psutil.Process | None = None
    cpu_started = 0.0
    try:
        store.conn.execute("BEGIN")  # one read snapshot for every query below
        try:
            beat = _heartbeat_row(store)
            if beat is not None:
                proc = _daemon(report, beat, now)
                if proc is not None:
                    cpu_started = _cpu_start(proc)
            _counts(store, report)
            _cache(store, report)
            _speed(store, report, now)
            _releases(store, report)
            _workers(store, report)
        finally:
            store.conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if damaged(exc):
            raise StoreDamagedError(paths.db, str(exc)) from None
        raise ConfigError(f"cannot read the store {paths.db}: {exc}") from None
    finally:
        store.close()
    if proc is not None:
        _process_facts(proc, cpu_started, report["daemon"])
    _blocked(paths, report)
    return report


def _has_tables(store: Store) -> bool:
    """The journal has been set up (a daemon that starts on a full disk may leave an
    empty file)."""
    return store.one("SELECT 1 FROM sqlite_master WHERE name = 'heartbeat'") is not None


def _starting(paths: PathsConfig, report: dict[str, Any]) -> None:
    """No journal yet, but a daemon holds the state folder: it is starting (or waiting
    for a disk it cannot write: its note says so)."""
    pid = sitelock.holder(paths.state)
    if pid is None:
        return
    d = report["daemon"]
    d["state"] = "starting"
    d["pid"] = pid if pid > 0 else None
    d["reason"] = (f"pid {pid if pid > 0 else '?'} holds the state folder but has not set up "
                   f"its journal {paths.db} yet (starting, or waiting for a disk it cannot "
                   "write: its log and systemd's STATUS= say which)")
    _blocked(paths, report)


def _blocked(paths: PathsConfig, report: dict[str, Any]) -> None:
    """The places the running daemon cannot write, from its lock file's note (written
    in place, so it is fresh even when a full disk keeps the heartbeat out of the
    journal)."""
    note = sitelock.read_note(paths.state)
    if not note:
        return
    report["blocked"] = [b for b in note.get("blocked") or () if isinstance(b, dict)]
    if report["daemon"]["state"] == "stale" and report["blocked"] and _finite(note.get("at")):
        d = report["daemon"]
        d["state"], d["reason"] = "up", None
        d["heartbeat_age_s"] = report["now"] - note["at"]


def _empty(db: Path, now: float) -> dict[str, Any]:
    """The report's shape, every number zero or None. Units: seconds, bytes, ms."""
    return {
        "now": now,
        "store": {"path": str(db), "exists": False},
        "daemon": {
            "state": "down",          # up | stale (pid alive, heartbeat old) | starting | down
            "reason": None,           # why it is not up, in words
            "pid": None, "started_at": None, "uptime_s": None,
            "heartbeat_at": None, "heartbeat_age_s": None, "heartbeat_state": None,
            "status": None,           # the daemon's own one-line status text
            "version": None,
            "rss_bytes": None,
            "cpu_percent": None,      # % of one core, sampled now
        },
        "device": {"device": None, "dtype": None, "gpu_name": None,
                   "gpu_allocated": None, "gpu_reserved": None, "gpu_peak": None},
        "queue_depth": 0,             # lines pending + running
        "files": {"done": 0, "failed": 0, "in_progress": 0},
        "lines": {"done": 0, "failed": 0, "pending": 0, "running": 0, "cached": 0},
        "audio": {"seconds": 0.0, "hours": 0.0},
        # hits: done lines linked to the cache; misses: done lines that are not
        # (synthesized); hit_rate = hits / (hits + misses)
        "cache": {"entries": 0, "bytes": 0, "hits": 0, "misses": 0, "hit_rate": None},
        "speed": {
            "batches": 0,
            "ms_per_line": None,            # sum model_ms / sum lines, all batches
            "latency_batches": 0,           # batches behind p50/p95 (last 1000)
            "latency_p50_ms": None,
            "latency_p95_ms": None,
            # audio s / working s (see throughput()): batches committed in the last
            # hour, and all batches
            "x_realtime_working_last_hour": None,
            "x_realtime_working_overall": None,
            "working_s_last_hour": 0.0,     # union of the batches' working intervals
            "working_s_overall": 0.0,
            "audio_s_last_hour": 0.0,       # audio of the batches committed in the last hour
            "model_x_realtime": None,       # audio s / model s, all batches
            "padding_efficiency": None,     # used / padded frames
        },
        # releases of GPU memory (rows whose device is a GPU)
        "memory_releases": {"count": 0, "total_bytes": 0, "last_at": None,
                            "last_bytes": None, "last_reason": None},
        "workers": [],                # several devices / Ray: one dict per worker slot
        # places the daemon cannot write now: place (outbox, state, done, failed, inbox),
        # path, error, since (epoch s), retries, retry_in_s
        "blocked": [],
    }


def _heartbeat_row(store: Store) -> dict[str, Any] | None:
    rows = store.q("SELECT pid, started_at, at, state, info FROM heartbeat WHERE id = 1")
    return rows[0] if rows else None


def _info(raw: Any) -> dict[str, Any]:
    try:
        info = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def stale_after(heartbeat_s: float | None) -> float:
    """Seconds after which a heartbeat is stale: max(10 s, 5 × the heartbeat interval)."""
    beat = heartbeat_s if _finite(heartbeat_s) and heartbeat_s > 0 else DEFAULT_HEARTBEAT_S
    return max(MIN_STALE_S, STALE_BEATS * float(beat))


def _daemon(report: dict[str, Any], beat: dict[str, Any], now: float) -> psutil.Process | None:
    """Fill ``daemon`` and ``device`` from the heartbeat; the daemon's Process when up."""
    d, info = report["daemon"], _info(beat.get("info"))
    pid, started, at = beat.get("pid"), beat.get("started_at"), beat.get("at")
    d.update(pid=pid, started_at=started, heartbeat_at=at, heartbeat_state=beat.get("state"),
             status=_str(info.get("status")), version=_str(info.get("version")))
    d["heartbeat_age_s"] = now - at if _finite(at) else None
    dev = report["device"]
    dev["device"], dev["dtype"] = _str(info.get("device")), _str(info.get("dtype"))
    dev["gpu_name"] = _str(info.get("gpu_name"))
    for key in ("gpu_allocated", "gpu_reserved", "gpu_peak"):
        dev[key] = _num(info.get(key))

    if beat.get("state") in STOPPED_STATES:
        d["reason"] = "stopped cleanly"
        return None
    proc = _live_process(pid, started)
    if proc is None:
        d["reason"] = f"pid {pid} is not running (it stopped without saying so)"
        return None
    limit = stale_after(_num(info.get("heartbeat_s")))
    age = d["heartbeat_age_s"]
    if age is None or age > limit:
        d["state"] = "stale"
        d["reason"] = (f"pid {pid} is alive but its last heartbeat is "
                       f"{'missing' if age is None else human_duration(age) + ' old'} "
                       f"(limit {human_duration(limit)}): hung?")
        return proc
    d["state"] = "up"
    d["uptime_s"] = now - started if _finite(started) else None
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
        if _finite(started_at) and proc.create_time() > started_at + PID_REUSE_SLACK_S:
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


def _process_facts(proc: psutil.Process, cpu_started: float, d: dict[str, Any]) -> None:
    try:
        d["rss_bytes"] = proc.memory_info().rss
        left = CPU_SAMPLE_S - (time.monotonic() - cpu_started)
        if left > 0:
            time.sleep(left)
        d["cpu_percent"] = proc.cpu_percent(None)
    except psutil.Error:
        pass  # another user's process under hidepid, or it just exited


def _counts(store: Store, report: dict[str, Any]) -> None:
    lines = report["lines"]
    # lines_state index: a covering scan, no table rows read
    for state, n in store.conn.execute("SELECT state, COUNT(*) FROM lines GROUP BY state"):
        if state in lines:
            lines[state] = n
    report["queue_depth"] = lines["pending"] + lines["running"]
    totals = dict(store.conn.execute("SELECT name, value FROM counters WHERE name IN (?, ?)",
                                     (DONE_AUDIO_US, DONE_CACHED)))
    if len(totals) == 2:   # kept as lines go done (the store's m004)
        seconds, cached = totals[DONE_AUDIO_US] / 1_000_000, totals[DONE_CACHED]
    else:   # a store no daemon of this version has opened yet (status never migrates)
        seconds, cached = store.conn.execute(
            "SELECT COALESCE(SUM(seconds), 0), COALESCE(SUM(cached), 0) FROM lines "
            "WHERE state = 'done'").fetchone()
    lines["cached"] = int(cached)
    report["audio"] = {"seconds": float(seconds), "hours": float(seconds) / 3600.0}
    files = report["files"]
    for state, n in store.conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state"):
        if state in ("done", "failed"):
            files[state] += n
        else:  # parsing, queued
            files["in_progress"] += n


def _cache(store: Store, report: dict[str, Any]) -> None:
    """Cache entries and size, and hits and misses per done line (from the counts
    ``_counts`` fills): a hit is a done line whose WAV is a link to the cache, a miss a
    done line that is not (synthesized). A batch synthesized again after a failed write
    adds no miss."""
    cache, lines = report["cache"], report["lines"]
    entries, size = store.conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM cache").fetchone()
    hits = lines["cached"]
    misses = max(0, lines["done"] - hits)
    cache.update(entries=entries, bytes=size, hits=hits, misses=misses,
                 hit_rate=hits / (hits + misses) if hits + misses else None)


def _speed(store: Store, report: dict[str, Any], now: float) -> None:
    speed = report["speed"]
    n, lines, model_ms, audio_s, used, padded = store.conn.execute(
        "SELECT COUNT(*), SUM(size), SUM(model_ms), SUM(audio_s), SUM(used_frames), "
        "SUM(padded_frames) FROM batches").fetchone()
    speed["batches"] = n
    if lines and model_ms is not None:
        speed["ms_per_line"] = model_ms / lines
    if model_ms and audio_s is not None:
        speed["model_x_realtime"] = audio_s / (model_ms / 1000.0)
    if padded:
        speed["padding_efficiency"] = (used or 0) / padded
    recent = [r[0] for r in store.conn.execute(
        "SELECT model_ms FROM batches WHERE model_ms IS NOT NULL ORDER BY id DESC LIMIT ?",
        (LATENCY_WINDOW,))]
    speed["latency_batches"] = len(recent)
    speed["latency_p50_ms"] = percentile(recent, 50)
    speed["latency_p95_ms"] = percentile(recent, 95)
    recent, overall = throughput(store, since=now - RECENT_S), throughput(store, since=None)
    speed.update(x_realtime_working_last_hour=recent.x_realtime,
                 x_realtime_working_overall=overall.x_realtime,
                 working_s_last_hour=recent.working_s, working_s_overall=overall.working_s,
                 audio_s_last_hour=recent.audio_s)
    if report["device"]["device"] is None:  # daemon never beat: the last batch says
        row = store.conn.execute(
            "SELECT device, dtype FROM batches ORDER BY id DESC LIMIT 1").fetchone()
        if row:
            report["device"]["device"], report["device"]["dtype"] = row


@dataclass(frozen=True)
class Throughput:
    """What the batches of a window produced, and the wall time spent producing it."""

    batches: int
    audio_s: float
    """Audio seconds of the window's batches."""
    working_s: float
    """Length of the union of the batches' working intervals, in seconds."""

    @property
    def x_realtime(self) -> float | None:
        """Audio seconds per working second; None when no time was spent."""
        return self.audio_s / self.working_s if self.working_s > 0 else None


_BATCH_START = "at - MAX(0, COALESCE(model_ms, 0) + COALESCE(write_ms, 0)) / 1000.0"
_THROUGHPUT_SQL = f"""
    SELECT COUNT(*), TOTAL(audio_s), TOTAL(MAX(0, MIN(at, COALESCE(later, at)) - start))
    FROM (SELECT at, audio_s, start, MIN(start) OVER (ORDER BY at DESC
                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS later
          FROM (SELECT at, audio_s, {_BATCH_START} AS start FROM batches {{where}}))"""


def throughput(store: Store, since: float | None) -> Throughput:
    """Audio and working time of the batches committed at or after ``since`` (all
    batches when None).

    A batch's ``at`` is when it was committed, its end; it worked over
    [at − (model_ms + write_ms) / 1000, at]. The working time is the length of the union
    of those intervals: idle time between batches is not counted, and batches that
    overlap (several devices) count once. A batch committed in the window counts whole,
    even when it started before ``since``.

    One query, linear in the batches: taken by ``at``, latest first, every batch before
    this one ends no earlier than it does, so their union covers this batch's interval
    from the earliest start among them (``later``, a running MIN) on, and this batch
    adds max(0, min(at, later) − start).
    """
    where, params = ("WHERE at >= ?", (since,)) if since is not None else ("", ())
    n, audio, working = store.conn.execute(_THROUGHPUT_SQL.format(where=where),
                                           params).fetchone()
    return Throughput(batches=n, audio_s=float(audio), working_s=float(working))


def _releases(store: Store, report: dict[str, Any]) -> None:
    """The GPU memory releases: how many, how much, and the last one. Releases recorded
    on the CPU (which free nothing) are left out."""
    rel = report["memory_releases"]
    count, total = store.conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM releases WHERE {_GPU_RELEASE}"
    ).fetchone()
    rel.update(count=count, total_bytes=total)
    row = store.conn.execute(f"SELECT at, bytes, reason FROM releases WHERE {_GPU_RELEASE} "
                             "ORDER BY id DESC LIMIT 1").fetchone()
    if row:
        rel["last_at"], rel["last_bytes"], rel["last_reason"] = row


def _workers(store: Store, report: dict[str, Any]) -> None:
    """One entry per worker slot: device, host, state, batches, x-realtime (audio s ÷
    model s), GPU memory, restarts, and its GPU memory releases."""
    try:
        rows = store.q("SELECT * FROM workers ORDER BY slot")
        rel = {r["worker"]: r for r in store.q(
            "SELECT worker, COUNT(*) AS count, COALESCE(SUM(bytes), 0) AS bytes, MAX(at) AS "
            f"last_at FROM releases WHERE worker IS NOT NULL AND {_GPU_RELEASE} "
            "GROUP BY worker")}
    except sqlite3.OperationalError:   # a store from before migration m002
        return
    stopped = report["daemon"]["state"] != "up"
    for r in rows:
        state = r["state"]
        if stopped and state not in ("out",):
            state = "stopped"
        model_s = (r["model_ms"] or 0) / 1000.0
        re = rel.get(r["slot"], {})
        report["workers"].append({
            "slot": r["slot"], "device": r["device"], "backend": r["backend"],
            "host": r["host"], "pid": r["pid"], "state": state, "batches": r["batches"],
            "lines": r["lines"], "audio_s": r["audio_s"],
            "x_realtime": r["audio_s"] / model_s if model_s > 0 else None,
            "restarts": r["restarts"], "failures": r["failures"], "last_error": r["last_error"],
            "gpu_name": r["gpu_name"], "gpu_total": r["gpu_total"],
            "gpu_allocated": r["gpu_allocated"], "gpu_reserved": r["gpu_reserved"],
            "gpu_peak": r["gpu_peak"], "releases": re.get("count", 0),
            "released_bytes": re.get("bytes", 0), "last_release_at": re.get("last_at")})


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


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any) -> float | int | None:
    return x if _finite(x) else None


def _str(x: Any) -> str | None:
    return str(x) if x is not None else None


def on_gpu(device: str | None) -> bool:
    """Whether a device name (``cuda:0``, ``cpu``, …) is a GPU's."""
    return device is not None and device.lower().startswith(GPU_DEVICE_PREFIX)


# ---------------------------------------------------------------------- render

def human_bytes(n: float | None) -> str:
    """``1536`` → ``1.5 KiB``; ``5368709120`` → ``5.0 GiB`` (binary multiples)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(n)} B" if unit == "B" else f"{value:.1f} {unit}"


def human_duration(s: float | None) -> str:
    """``45`` → ``45s``; ``3725`` → ``1h 2m``; ``200000`` → ``2d 7h``."""
    if s is None:
        return "-"
    s = max(0.0, float(s))
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    minutes, sec = divmod(int(s), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {sec}s"


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f} ms" if x < 100 else f"{x:,.0f} ms")


def _xrt(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}×" if x < 100 else f"{x:,.0f}×")


def _audio(seconds: float) -> str:
    """An amount of audio: hours from 0.1 h up (``0.35 h``), a duration below."""
    return f"{seconds / 3600:,.2f} h" if seconds >= 360 else human_duration(seconds)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def render(report: dict[str, Any]) -> str:
    """A compact, readable block for a terminal."""
    d, dev, sp = report["daemon"], report["device"], report["speed"]
    lines, files, cache = report["lines"], report["files"], report["cache"]
    rel = report["memory_releases"]
    now = report.get("now") or time.time()
    out: list[str] = []

    def row(label: str, text: str) -> None:
        out.append(f"{label:<9} {text}")

    if d["state"] == "up":
        cpu = "-" if d["cpu_percent"] is None else f"{d['cpu_percent']:.0f}%"
        text = (f"up · pid {d['pid']} · uptime {human_duration(d['uptime_s'])} · "
                f"RSS {human_bytes(d['rss_bytes'])} · CPU {cpu}")
        if d["version"]:
            text += f" · v{d['version']}"
    else:
        text = f"{d['state'].upper()} · {d['reason'] or 'unknown'}"
    if d["heartbeat_age_s"] is not None:
        text += f" · heartbeat {human_duration(d['heartbeat_age_s'])} ago"
    row("daemon", text)
    if d["status"] and d["state"] != "down":
        row("", d["status"])
    for b in report.get("blocked") or ():
        row("BLOCKED", f"{b.get('place')}: {b.get('path')}: {b.get('error')} (for "
                       f"{human_duration(now - b['since']) if _finite(b.get('since')) else '-'}, "
                       f"retry in {human_duration(b.get('retry_in_s'))}; nothing is lost, "
                       "the work waits)")
    if dev["device"]:
        text = " ".join(x for x in (dev["device"], dev["dtype"]) if x)
        if dev["gpu_name"]:
            text += f" · {dev['gpu_name']}"
        if on_gpu(dev["device"]) and any(
                dev[k] is not None for k in ("gpu_allocated", "gpu_reserved", "gpu_peak")):
            text += (f" · GPU memory {human_bytes(dev['gpu_allocated'])} allocated, "
                     f"{human_bytes(dev['gpu_reserved'])} reserved, "
                     f"{human_bytes(dev['gpu_peak'])} peak")
        row("device", text)
    row("queue", f"{report['queue_depth']:,} lines ({lines['pending']:,} pending, "
                 f"{lines['running']:,} running)")
    row("files", f"{files['done']:,} done · {files['failed']:,} failed · "
                 f"{files['in_progress']:,} in progress")
    row("lines", f"{lines['done']:,} done ({lines['cached']:,} from the cache) · "
                 f"{lines['failed']:,} failed")
    audio = report["audio"]
    row("audio", f"{audio['hours']:,.2f} h" if audio["hours"] >= 1
        else human_duration(audio["seconds"]))
    rate = "-" if cache["hit_rate"] is None else f"{100 * cache['hit_rate']:.1f}%"
    row("cache", f"{cache['entries']:,} entries · {human_bytes(cache['bytes'])} · "
                 f"hit rate {rate} ({_plural(cache['hits'], 'line')} from the cache, "
                 f"{cache['misses']:,} synthesized)")
    if sp["batches"]:
        row("speed", f"{_ms(sp['ms_per_line'])}/line · batch p50 {_ms(sp['latency_p50_ms'])}, "
                     f"p95 {_ms(sp['latency_p95_ms'])} (last {sp['latency_batches']:,} batches)")
        row("", f"{_xrt(sp['x_realtime_working_last_hour'])} realtime while working "
                f"(last hour) · {_xrt(sp['x_realtime_working_overall'])} overall · "
                f"{_xrt(sp['model_x_realtime'])} model only")
        row("", f"{_audio(sp['audio_s_last_hour'])} of audio in the last hour · "
                f"{sp['batches']:,} batches")
    else:
        row("speed", "no batches yet")
    if rel["count"]:
        row("memory", f"last release {human_duration(now - rel['last_at'])} ago "
                      f"({human_bytes(rel['last_bytes'])}, {rel['last_reason'] or '-'}) · "
                      f"{_plural(rel['count'], 'release')}, "
                      f"{human_bytes(rel['total_bytes'])} in all")
    ws = report.get("workers") or []
    if ws:
        states: dict[str, int] = {}
        for w in ws:
            states[w["state"]] = states.get(w["state"], 0) + 1
        row("workers", f"{len(ws)} · " + ", ".join(f"{n} {st}" for st, n in states.items()))
        for w in ws:
            text = (f"#{w['slot']} {w['device']} @ {w['host'] or '-'} pid {w['pid'] or '-'} "
                    f"{w['state']} · {w['batches']:,} batches · {_xrt(w['x_realtime'])} · "
                    f"restarts {w['restarts']}")
            if w["gpu_allocated"]:
                text += (f" · GPU {human_bytes(w['gpu_allocated'])} allocated, "
                         f"{human_bytes(w['gpu_reserved'])} reserved, "
                         f"{human_bytes(w['gpu_peak'])} peak")
            if w["releases"]:
                text += (f" · {_plural(w['releases'], 'release')} "
                         f"({human_bytes(w['released_bytes'])})")
            if w["state"] in ("out", "restarting") and w["last_error"]:
                text += f" · {w['last_error'][:80]}"
            row("", text)
    out.append(f"{'store':<9} {report['store']['path']}")
    return "\n".join(out)
