"""``ttsd status``: daemon liveness from the heartbeat and psutil, counts, cache, speed,
and answering fast while the daemon writes (RELIABILITY row 30)."""

from __future__ import annotations

import json
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
from ttsd.status import collect, percentile, render, stale_after, x_realtime
from ttsd.store import NewLine, Store

INFO = {"device": "cuda:0", "dtype": "float16", "gpu_name": "NVIDIA H100",
        "gpu_allocated": 3 * 2**30, "gpu_reserved": 4 * 2**30, "gpu_peak": 12 * 2**30,
        "queue": 7, "status": "queue 7 lines; done 3", "heartbeat_s": 2.0, "version": "0.1.0"}


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


def dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
    pid = int(out.stdout)
    assert not psutil.pid_exists(pid)
    return pid


# ---------------------------------------------------------------------- daemon

def test_no_store_means_never_ran(paths: PathsConfig) -> None:
    report = collect(paths)
    assert report["daemon"]["state"] == "down"
    assert "never ran" in report["daemon"]["reason"]
    assert report["store"] == {"path": str(paths.db), "exists": False}
    assert report["queue_depth"] == 0 and report["cache"]["entries"] == 0
    assert not paths.state.exists()  # status creates nothing
    json.dumps(report)
    text = render(report)
    assert "DOWN" in text and "never ran" in text and "no batches yet" in text


def test_live_pid_with_fresh_heartbeat_is_up(paths: PathsConfig, store: Store) -> None:
    started = psutil.Process().create_time() + 0.5  # as the daemon records it
    store.heartbeat(os.getpid(), started, "running", INFO)
    report = collect(paths)
    d, dev = report["daemon"], report["device"]
    assert d["state"] == "up" and d["reason"] is None and d["pid"] == os.getpid()
    assert d["uptime_s"] == pytest.approx(report["now"] - started)
    assert 0 <= d["heartbeat_age_s"] < 5
    assert d["rss_bytes"] == pytest.approx(psutil.Process().memory_info().rss, rel=0.5)
    assert d["cpu_percent"] is not None and d["cpu_percent"] >= 0
    assert d["version"] == "0.1.0" and d["status"] == INFO["status"]
    assert dev == {k: INFO[k] for k in ("device", "dtype", "gpu_name", "gpu_allocated",
                                        "gpu_reserved", "gpu_peak")}
    json.dumps(report)
    text = render(report)
    assert text.startswith("daemon    up · pid ")
    assert "cuda:0 float16 · NVIDIA H100 · GPU memory 3.0 GiB allocated, 4.0 GiB reserved, " \
           "12.0 GiB peak" in text
    assert "queue 7 lines; done 3" in text


def test_dead_pid_is_down(paths: PathsConfig, store: Store) -> None:
    store.heartbeat(dead_pid(), time.time() - 5, "running", INFO)
    report = collect(paths)
    d = report["daemon"]
    assert d["state"] == "down" and "not running" in d["reason"]
    assert d["uptime_s"] is None and d["rss_bytes"] is None and d["cpu_percent"] is None
    assert report["device"]["device"] == "cuda:0"  # the last known facts stay visible
    assert "DOWN" in render(report)


def test_stale_heartbeat_from_a_live_pid(paths: PathsConfig, store: Store) -> None:
    store.heartbeat(os.getpid(), time.time(), "running", INFO)
    later = time.time() + 60
    report = collect(paths, now=later)
    assert report["daemon"]["state"] == "stale"
    assert "hung" in report["daemon"]["reason"]
    assert "STALE" in render(report)
    # a daemon that beats every 30 s is still up after 60 s (limit 5 × 30 s)
    store.heartbeat(os.getpid(), time.time(), "running", {**INFO, "heartbeat_s": 30})
    assert collect(paths, now=later)["daemon"]["state"] == "up"


def test_stale_limit() -> None:
    assert stale_after(None) == 10 and stale_after(1) == 10 and stale_after(4) == 20
    assert stale_after(float("nan")) == 10 and stale_after(-3) == 10


def test_clean_stop_is_down(paths: PathsConfig, store: Store) -> None:
    store.heartbeat(os.getpid(), time.time(), "stopped", INFO)
    d = collect(paths)["daemon"]
    assert d["state"] == "down" and d["reason"] == "stopped cleanly"


def test_reused_pid_is_down(paths: PathsConfig, store: Store) -> None:
    """The pid is alive but that process started after the daemon recorded its start:
    the daemon died and the pid went to someone else."""
    born = psutil.Process().create_time()
    store.heartbeat(os.getpid(), born - 3600, "running", INFO)
    assert collect(paths)["daemon"]["state"] == "down"


def test_garbage_heartbeat_info_is_tolerated(paths: PathsConfig, store: Store) -> None:
    store.heartbeat(os.getpid(), time.time(), "running", {})
    store.conn.execute("UPDATE heartbeat SET info = 'not json'")
    report = collect(paths)
    assert report["daemon"]["state"] == "up" and report["device"]["device"] is None
    store.conn.execute("UPDATE heartbeat SET info = ?",
                       (json.dumps({"gpu_peak": "lots", "heartbeat_s": "x", "device": 3}),))
    report = collect(paths)
    assert report["device"]["gpu_peak"] is None and report["device"]["device"] == "3"
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
    assert report["lines"] == {"done": 6, "failed": 1, "pending": 2, "running": 1, "cached": 1}
    assert report["queue_depth"] == 3
    assert report["files"] == {"done": 1, "failed": 1, "in_progress": 3}
    assert report["audio"]["seconds"] == 4 * 3600 + 5
    assert report["audio"]["hours"] == pytest.approx(4 + 5 / 3600)
    assert report["cache"] == {"entries": 1, "bytes": 4096, "hits": 1, "misses": 7,
                               "hit_rate": 1 / 8}
    sp = report["speed"]
    assert sp["batches"] == 2 and sp["ms_per_line"] == pytest.approx(200 / 6)
    assert sp["latency_batches"] == 2
    assert sp["latency_p50_ms"] == pytest.approx(100) and sp["latency_p95_ms"] == 154
    assert sp["model_x_realtime"] == pytest.approx((4 * 3600 + 5) / 0.2)
    assert sp["padding_efficiency"] == pytest.approx(0.8)
    assert sp["x_realtime_last_hour"] == sp["x_realtime_overall"] > 0
    assert report["device"]["device"] == "cpu"  # no heartbeat: the last batch's device
    rel = report["memory_releases"]
    assert (rel["count"], rel["total_bytes"], rel["last_bytes"], rel["last_reason"]) == \
        (2, 1536 * 2**20, 512 * 2**20, "timer")
    json.dumps(report)
    text = render(report)
    for part in ("3 lines (2 pending, 1 running)", "1 done · 1 failed · 3 in progress",
                 "6 done (1 from the cache) · 1 failed", "4.00 h", "hit rate 12.5%",
                 "4.0 KiB", "batch p50 100 ms, p95 154 ms (last 2 batches)",
                 "last release", "512.0 MiB, timer", "2 releases"):
        assert part in text, part


def test_done_totals_are_counters_kept_with_the_rows(paths: PathsConfig, store: Store,
                                                     tmp_path: Path) -> None:
    """The done lines' audio and cache-linked count come from counters that every
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
    assert report["audio"]["seconds"] == 5.0 and report["lines"]["cached"] == 2

    # A store from before the counters: status sums the rows; a writer migrates it.
    with store.tx() as c:
        c.execute("DELETE FROM counters WHERE name IN ('done_audio_us', 'done_cached')")
        c.execute("DELETE FROM _migrations WHERE name = 'm004_done_totals'")
    report = collect(paths)
    assert report["audio"]["seconds"] == 5.0 and report["lines"]["cached"] == 2
    again = Store(paths.db)
    assert again.counters()["done_audio_us"] == 5_000_000
    assert again.counters()["done_cached"] == 2
    again.close()
    store.complete([(ids[3], "a/4.wav", 10.0, True)], [], [], None, {})
    assert sums() == (15.0, 3)
    report = collect(paths)
    assert report["audio"]["seconds"] == 15.0 and report["lines"]["cached"] == 3
    with store.tx() as c:   # status reads the counter, not the rows
        c.execute("UPDATE counters SET value = value + 1000000 WHERE name = 'done_audio_us'")
    assert collect(paths)["audio"]["seconds"] == 16.0


def test_x_realtime_definition(paths: PathsConfig, store: Store) -> None:
    """Audio seconds ÷ wall seconds from the first batch's start (at − model_ms) to the
    last batch's end (at)."""
    for _ in range(3):
        store.complete([], [], [], batch(1, 2000.0, 10.0), {})
    store.conn.execute("UPDATE batches SET at = 1000 + 10 * (id - 1)")  # 1000, 1010, 1020
    assert x_realtime(store, since=None) == pytest.approx(30 / 22)
    assert x_realtime(store, since=1005) == pytest.approx(20 / 12)  # 1010 − 2 s … 1020
    assert x_realtime(store, since=1020) == pytest.approx(10 / 2)  # one batch: model speed
    assert x_realtime(store, since=2000) is None
    report = collect(paths, now=1020 + 1800)
    assert report["speed"]["x_realtime_overall"] == pytest.approx(30 / 22)
    assert report["speed"]["x_realtime_last_hour"] == pytest.approx(30 / 22)
    report = collect(paths, now=1005 + 3600)
    assert report["speed"]["x_realtime_last_hour"] == pytest.approx(20 / 12)
    assert collect(paths, now=9999)["speed"]["x_realtime_last_hour"] is None


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
    sp = collect(paths)["speed"]
    assert sp["latency_batches"] == 1000
    assert sp["latency_p50_ms"] == pytest.approx(500.5)
    assert sp["latency_p95_ms"] == pytest.approx(950.05)


# ---------------------------------------------------------------------- row 30: fast, never blocked

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
    assert report["lines"]["done"] == 50_000 and report["lines"]["pending"] == 49_000
    assert report["cache"]["entries"] == 10_000 and report["speed"]["batches"] == 2000
    assert report["daemon"]["state"] == "up"


@pytest.mark.usefixtures("frozen_heap")
def test_status_answers_while_another_connection_holds_the_write_lock(
        paths: PathsConfig, store: Store, tmp_path: Path) -> None:
    """Row 30: a reader in WAL mode is not blocked by a writer holding the lock 2 s."""
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
    assert report["lines"]["pending"] == 100  # the committed snapshot, not the open write


@pytest.mark.usefixtures("frozen_heap")
def test_status_in_a_loop_during_100k_inserts(paths: PathsConfig, store: Store,
                                              tmp_path: Path) -> None:
    """Row 30: status polled while the daemon inserts 100k lines in chunks; every
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
        seen.append(report["lines"]["pending"])
        polls += 1
    t.join()
    assert not errors
    assert worst < 1.0, f"slowest status took {worst:.2f} s"
    assert seen == sorted(seen)  # snapshots only grow
    assert collect(paths)["lines"]["pending"] == 100_000
