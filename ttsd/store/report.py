"""Reads that report on the journal as a whole: counts and totals for ``ttsd status``,
the daemon's own facts (heartbeat, batches, memory releases, worker slots), ``run
--once``'s summary and progress, and the figures a bench takes of a run.

Each is a short query a covering index answers where it can: ``ttsd status`` runs them
all in one read snapshot (``StoreBase.snapshot``) while the daemon writes.
"""

from __future__ import annotations

import json
from typing import Any

from ttsd.store.base import StoreBase
from ttsd.store.errors import OperationalError
from ttsd.store.migrations import DONE_AUDIO_US, DONE_CACHED
from ttsd.store.records import (
    BatchDevice,
    BatchMark,
    BatchTotals,
    DoneTotals,
    FileSpan,
    FileStates,
    GpuReleases,
    Heartbeat,
    LineStates,
    RunProgress,
    Throughput,
    WorkerRow,
)

GPU_DEVICE_PREFIX = "cuda"
"""A device whose name starts with this (``cuda``, ``cuda:1``; ROCm too) is a GPU; only
there do GPU memory and memory releases mean something."""
_GPU_RELEASE = f"device LIKE '{GPU_DEVICE_PREFIX}%'"
"""SQL: a releases row recorded on a GPU (a CPU's release frees nothing)."""

_BATCH_START = "at - MAX(0, COALESCE(model_ms, 0) + COALESCE(write_ms, 0)) / 1000.0"
_THROUGHPUT_SQL = f"""
    SELECT COUNT(*), TOTAL(audio_s), TOTAL(MAX(0, MIN(at, COALESCE(later, at)) - start))
    FROM (SELECT at, audio_s, start, MIN(start) OVER (ORDER BY at DESC
                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS later
          FROM (SELECT at, audio_s, {_BATCH_START} AS start FROM batches {{where}}))"""
_WORKER_COLUMNS = ("slot, device, backend, host, pid, state, batches, lines, audio_s, "
                   "model_ms, restarts, failures, last_error, gpu_name, gpu_total, "
                   "gpu_allocated, gpu_reserved, gpu_peak")


class Reports(StoreBase):
    """Counts, totals and facts over the whole journal."""

    # ------------------------------------------------------------------ counts

    def line_states(self) -> LineStates:
        """Lines by state (the lines_state index: a covering scan, no table rows read)."""
        got = {s: n for s, n in self.conn.execute(
            "SELECT state, COUNT(*) FROM lines GROUP BY state") if s in LineStates.__annotations__}
        return LineStates(**got)

    def file_states(self) -> FileStates:
        got = {s: n for s, n in self.conn.execute(
            "SELECT state, COUNT(*) FROM files GROUP BY state") if s in FileStates.__annotations__}
        return FileStates(**got)

    def done_totals(self) -> DoneTotals:
        """The done lines' audio and cached count, from the counters (two rows). A
        journal no writer of this version has opened yet lacks them (m004): the sums
        over the done rows then."""
        totals = dict(self.conn.execute("SELECT name, value FROM counters WHERE name IN (?, ?)",
                                        (DONE_AUDIO_US, DONE_CACHED)))
        if len(totals) == 2:
            return DoneTotals(totals[DONE_AUDIO_US] / 1_000_000, int(totals[DONE_CACHED]))
        seconds, cached = self.conn.execute(
            "SELECT COALESCE(SUM(seconds), 0), COALESCE(SUM(cached), 0) FROM lines "
            "WHERE state = 'done'").fetchone()
        return DoneTotals(float(seconds), int(cached))

    def counters(self) -> dict[str, int]:
        """Every named counter (cache_hits, cache_misses, the done totals, ...)."""
        return dict(self.conn.execute("SELECT name, value FROM counters"))

    # ------------------------------------------------------------------ daemon facts

    def last_heartbeat(self) -> Heartbeat | None:
        row = self.conn.execute(
            "SELECT pid, started_at, at, state, info FROM heartbeat WHERE id = 1").fetchone()
        if row is None:
            return None
        pid, started_at, at, state, raw = row
        try:
            info = json.loads(raw) if raw else {}
        except (TypeError, ValueError):
            info = {}
        return Heartbeat(pid, started_at, at, state, info if isinstance(info, dict) else {})

    def batch_totals(self) -> BatchTotals:
        return BatchTotals(*self.conn.execute(
            "SELECT COUNT(*), SUM(size), SUM(model_ms), SUM(prepare_ms), SUM(write_ms), "
            "SUM(audio_s), SUM(used_frames), SUM(padded_frames) FROM batches").fetchone())

    def recent_model_ms(self, limit: int) -> list[float]:
        """The model time of the last ``limit`` batches that have one, latest first."""
        return [ms for (ms,) in self.conn.execute(
            "SELECT model_ms FROM batches WHERE model_ms IS NOT NULL ORDER BY id DESC LIMIT ?",
            (limit,))]

    def throughput(self, since: float | None) -> Throughput:
        """Audio and working time of the batches committed at or after ``since`` (all
        batches when None).

        A batch's ``at`` is when it was committed, its end; it worked over
        [at − (model_ms + write_ms) / 1000, at]. The working time is the length of the
        union of those intervals: idle time between batches is not counted, and batches
        that overlap (several devices) count once. A batch committed in the window counts
        whole, even when it started before ``since``.

        One query, linear in the batches: taken by ``at``, latest first, every batch
        before this one ends no earlier than it does, so their union covers this batch's
        interval from the earliest start among them (``later``, a running MIN) on, and
        this batch adds max(0, min(at, later) − start).
        """
        where, params = ("WHERE at >= ?", (since,)) if since is not None else ("", ())
        n, audio, working = self.conn.execute(_THROUGHPUT_SQL.format(where=where),
                                              params).fetchone()
        return Throughput(batches=n, audio_s=float(audio), working_s=float(working))

    def last_batch_device(self) -> BatchDevice | None:
        row = self.conn.execute(
            "SELECT device, dtype FROM batches ORDER BY id DESC LIMIT 1").fetchone()
        return BatchDevice(*row) if row else None

    def gpu_releases(self) -> GpuReleases:
        """The GPU memory releases: how many, how much, and the last one. Releases
        recorded on the CPU (which free nothing) are left out."""
        count, total = self.conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM releases WHERE {_GPU_RELEASE}"
        ).fetchone()
        row = self.conn.execute(f"SELECT at, bytes, reason FROM releases WHERE {_GPU_RELEASE} "
                                "ORDER BY id DESC LIMIT 1").fetchone()
        return GpuReleases(count, total, *(row or ()))

    def worker_rows(self) -> list[WorkerRow]:
        """Every worker slot with its GPU memory releases (none before m002)."""
        try:
            rows = self.conn.execute(
                f"SELECT {_WORKER_COLUMNS} FROM workers ORDER BY slot").fetchall()
            rel = {r[0]: r[1:] for r in self.conn.execute(
                "SELECT worker, COUNT(*), COALESCE(SUM(bytes), 0), MAX(at) FROM releases "
                f"WHERE worker IS NOT NULL AND {_GPU_RELEASE} GROUP BY worker")}
        except OperationalError:   # a store from before migration m002
            return []
        return [WorkerRow(*r, *rel.get(r[0], ())) for r in rows]

    # ------------------------------------------------------------------ a run

    def run_summary(self, since: float, examples: int = 20) -> dict[str, Any]:
        """What became of the files finished at or after ``since`` (``run --once``'s
        report): files done and failed, their lines done and failed, and the first
        ``examples`` failures as (file, line or None, reason)."""
        files = dict(self.conn.execute(
            "SELECT state, COUNT(*) FROM files WHERE finished_at >= ? "
            "AND state IN ('done', 'failed') GROUP BY state", (since,)).fetchall())
        lines = dict(self.conn.execute(
            "SELECT l.state, COUNT(*) FROM lines l JOIN files f ON f.id = l.file_id "
            "WHERE f.finished_at >= ? AND f.state IN ('done', 'failed') GROUP BY l.state",
            (since,)).fetchall())
        failures = [(name, None, error) for name, error in self.conn.execute(
            "SELECT name, error FROM files WHERE finished_at >= ? AND state = 'failed' "
            "ORDER BY id LIMIT ?", (since, examples))]
        failures += self.conn.execute(
            "SELECT f.name, l.number, l.error FROM lines l JOIN files f ON f.id = l.file_id "
            "WHERE f.finished_at >= ? AND f.state = 'done' AND l.state = 'failed' "
            "ORDER BY f.id, l.number LIMIT ?", (since, examples)).fetchall()
        return {"files_done": files.get("done", 0), "files_failed": files.get("failed", 0),
                "lines_done": lines.get("done", 0), "lines_failed": lines.get("failed", 0),
                "failures": failures[:examples]}

    def progress(self, since: float, start: DoneTotals) -> RunProgress:
        """The lines of the files claimed at or after ``since`` and how many of them are
        done or failed (a covering scan of the lines_file_state index), and the audio
        made since ``start`` (``done_totals()`` read then: two counter rows, however many
        lines are done)."""
        total, finished = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(state IN ('done', 'failed')), 0) FROM lines "
            "WHERE file_id IN (SELECT id FROM files WHERE created_at >= ?)", (since,)).fetchone()
        return RunProgress(int(total), int(finished),
                           max(0.0, self.done_totals().audio_s - start.audio_s))

    def work_paths(self) -> set[str]:
        """The claimed copy of every file row (a copy no row names is an orphan)."""
        return {p for (p,) in self.conn.execute("SELECT work_path FROM files")}

    # ------------------------------------------------------------------ bench

    def file_span(self, name: str) -> FileSpan | None:
        """The first file named ``name``: claim to its last line finished, its lines, and
        how many came from the cache."""
        row = self.conn.execute(
            "SELECT MAX(l.finished_at) - f.created_at, COUNT(*), SUM(l.cached) "
            "FROM lines l JOIN files f ON f.id = l.file_id WHERE f.name = ? GROUP BY f.id",
            (name,)).fetchone()
        return FileSpan(*row) if row else None

    def batch_marks(self, name: str) -> list[BatchMark]:
        """The batches committed between the claim of the file named ``name`` and its
        last line finished, in order."""
        return [BatchMark(*r) for r in self.conn.execute(
            "SELECT ROUND(b.at - f.created_at, 3), b.size, ROUND(b.prepare_ms), "
            "ROUND(b.model_ms), ROUND(b.write_ms) FROM batches b JOIN files f "
            "ON f.name = ? WHERE b.at >= f.created_at AND b.at <= "
            "(SELECT MAX(finished_at) FROM lines WHERE file_id = f.id) ORDER BY b.id",
            (name,))]

    def work_span(self) -> float | None:
        """Seconds from the first file's claim to the last line finished."""
        return self.one("SELECT MAX(l.finished_at) - MIN(f.created_at) FROM lines l "
                        "JOIN files f ON f.id = l.file_id")
