"""The batching step: pending lines from the journal into batches for the model.

``Feeder.next_batch`` takes pending lines (marking them running, attempts + 1), answers
what it can without the model (a WAV already on disk from an interrupted attempt, a
cache hit that was not one yet when its line was parsed: most hits never get here,
``cache.answer_new_lines`` answers them as their file is parsed), dedupes identical
lines, and phonemizes the rest. The daemon runs the three steps (batcher, runner, sink)
each on its own thread, connected by queues bounded in whole batches, so phonemizing
and writing overlap with the model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ttsd import crash
from ttsd.cache import HitCheck
from ttsd.config import Config
from ttsd.engine.records import Prepared, Request, Result, RunStats
from ttsd.engine.runtime import GPU_BATCH, Engine, Plan
from ttsd.log import get_logger
from ttsd.output.render import LineAudio
from ttsd.store.journal import LineRow, Store, gave_up

log = get_logger(__name__)


@dataclass
class Batch:
    rows: list[LineRow]
    voice: str
    sample_rate: int | None = None
    """The rate of its lines' files (the voice's own, or ``output.sample_rate``), as
    the feeder checked files against it."""
    existing: list[LineRow] = field(default_factory=list)
    hits: list[tuple[LineRow, dict]] = field(default_factory=list)
    groups: list[list[LineRow]] = field(default_factory=list)
    """Lines to synthesize, grouped by cache key; request ``key`` = group index."""
    prepared: list[Prepared] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    """The model's work; with worker processes they phonemize it themselves."""
    plan: Plan | None = None
    """``EngineOptions.overlap_halves``: the text half done by the feeder, waiting for ``Synth``."""
    results: list[Result] = field(default_factory=list)
    stats: RunStats | None = None
    prepare_ms: float = 0.0
    model_ms: float = 0.0
    dead: list[int] = field(default_factory=list)
    device: str = ""
    """Set by a worker pool: the device (and ``worker`` its slot) that ran the batch."""
    dtype: str = ""
    worker: int | None = None
    memory: dict = field(default_factory=dict)
    part_of: Batch | None = None
    """Set on a piece: lines of ``part_of`` whose audio was complete while the rest of
    it was still in the model (``Engine.finish``'s stream); the batch itself comes
    last, with the lines not streamed and the stats of the whole. A piece commits its
    lines and counters but no batches row: if the process dies before its batch is
    committed, those lines are done (and stay done) without a batches row."""
    streamed: set[int] = field(default_factory=set)
    """Group indices sent in pieces (the sink skips them in the batch itself)."""
    tally: dict[str, float] = field(default_factory=dict)
    """The sink's counts of this batch's pieces (done, failed, requeued, hits, audio_s,
    write_ms), folded into the batch's stats and log line."""

    def piece(self, results: list[Result]) -> Batch:
        """The lines of ``results`` (keys: group indices) as a batch of their own; the
        first piece also takes the lines answered without the model."""
        groups = [self.groups[r.key] for r in results]
        self.streamed.update(r.key for r in results)
        answered = self.existing + [row for row, _e in self.hits]   # in its rows too, so
        p = Batch([row for g in groups for row in g] + answered,   # they leave in_flight
                  self.voice, self.sample_rate,
                  existing=self.existing, hits=self.hits, groups=groups,
                  results=[dataclasses.replace(r, key=i) for i, r in enumerate(results)],
                  device=self.device, dtype=self.dtype, worker=self.worker, part_of=self)
        self.existing, self.hits = [], []
        return p


ANSWER_TAKE = 1024
"""The most rows one batch takes while they are answered without the model."""
PEEK = 64
PEEK_TAKE = 256
"""Before a take smaller than this, the next ``PEEK`` pending lines are looked up in the
cache; when most are there, the take starts at ``PEEK_TAKE`` (then grows to
``ANSWER_TAKE``) instead of growing from the model's batch size (1 on the CPU). Measured
on 2,000 hits: a first take of 256 beat 64, 128, 512 and 1,024 (a big first take
delays the first WAV and overlaps the feeder with the sink less); a cap of 1,024 beat
512, 2,048 and 4,096."""


def out_path(row: LineRow, suffix: str = ".wav") -> Path:
    """Where a line's file goes: its output folder, its name, the format's suffix."""
    return Path(row.out_dir) / f"{row.out_name}{suffix}"


def occupied(path: str | os.PathLike, sample_rate: int | None, what: str = "WAV") -> str:
    """The error of a line whose output path holds something that is not its file (a
    user's file, a folder, a link, a file of another format or rate). ttsd never
    overwrites it, and retrying cannot help, so the line fails with this instead of
    going back to pending."""
    rate = f" at {sample_rate} Hz" if sample_rate else ""
    return (f"{os.fspath(path)} already exists and is not a valid {what}{rate}; ttsd does "
            "not overwrite it: move it away and submit the line again")


class Feeder:
    """``prepare=False`` (worker pools): the batch carries requests, and each worker
    phonemizes its own, so host-side text work scales with the workers.
    ``isolate_retries``: a line started before without finishing (its worker died)
    runs alone, so a line that kills workers fails by itself after max_attempts
    without taking its batch neighbours' attempts with it."""

    def __init__(self, cfg: Config, engine: Engine, sample_rates: dict[str, int], *,
                 prepare: bool = True, size: int = 0, gpu: bool | None = None,
                 isolate_retries: bool = False) -> None:
        self.cfg = cfg
        self.engine = engine
        self.sample_rates = sample_rates
        self.audio = LineAudio.of(cfg.output)
        self.prepare = prepare
        self.isolate_retries = isolate_retries
        self.plan = prepare and engine.overlaps
        """Run the text half here (``Engine.plan``), beside the model thread's audio half."""
        self.planning_since: float | None = None
        """monotonic() when the text half in progress started (None: not planning)."""
        gpu = engine.device.type == "cuda" if gpu is None else gpu
        model_batch = cfg.batching.max_batch_size or size or (GPU_BATCH if gpu else 1)
        self.size = cfg.batching.lines(model_batch, gpu)
        """Lines per batch (``batching.lines_per_batch``); the engine runs their
        sentences ``model_batch`` at a time, sorted by length."""
        self.take_size = self.size
        """Rows taken at once: grows while lines are answered without the model (cache
        hits, WAVs already written), so a re-run of known lines costs one lookup, one
        folder fsync and one transaction per up to ``ANSWER_TAKE`` lines."""
        self.unreleased: list[int] = []
        """Lines taken (running) by a ``next_batch`` that failed before it returned them
        (a journal write refused by a full disk): the caller puts them back to pending."""

    def next_batch(self, store: Store, stop, idle: bool = False) -> Batch | None:
        """Up to ``size`` lines of one voice; waits ``max_wait_ms`` for a fuller batch.
        ``idle``: the model has nothing to run, so all of this batch's host work and
        text half is time the GPU waits: take ``batching.idle_batch`` of a batch."""
        answering = self.take_size != self.size
        if self.take_size < PEEK_TAKE and self.cfg.cache.enabled:
            looked, hits = store.cached_ahead(PEEK)
            if looked and hits * 2 >= looked:   # mostly known lines ahead: a bigger take
                self.take_size = PEEK_TAKE
                answering = True
        limit = self.take_size
        if idle and not answering:
            limit = max(1, round(self.size * self.cfg.batching.idle_batch))
        rows, dead = store.take(limit, self.cfg.daemon.max_attempts)
        taken = [r.id for r in rows]
        try:
            return self._shape(store, stop, rows, dead, limit, answering, taken)
        except BaseException:
            self.unreleased.extend(taken)   # running, in no batch: the caller releases them
            raise

    def _shape(self, store: Store, stop, rows: list[LineRow], dead: list[LineRow], limit: int,
               answering: bool, taken: list[int]) -> Batch | None:
        """``next_batch`` after its take: tops the batch up, sorts out what the model
        need not do, and prepares the rest (``taken`` grows with a second take)."""
        # A partial batch waits max_wait_ms for more lines — unless its lines are mostly
        # answered without the model (a bigger take, or cache rows ahead): then waiting
        # fills no model call.
        if rows and len(rows) < limit and self.cfg.batching.max_wait_ms > 0 \
                and not answering \
                and rows[0].attempts == 1 and not stop.is_set():  # a suspect stays alone
            time.sleep(self.cfg.batching.max_wait_ms / 1000)
            more, dead2 = store.take(limit - len(rows), self.cfg.daemon.max_attempts,
                                     fresh_only=True)
            taken.extend(r.id for r in more)
            rows, dead = rows + more, dead + dead2
        for row in dead:
            log.warning("line.failed", file=row.file, line=row.number,
                        error=gave_up(row.attempts))
        if not rows:
            return Batch([], "", dead=dead) if dead else None
        voice = rows[0].voice
        other = [r for r in rows if r.voice != voice]
        if other:  # one voice per batch; the rest go back without losing an attempt
            store.release([r.id for r in other])
            rows = [r for r in rows if r.voice == voice]
        if self.isolate_retries and len(rows) > 1:
            retried = next((r for r in rows if r.attempts > 1), None)
            if retried is not None:
                store.release([r.id for r in rows if r is not retried])
                rows = [retried]
        batch = Batch(rows, voice, dead=dead)
        self._answer_without_model(store, batch)
        if len(batch.groups) > self.size:   # a big take met new lines: keep a model batch
            extra = [r for g in batch.groups[self.size:] for r in g]
            batch.groups = batch.groups[:self.size]
            keep = {r.id for r in extra}
            batch.rows = [r for r in batch.rows if r.id not in keep]
            store.release(sorted(keep))
        answered = len(batch.existing) + len(batch.hits)
        self.take_size = (min(ANSWER_TAKE, self.take_size * 4) if answered >= len(rows) // 2
                          else self.size)
        t0 = time.perf_counter()
        requests = [Request(i, r.said or r.text, r.voice, r.speaker_id, r.length_scale,
                            r.noise_scale, r.noise_w, r.seed, r.markup, r.pause_after or 0.0)
                    for i, r in enumerate(g[0] for g in batch.groups)]
        batch.requests = requests
        if self.prepare:
            batch.prepared = self.engine.prepare(requests)
        batch.prepare_ms = (time.perf_counter() - t0) * 1000
        crash.point("mid_batch")
        if self.plan and batch.prepared:
            self.planning_since = time.monotonic()
            try:
                batch.plan = self.engine.plan(batch.prepared)
            finally:
                self.planning_since = None
        return batch

    def _answer_without_model(self, store: Store, batch: Batch) -> None:
        """Sorts the batch's rows: a WAV already in the outbox, a cache hit, or work for
        the model. Only a line taken before (attempts > 1: the process died or stopped
        while it was in flight) can have a WAV of its own in the outbox; a first take
        (attempts == 1) cannot, so its outbox path is not looked at (``Sink.write``
        still refuses to overwrite, and adopts a valid WAV it finds there)."""
        sr = self.sample_rates.get(batch.voice)
        sr = batch.sample_rate = sr and self.audio.rate(sr)
        suffix = self.audio.suffix
        by_key: dict[str, list[LineRow]] = {}
        use_cache = self.cfg.cache.enabled
        cached = store.cache_get_many([r.cache_key for r in batch.rows if r.cache_key]) \
            if use_cache else {}
        check = HitCheck(self.audio)
        for row in batch.rows:
            if row.attempts > 1 and self.audio.file_ok(out_path(row, suffix), sample_rate=sr):
                batch.existing.append(row)   # written before a crash, never committed
                continue
            key = row.cache_key
            if use_cache and key:
                entry = cached.get(key)
                if entry is not None and check.ok(entry, sr):
                    batch.hits.append((row, entry))
                    continue
            by_key.setdefault(key or f"line-{row.id}", []).append(row)
        check.save(store)
        batch.groups = list(by_key.values())


