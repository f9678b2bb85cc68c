"""``ttsd status``: daemon liveness from the heartbeat and psutil, counts, cache, speed,
device facts, and answering fast while the daemon writes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ttsd.config import PathsConfig
from ttsd.records import BatchStats
from ttsd.service.status import collect, percentile, stale_after
from ttsd.service.status_text import render
from ttsd.store.journal import NewLine, Store

INFO = {"device": "cuda:0", "dtype": "float16", "gpu_name": "NVIDIA H100",
        "gpu_allocated": 3 * 2**30, "gpu_reserved": 4 * 2**30, "gpu_peak": 12 * 2**30,
        "queue": 7, "status": "queue 7 lines; done 3", "heartbeat_s": 2.0, "version": "0.1.0"}
CPU_INFO = {"device": "cpu", "dtype": "float32", "gpu_name": None, "gpu_allocated": None,
            "gpu_reserved": None, "gpu_peak": None, "queue": 0, "status": "queue 0 lines",
            "heartbeat_s": 2.0, "version": "0.1.0"}
"""A CPU daemon's heartbeat with its GPU facts unset."""
CPU_INFO_AS_WRITTEN = {**CPU_INFO, "gpu_name": "x86_64", "gpu_allocated": 0,
                       "gpu_reserved": 0, "gpu_peak": 0}
"""A CPU daemon's heartbeat as the daemon writes it: the processor's name in
``gpu_name``, zeros for the memory an engine on the CPU reports."""


@pytest.fixture()
def paths(tmp_path: Path) -> PathsConfig:
    return PathsConfig(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox",
                       done=tmp_path / "done", failed=tmp_path / "failed",
                       state=tmp_path / "state")


@pytest.fixture()
def store(paths: PathsConfig) -> Store:
    s = Store(paths.db)
    yield s
    s.close()


def add_file(store: Store, tmp_path: Path, name: str, n: int, chunk: int = 10_000) -> int:
    file_id = store.add_file(name, tmp_path / "work" / name, 100, "0" * 64,
                             tmp_path / "outbox" / name)
    for start in range(0, n, chunk):
        store.add_lines(file_id, [NewLine(number=i + 1, text=f"line {i}")
                                  for i in range(start, min(n, start + chunk))])
    store.file_parsed(file_id, "txt", n, None)
    return file_id


def line_ids(store: Store, file_id: int) -> list[int]:
    return [r["id"] for r in store.q("SELECT id FROM lines WHERE file_id=? ORDER BY id",
                                     (file_id,))]


def batch(size: int, model_ms: float, audio_s: float) -> BatchStats:
    return BatchStats(size=size, phonemes=10 * size, audio_s=audio_s, prepare_ms=1.0,
                      model_ms=model_ms, write_ms=2.0, device="cpu", dtype="float32",
                      voice="v", padded_frames=100, used_frames=80)


def timed_batches(store: Store, rows: list[tuple[float, float, float, float]]) -> None:
    """Batches committed at given times: rows of (at, model_ms, write_ms, audio_s)."""
    for at, model_ms, write_ms, audio_s in rows:
        stats = BatchStats(size=1, phonemes=10, audio_s=audio_s, prepare_ms=1.0,
                           model_ms=model_ms, write_ms=write_ms, device="cuda:0",
                           dtype="float16", voice="v")
        store.complete([], [], [], stats, {})
        store.conn.execute("UPDATE batches SET at = ? WHERE id = (SELECT MAX(id) FROM batches)",
                           (at,))


def dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
    pid = int(out.stdout)
    assert not psutil.pid_exists(pid)
    return pid


# ---------------------------------------------------------------------- daemon

def test_no_store_means_never_ran(paths: PathsConfig) -> None:
    report = collect(paths)
    assert report.daemon.state == "down"
    assert "never ran" in report.daemon.reason
    assert report.to_json()["store"] == {"path": str(paths.db), "exists": False}
    assert report.queue_depth == 0 and report.cache.entries == 0
    assert not paths.state.exists()  # status creates nothing
    json.dumps(report.to_json())
    text = render(report)
    assert "DOWN" in text and "never ran" in text and "no batches yet" in text


def test_live_pid_with_fresh_heartbeat_is_up(paths: PathsConfig, store: Store) -> None:
    started = psutil.Process().create_time() + 0.5  # as the daemon records it
    store.heartbeat(os.getpid(), started, "running", INFO)
    report = collect(paths)
    d = report.daemon
    assert d.state == "up" and d.reason is None and d.pid == os.getpid()
    assert d.uptime_s == pytest.approx(report.now - started)
    assert 0 <= d.heartbeat_age_s < 5
    assert d.rss_bytes == pytest.approx(psutil.Process().memory_info().rss, rel=0.5)
    assert d.cpu_percent is not None and d.cpu_percent >= 0
    assert d.version == "0.1.0" and d.status == INFO["status"]
    assert report.to_json()["device"] == {k: INFO[k] for k in ("device", "dtype", "gpu_name", "gpu_allocated",
                                        "gpu_reserved", "gpu_peak")}
    json.dumps(report.to_json())
    text = render(report)
    assert text.startswith("daemon    up · pid ")
    assert "cuda:0 float16 · NVIDIA H100 · GPU memory 3.0 GiB allocated, 4.0 GiB reserved, " \
           "12.0 GiB peak" in text
    assert "queue 7 lines; done 3" in text


def test_dead_pid_is_down(paths: PathsConfig, store: Store) -> None:
    store.heartbeat(dead_pid(), time.time() - 5, "running", INFO)
    report = collect(paths)
    d = report.daemon
    assert d.state == "down" and "not running" in d.reason
    assert d.uptime_s is None and d.rss_bytes is None and d.cpu_percent is None
    assert report.device.device == "cuda:0"  # the last known facts stay visible
    assert "DOWN" in render(report)


def test_stale_heartbeat_from_a_live_pid(paths: PathsConfig, store: Store) -> None:
    store.heartbeat(os.getpid(), time.time(), "running", INFO)
    later = time.time() + 60
    report = collect(paths, now=later)
    assert report.daemon.state == "stale"
    assert "hung" in report.daemon.reason
    assert "STALE" in render(report)
    # a daemon that beats every 30 s is still up after 60 s (limit 5 × 30 s)
    store.heartbeat(os.getpid(), time.time(), "running", {**INFO, "heartbeat_s": 30})
    assert collect(paths, now=later).daemon.state == "up"


def test_stale_limit() -> None:
    assert stale_after(None) == 10 and stale_after(1) == 10 and stale_after(4) == 20
    assert stale_after(float("nan")) == 10 and stale_after(-3) == 10


def test_clean_stop_is_down(paths: PathsConfig, store: Store) -> None:
    store.heartbeat(os.getpid(), time.time(), "stopped", INFO)
    d = collect(paths).daemon
    assert d.state == "down" and d.reason == "stopped cleanly"


def test_reused_pid_is_down(paths: PathsConfig, store: Store) -> None:
    """The pid is alive but that process started after the daemon recorded its start:
    the daemon died and the pid went to someone else."""
    born = psutil.Process().create_time()
    store.heartbeat(os.getpid(), born - 3600, "running", INFO)
    assert collect(paths).daemon.state == "down"


def test_garbage_heartbeat_info_is_tolerated(paths: PathsConfig, store: Store) -> None:
    store.heartbeat(os.getpid(), time.time(), "running", {})
    store.conn.execute("UPDATE heartbeat SET info = 'not json'")
    report = collect(paths)
    assert report.daemon.state == "up" and report.device.device is None
    store.conn.execute("UPDATE heartbeat SET info = ?",
                       (json.dumps({"gpu_peak": "lots", "heartbeat_s": "x", "device": 3}),))
    report = collect(paths)
    assert report.device.gpu_peak is None and report.device.device == "3"
    render(report)


# ---------------------------------------------------------------------- counts and speed

def test_counts_cache_and_speed(paths: PathsConfig, store: Store, tmp_path: Path) -> None:
    a = add_file(store, tmp_path, "a.txt", 6)
    b = add_file(store, tmp_path, "b.txt", 4)
    add_file(store, tmp_path, "c.txt", 0)
    store.finish_file(add_file(store, tmp_path, "d.txt", 0))
    store.fail_file(add_file(store, tmp_path, "e.txt", 0), "binary")
    ids_a, ids_b = line_ids(store, a), line_ids(store, b)
    store.take(1, max_attempts=3)  # a's first line → running
    cache_row = {"key": "k", "path": "/x.wav", "bytes": 4096, "seconds": 2.0, "voice": "v"}
    store.complete([(ids_a[1], "a/2.wav", 3.0, False), (ids_a[2], "a/3.wav", 2.0, True)],
                   [(ids_a[3], "NaN audio")], [cache_row], batch(2, 40.0, 5.0),
                   {"cache_hits": 1, "cache_misses": 3})
    store.complete([(i, f"b/{i}.wav", 3600.0, False) for i in ids_b], [], [],
                   batch(4, 160.0, 4 * 3600.0), {"cache_misses": 4})
    store.record_release(2**30, "idle", "cuda:0")
    store.record_release(512 * 2**20, "timer", "cuda:0")

    report = collect(paths)
    assert report.to_json()["lines"] == {"done": 6, "failed": 1, "pending": 2, "running": 1,
                                         "cached": 1}
    assert report.queue_depth == 3
    assert report.to_json()["files"] == {"done": 1, "failed": 1, "in_progress": 3}
    assert report.audio.seconds == 4 * 3600 + 5
    assert report.audio.hours == pytest.approx(4 + 5 / 3600)
    # per line: 1 done from the cache, 5 done by synthesis (the cache_misses counter is 7)
    assert report.to_json()["cache"] == {"entries": 1, "bytes": 4096, "hits": 1, "misses": 5,
                                         "hit_rate": 1 / 6}
    sp = report.speed
    assert sp.batches == 2 and sp.ms_per_line == pytest.approx(200 / 6)
    assert sp.latency_batches == 2
    assert sp.latency_p50_ms == pytest.approx(100) and sp.latency_p95_ms == 154
    assert sp.model_x_realtime == pytest.approx((4 * 3600 + 5) / 0.2)
    assert sp.padding_efficiency == pytest.approx(0.8)
    assert sp.x_realtime_working_last_hour == sp.x_realtime_working_overall > 0
    assert sp.audio_s_last_hour == 4 * 3600 + 5
    assert report.device.device == "cpu"  # no heartbeat: the last batch's device
    rel = report.memory_releases
    assert (rel.count, rel.total_bytes, rel.last_bytes, rel.last_reason) == \
        (2, 1536 * 2**20, 512 * 2**20, "timer")
    json.dumps(report.to_json())
    text = render(report)
    for part in ("3 lines (2 pending, 1 running)", "1 done · 1 failed · 3 in progress",
                 "6 done (1 from the cache) · 1 failed", "4.00 h",
                 "hit rate 16.7% (1 line from the cache, 5 synthesized)",
                 "4.0 KiB", "batch p50 100 ms, p95 154 ms (last 2 batches)",
                 "last release", "512.0 MiB, timer", "2 releases"):
        assert part in text, part


JSON_SHAPE = {
    "now": None,
    "store": ["path", "exists"],
    "daemon": ["state", "reason", "pid", "started_at", "uptime_s", "heartbeat_at",
               "heartbeat_age_s", "heartbeat_state", "status", "version", "rss_bytes",
               "cpu_percent"],
    "device": ["device", "dtype", "gpu_name", "gpu_allocated", "gpu_reserved", "gpu_peak"],
    "queue_depth": None,
    "files": ["done", "failed", "in_progress"],
    "lines": ["done", "failed", "pending", "running", "cached"],
    "audio": ["seconds", "hours"],
    "cache": ["entries", "bytes", "hits", "misses", "hit_rate"],
    "speed": ["batches", "ms_per_line", "latency_batches", "latency_p50_ms", "latency_p95_ms",
              "x_realtime_working_last_hour", "x_realtime_working_overall",
              "working_s_last_hour", "working_s_overall", "audio_s_last_hour",
              "model_x_realtime", "padding_efficiency"],
    "memory_releases": ["count", "total_bytes", "last_at", "last_bytes", "last_reason"],
    "workers": ["slot", "device", "backend", "host", "pid", "state", "batches", "lines",
                "audio_s", "x_realtime", "restarts", "failures", "last_error", "gpu_name",
                "gpu_total", "gpu_allocated", "gpu_reserved", "gpu_peak", "releases",
                "released_bytes", "last_release_at"],
    "blocked": None,
}
"""``ttsd status --json``: its sections and their keys, in the order printed."""


def test_json_output_keeps_its_shape(paths: PathsConfig, store: Store, tmp_path: Path) -> None:
    """What scripts read from ``ttsd status --json``: every section and key, in order,
    with the numbers as numbers."""
    ids = line_ids(store, add_file(store, tmp_path, "a.txt", 3))
    store.worker_set(0, device="cuda:0", state="ready")
    store.complete([(ids[0], "a/1.wav", 2.5, False)], [], [],
                   batch(1, 40.0, 2.5), {"cache_misses": 1})
    store.record_release(2**20, "idle", "cuda:0", worker=0)
    store.heartbeat(os.getpid(), time.time(), "stopped", INFO)
    (tmp_path / "config.toml").write_text(f'[paths]\nstate = "{paths.state}"\n',
                                          encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "ttsd.cli", "--config",
                          str(tmp_path / "config.toml"), "status", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout)
    assert list(got) == list(JSON_SHAPE)
    for section, keys in JSON_SHAPE.items():
        if section == "workers":
            assert [list(w) for w in got[section]] == [keys]
        elif keys is not None:
            assert list(got[section]) == keys, section
    assert got["lines"] == {"done": 1, "failed": 0, "pending": 2, "running": 0, "cached": 0}
    assert got["audio"] == {"seconds": 2.5, "hours": 2.5 / 3600}
    assert got["memory_releases"]["count"] == 1 and got["workers"][0]["releases"] == 1
    assert got["daemon"]["state"] == "down" and got["daemon"]["reason"] == "stopped cleanly"
    assert got["blocked"] == [] and got["store"]["exists"] is True
    assert out.stdout == json.dumps(collect(paths, now=got["now"]).to_json(), indent=2) + "\n"


def test_done_totals_are_counters_kept_with_the_rows(paths: PathsConfig, store: Store,
                                                     tmp_path: Path) -> None:
    """The done lines' audio and cached count come from counters that every
    transaction marking lines done keeps (a sum over every done row grew with the
    store's history: 0.47 s a million lines). A store from before them is migrated by
    the first writer to open it, and status reads it by the sums until then."""
    def sums() -> tuple[float, int]:
        return tuple(store.conn.execute("SELECT SUM(seconds), SUM(cached) FROM lines "
                                        "WHERE state = 'done'").fetchone())

    a = add_file(store, tmp_path, "a.txt", 5)
    ids = line_ids(store, a)
    store.complete([(ids[0], "a/1.wav", 1.25, False), (ids[1], "a/2.wav", 2.5, True)],
                   [(ids[2], "bad")], [], None, {})
    b = store.add_file("b.txt", tmp_path / "work" / "b.txt", 1, "0" * 64, tmp_path / "b")
    store.add_lines(b, [NewLine(1, "hit", out_name="0001", cache_key="k", wav="/b/0001.wav",
                                seconds=0.75, cached=True),
                        NewLine(2, "kept", out_name="0002", wav="/b/0002.wav", seconds=0.5),
                        NewLine(3, "new", out_name="0003")])
    # Parsed again after a crash: the lines already there are not counted twice.
    store.add_lines(b, [NewLine(1, "hit", out_name="0001", cache_key="k", wav="/b/0001.wav",
                                seconds=0.75, cached=True)])
    assert sums() == (5.0, 2)
    counters = store.counters()
    assert counters["done_audio_us"] == 5_000_000 and counters["done_cached"] == 2
    report = collect(paths)
    assert report.audio.seconds == 5.0 and report.lines.cached == 2

    # A store from before the counters: status sums the rows; a writer migrates it.
    with store.tx() as c:
        c.execute("DELETE FROM counters WHERE name IN ('done_audio_us', 'done_cached')")
        c.execute("DELETE FROM _migrations WHERE name = 'm004_done_totals'")
    report = collect(paths)
    assert report.audio.seconds == 5.0 and report.lines.cached == 2
    again = Store(paths.db)
    assert again.counters()["done_audio_us"] == 5_000_000
    assert again.counters()["done_cached"] == 2
    again.close()
    store.complete([(ids[3], "a/4.wav", 10.0, True)], [], [], None, {})
    assert sums() == (15.0, 3)
    report = collect(paths)
    assert report.audio.seconds == 15.0 and report.lines.cached == 3
    with store.tx() as c:   # status reads the counter, not the rows
        c.execute("UPDATE counters SET value = value + 1000000 WHERE name = 'done_audio_us'")
    assert collect(paths).audio.seconds == 16.0


def test_progress_of_a_run_counts_its_files_lines_and_the_audio_made_since(
        store: Store, tmp_path: Path) -> None:
    """What ``run --once``'s bar shows: the lines of the files claimed since the start,
    those done or failed, and the audio made since the start (the done counters then
    and now, not a sum over the rows)."""
    old = line_ids(store, add_file(store, tmp_path, "old.txt", 2))
    store.complete([(old[0], "o/1.wav", 4.0, False)], [], [], None, {})
    start, since = store.done_totals(), time.time()
    new = line_ids(store, add_file(store, tmp_path, "new.txt", 4))
    store.complete([(new[0], "n/1.wav", 1.5, False), (old[1], "o/2.wav", 2.0, True)],
                   [(new[1], "bad")], [], None, {})
    got = store.progress(since, start)
    assert (got.lines, got.finished) == (4, 2)
    assert got.audio_s == pytest.approx(3.5)   # every line done since the start


def test_x_realtime_while_working_leaves_out_idle_gaps(paths: PathsConfig,
                                                       store: Store) -> None:
    """Working x-realtime: audio seconds ÷ the seconds the batches ran (each batch from
    at − (model_ms + write_ms) to at); an idle gap between two batches is not counted."""
    timed_batches(store, [(1000.0, 1500.0, 500.0, 25.0),     # works 998 … 1000
                          (8200.0, 3000.0, 1000.0, 50.0)])   # 2 h idle, then 8196 … 8200
    sp = collect(paths, now=8200.0 + 60).speed
    assert sp.working_s_overall == pytest.approx(6.0)
    assert sp.x_realtime_working_overall == pytest.approx(75 / 6)   # not 75 / 7202
    assert sp.working_s_last_hour == pytest.approx(4.0)
    assert sp.x_realtime_working_last_hour == pytest.approx(50 / 4)
    assert sp.audio_s_last_hour == pytest.approx(50.0)
    assert sp.model_x_realtime == pytest.approx(75 / 4.5)
    text = render(collect(paths, now=8200.0 + 60))
    assert "12.5× realtime while working (last hour) · 12.5× overall · 16.7× model only" \
        in text
    assert "50s of audio in the last hour" in text

    # both batches in the last hour: still the time worked, not the span
    sp = collect(paths, now=1000.0 + 3000).speed
    assert sp.x_realtime_working_last_hour == pytest.approx(75 / 6)

    # nothing committed in the last hour: no recent speed, none of its audio
    report = collect(paths, now=8200.0 + 7200)
    sp = report.speed
    assert sp.x_realtime_working_last_hour is None and sp.working_s_last_hour == 0
    assert sp.audio_s_last_hour == 0
    assert sp.x_realtime_working_overall == pytest.approx(75 / 6)
    assert "- realtime while working (last hour)" in render(report)


def test_working_time_counts_overlapping_batches_once(paths: PathsConfig,
                                                      store: Store) -> None:
    """Batches of several devices overlap: the working time is the length of the union
    of their intervals, whatever the order the batches were committed in."""
    timed_batches(store, [(115.0, 9000.0, 1000.0, 100.0),   # 105 … 115
                          (110.0, 9500.0, 500.0, 100.0),    # 100 … 110
                          (125.0, 4000.0, 1000.0, 50.0),    # 120 … 125
                          (123.0, 1500.0, 500.0, 20.0),     # 121 … 123, inside the one above
                          (125.0, 5000.0, 0.0, 30.0),       # 120 … 125 again
                          (130.0, 0.0, 0.0, 0.0)])          # an instant: no time
    sp = collect(paths, now=200.0).speed
    assert sp.working_s_overall == pytest.approx(15 + 5)
    assert sp.x_realtime_working_overall == pytest.approx(300 / 20)
    assert sp.x_realtime_working_last_hour == pytest.approx(300 / 20)
    # the window holds the batches committed in it, each with its whole interval
    sp = collect(paths, now=122.0 + 3600).speed
    assert sp.working_s_last_hour == pytest.approx(5.0)   # 120 … 125, twice and inside
    assert sp.audio_s_last_hour == pytest.approx(100.0)
    assert sp.x_realtime_working_last_hour == pytest.approx(100 / 5)


def test_working_time_of_many_batches_matches_a_plain_union(paths: PathsConfig,
                                                            store: Store) -> None:
    """The union computed by the store query equals one computed here by sorting."""
    store.conn.execute("PRAGMA synchronous = OFF")  # test speed only: 300 commits
    rows = [(1000.0 + (i * 7919) % 600 + (i % 3) * 0.5, float((i * 104729) % 9000),
             float(i % 5) * 100, 1.0) for i in range(300)]
    timed_batches(store, rows)
    spans = sorted((at - (m + w) / 1000, at) for at, m, w, _a in rows)
    total, cover = 0.0, -math.inf
    for lo, hi in spans:
        total += max(0.0, hi - max(lo, cover))
        cover = max(cover, hi)
    sp = collect(paths, now=2000.0).speed
    assert sp.working_s_overall == pytest.approx(total)
    assert sp.x_realtime_working_overall == pytest.approx(300 / total)


def test_cache_counts_lines_not_synthesis_attempts(paths: PathsConfig, store: Store,
                                                    tmp_path: Path) -> None:
    """Hits and misses are lines: done from the cache vs done by synthesis. Batches whose
    writes failed and were synthesized again bump the cache_misses counter each time;
    they add no miss."""
    a = add_file(store, tmp_path, "a.txt", 5)
    ids = line_ids(store, a)
    for _ in range(30):   # requeued: no line done, the counter bumped anyway
        store.complete([], [], [], batch(5, 40.0, 10.0), {"cache_misses": 5})
    store.complete([(i, f"a/{i}.wav", 2.0, False) for i in ids], [], [],
                   batch(5, 40.0, 10.0), {"cache_misses": 8})
    assert store.counters()["cache_misses"] == 158
    report = collect(paths)
    assert report.cache.hits == 0 and report.cache.misses == 5
    assert report.cache.hit_rate == 0
    assert "hit rate 0.0% (0 lines from the cache, 5 synthesized)" in render(report)

    b = store.add_file("b.txt", tmp_path / "work" / "b.txt", 1, "0" * 64, tmp_path / "b")
    store.add_lines(b, [NewLine(n, "hit", out_name=f"{n:04d}", cache_key="k",
                                wav=f"/b/{n:04d}.wav", seconds=2.0, cached=True)
                        for n in (1, 2)])
    report = collect(paths)
    assert report.cache.hits == 2 and report.cache.misses == 5
    assert report.cache.hit_rate == pytest.approx(2 / 7)
    assert "hit rate 28.6% (2 lines from the cache, 5 synthesized)" in render(report)


def test_cpu_daemon_shows_no_gpu_memory_and_no_release_row(paths: PathsConfig,
                                                           store: Store) -> None:
    """On the CPU the device row is the device and dtype; no GPU memory, and the
    releases a CPU records (they free nothing) make no memory row."""
    store.record_release(0, "idle", "cpu")
    store.record_release(0, "timer", "cpu")
    for info in (CPU_INFO, CPU_INFO_AS_WRITTEN):
        store.heartbeat(os.getpid(), time.time(), "running", info)
        report = collect(paths)
        assert report.daemon.state == "up" and report.device.device == "cpu"
        assert report.memory_releases.count == 0
        json.dumps(report.to_json())
        shown = [line for line in render(report).splitlines() if not line.startswith("store")]
        assert next(line for line in shown if line.startswith("device")).startswith(
            "device    cpu float32")
        assert not any("GPU" in line or "release" in line for line in shown)
        assert not any(line.startswith("memory") for line in shown)


def test_cuda_daemon_shows_gpu_memory_and_its_releases(paths: PathsConfig,
                                                       store: Store) -> None:
    """On a GPU the device row has its memory, and the memory row its releases (a CPU
    release recorded beside them is not one of them)."""
    store.record_release(2**30, "idle", "cuda:0")
    store.record_release(0, "timer", "cpu")
    store.heartbeat(os.getpid(), time.time(), "running", INFO)
    report = collect(paths)
    rel = report.memory_releases
    assert (rel.count, rel.total_bytes, rel.last_bytes, rel.last_reason) == \
        (1, 2**30, 2**30, "idle")
    text = render(report)
    assert "cuda:0 float16 · NVIDIA H100 · GPU memory 3.0 GiB allocated, 4.0 GiB reserved, " \
           "12.0 GiB peak" in text
    memory = [line for line in text.splitlines() if line.startswith("memory")]
    assert len(memory) == 1 and "(1.0 GiB, idle)" in memory[0]
    assert "1 release, 1.0 GiB in all" in memory[0]


def test_worker_releases_count_gpu_releases_only(paths: PathsConfig, store: Store) -> None:
    """A worker on the CPU shows no memory releases; one on a GPU shows its own."""
    store.worker_set(0, device="cpu", state="ready")
    store.worker_set(1, device="cuda:1", state="ready", gpu_allocated=2**30,
                     gpu_reserved=2**31, gpu_peak=2**31)
    store.record_release(0, "idle", "cpu", worker=0)
    store.record_release(512 * 2**20, "idle", "cuda:1", worker=1)
    store.heartbeat(os.getpid(), time.time(), "running", {**CPU_INFO, "device": "workers"})
    workers = collect(paths).workers
    assert [(w.slot, w.releases, w.released_bytes) for w in workers] == \
        [(0, 0, 0), (1, 1, 512 * 2**20)]
    rows = [line for line in render(collect(paths)).splitlines() if "#" in line]
    assert "release" not in rows[0] and "1 release (512.0 MiB)" in rows[1]


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 50) == 7 and percentile([7.0], 95) == 7
    values = [float(v) for v in range(100, 0, -1)]  # 1 … 100, unsorted
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 0) == 1 and percentile(values, 100) == 100
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_latency_uses_the_last_1000_batches(paths: PathsConfig, store: Store) -> None:
    store.conn.execute("PRAGMA synchronous = OFF")  # test speed only: 1,200 commits
    stats = [batch(1, 10_000.0, 1.0)] * 200 + [batch(1, float(ms), 1.0) for ms in range(1, 1001)]
    for s in stats:
        store.complete([], [], [], s, {})
    sp = collect(paths).speed
    assert sp.latency_batches == 1000
    assert sp.latency_p50_ms == pytest.approx(500.5)
    assert sp.latency_p95_ms == pytest.approx(950.05)


# ---------------------------------------------------------------------- fast, never blocked

@pytest.mark.usefixtures("frozen_heap")
def test_status_is_fast_with_100k_lines(paths: PathsConfig, store: Store,
                                        tmp_path: Path) -> None:
    """100k lines (half done), 2k batches, 10k cache entries: well under a second,
    including the CPU sample of a live daemon."""
    store.conn.execute("PRAGMA synchronous = OFF")  # test speed only: 2,000 commits
    file_id = add_file(store, tmp_path, "big.txt", 100_000)
    ids = line_ids(store, file_id)
    rows = [{"key": f"k{i}", "path": f"/c/{i}.wav", "bytes": 1000, "seconds": 1.0,
             "voice": "v"} for i in range(10_000)]
    store.complete([(i, f"{i}.wav", 1.5, i % 7 == 0) for i in ids[:50_000]],
                   [(i, "bad") for i in ids[50_000:51_000]], rows, None, {"cache_hits": 5})
    for i in range(2000):
        store.complete([], [], [], batch(32, 50.0 + i % 40, 100.0), {})
    store.heartbeat(os.getpid(), time.time(), "running", INFO)

    start = time.perf_counter()
    report = collect(paths)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"status took {elapsed:.2f} s"
    assert report.lines.done == 50_000 and report.lines.pending == 49_000
    assert report.cache.entries == 10_000 and report.speed.batches == 2000
    assert report.daemon.state == "up"


@pytest.mark.usefixtures("frozen_heap")
def test_status_answers_while_another_connection_holds_the_write_lock(
        paths: PathsConfig, store: Store, tmp_path: Path) -> None:
    """A reader in WAL mode is not blocked by a writer holding the lock 2 s."""
    add_file(store, tmp_path, "a.txt", 100)
    locked, release = threading.Event(), threading.Event()

    def writer() -> None:
        daemon = Store(paths.db)
        with daemon.tx() as c:
            c.execute("UPDATE lines SET state = 'running'")
            locked.set()
            release.wait(2.0)
        daemon.close()

    t = threading.Thread(target=writer)
    t.start()
    assert locked.wait(5)
    start = time.perf_counter()
    report = collect(paths)
    elapsed = time.perf_counter() - start
    release.set()
    t.join()
    assert elapsed < 1.0
    assert report.lines.pending == 100  # the committed snapshot, not the open write


@pytest.mark.usefixtures("frozen_heap")
def test_status_in_a_loop_during_100k_inserts(paths: PathsConfig, store: Store,
                                              tmp_path: Path) -> None:
    """Status polled while the daemon inserts 100k lines in chunks; every
    answer is quick, and the writer never sees "database is locked"."""
    errors: list[BaseException] = []
    finished = threading.Event()

    def daemon() -> None:
        try:
            writer = Store(paths.db)
            add_file(writer, tmp_path, "big.txt", 100_000, chunk=5000)
            writer.close()
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)
        finally:
            finished.set()

    t = threading.Thread(target=daemon)
    t.start()
    worst, polls, seen = 0.0, 0, []
    while not finished.is_set() or polls == 0:
        start = time.perf_counter()
        report = collect(paths)
        worst = max(worst, time.perf_counter() - start)
        seen.append(report.lines.pending)
        polls += 1
    t.join()
    assert not errors
    assert worst < 1.0, f"slowest status took {worst:.2f} s"
    assert seen == sorted(seen)  # snapshots only grow
    assert collect(paths).lines.pending == 100_000


def test_a_daemon_starting_on_a_full_disk_is_shown_not_an_error(tmp_path: Path) -> None:
    """A daemon that started on a full disk holds the state folder's lock, but its
    journal is an empty file with no tables yet: status says the daemon is starting
    (with what it cannot write, from its note), exit 0 — it said "no such table" and
    exited 2."""
    from ttsd.service import sitelock

    state = tmp_path / "state"
    state.mkdir()
    (state / "ttsd.db").write_bytes(b"")
    fd = sitelock.acquire(state)
    try:
        sitelock.note(fd, {"at": time.time(), "state": "running", "blocked": [
            {"place": "state", "path": str(state / "ttsd.db"), "error": "database or disk "
             "is full", "since": time.time() - 5, "retries": 2, "retry_in_s": 3.0}]})
        (tmp_path / "config.toml").write_text(f'[paths]\nstate = "{state}"\n',
                                              encoding="utf-8")
        out = subprocess.run([sys.executable, "-m", "ttsd.cli", "--config",
                              str(tmp_path / "config.toml"), "status"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert "STARTING" in out.stdout and str(os.getpid()) in out.stdout, out.stdout
        assert "BLOCKED" in out.stdout and "disk is full" in out.stdout, out.stdout
    finally:
        os.close(fd)
