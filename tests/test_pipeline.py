"""Sink: a batch's WAVs are durable (data and folder entry) before its lines are done."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import ttsd.output.fsio as writer
from ttsd.config import CacheConfig, Config, PathsConfig
from ttsd.engine.options import EngineOptions
from ttsd.engine.records import Result
from ttsd.engine.runtime import Engine
from ttsd.pipeline.batcher import Batch, out_path
from ttsd.pipeline.sink import Sink
from ttsd.store.journal import NewLine, Store

SR = 22050


@pytest.fixture()
def site(tmp_path: Path):
    paths = PathsConfig(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox",
                        done=tmp_path / "done", failed=tmp_path / "failed",
                        state=tmp_path / "state")
    cfg = dataclasses.replace(Config(), paths=paths, cache=CacheConfig(enabled=False))
    paths.state.mkdir(parents=True)
    store = Store(paths.db)
    sink = Sink(cfg, Engine(EngineOptions(device="cpu")), threads=4)
    yield cfg, store, sink
    sink.close()
    store.close()


def _batch(store: Store, outbox: Path, books: int, lines: int) -> Batch:
    """``books`` files of ``lines`` lines each, taken as one batch with their audio."""
    for b in range(books):
        fid = store.add_file(f"book{b}.txt", outbox / f"w{b}", 1, f"{b:064x}", outbox / f"book{b}")
        store.add_lines(fid, [NewLine(number=i + 1, text=f"line {i}", out_name=f"{i + 1:04d}",
                                      voice="v") for i in range(lines)])
    rows, dead = store.take(books * lines, 3)
    assert len(rows) == books * lines and not dead
    rng = np.random.default_rng(3)
    batch = Batch(rows, "v", groups=[[r] for r in rows])
    batch.results = [Result(i, (rng.standard_normal(SR // 4) * 0.3).astype(np.float32), SR)
                     for i in range(len(rows))]
    return batch


def _fd_path(fd: int) -> Path:
    """The folder an open descriptor is (the sink syncs folders through them)."""
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def _states(store: Store) -> dict[int, str]:
    return dict(store.conn.execute("SELECT id, state FROM lines").fetchall())


def test_one_folder_fsync_per_batch_before_the_commit(site, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The WAV writers skip their folder fsync; the Sink syncs each folder once, after
    every rename of the batch and before ``store.complete`` records the lines done."""
    cfg, store, sink = site
    batch = _batch(store, cfg.paths.outbox, books=2, lines=6)
    events: list[tuple[str, object]] = []
    real_dir, real_complete, real_rename = writer._fsync_fd, store.complete, writer.rename_noreplace
    monkeypatch.setattr(writer, "_fsync_fd", lambda fd: (events.append(("fsync", _fd_path(fd))),
                                                          real_dir(fd))[1])
    monkeypatch.setattr(writer, "rename_noreplace", lambda s, d, *a: (
        events.append(("rename", d)), real_rename(s, d, *a))[1])

    def complete(done, *args, **kw):
        events.append(("complete", [d[1] for d in done]))
        return real_complete(done, *args, **kw)

    monkeypatch.setattr(store, "complete", complete)
    assert sink.write(store, batch) == {"done": 12, "failed": 0, "requeued": 0}
    kinds = [k for k, _ in events]
    assert kinds.count("rename") == 12 and kinds.count("complete") == 1
    folders = {cfg.paths.outbox / "book0", cfg.paths.outbox / "book1"}
    syncs = [p for k, p in events if k == "fsync"]
    assert sorted(syncs) == sorted(folders)            # once per folder, not per line
    last_rename = max(i for i, k in enumerate(kinds) if k == "rename")
    first_sync = min(i for i, k in enumerate(kinds) if k == "fsync")
    assert last_rename < first_sync and max(i for i, k in enumerate(kinds) if k == "fsync") \
        < kinds.index("complete")
    assert set(_states(store).values()) == {"done"}
    for row in batch.rows:
        data, rate = sf.read(str(out_path(row)), dtype="float32")
        assert rate == SR and len(data) == SR // 4
    assert not [n for f in folders for n in os.listdir(f) if n.endswith(".tmp")]


def test_a_folder_that_cannot_be_synced_keeps_its_lines_pending(
        site, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from one folder's fsync: its lines are not done (back to pending, attempt
    undone); the other folder's lines are done."""
    cfg, store, sink = site
    batch = _batch(store, cfg.paths.outbox, books=2, lines=3)
    bad = cfg.paths.outbox / "book1"
    real_dir = writer._fsync_fd

    def fsync_fd(fd: int) -> None:
        if _fd_path(fd) == bad:
            raise OSError(errno.EIO, "Input/output error")
        real_dir(fd)

    monkeypatch.setattr(writer, "_fsync_fd", fsync_fd)
    assert sink.write(store, batch) == {"done": 3, "failed": 0, "requeued": 3}
    states = _states(store)
    for row in batch.rows:
        assert states[row.id] == ("pending" if Path(row.out_dir) == bad else "done")
    monkeypatch.undo()
    rows, _ = store.take(10, 3)   # the retry adopts the WAVs already there, and syncs them
    assert sorted(r.id for r in rows) == sorted(r.id for r in batch.rows if Path(r.out_dir) == bad)
    retry = Batch(rows, "v")
    retry.existing = rows
    assert sink.write(store, retry)["done"] == 3
    assert set(_states(store).values()) == {"done"}


@pytest.mark.parametrize("cores, threads", [(1, 2), (2, 4), (8, 16), (16, 32), (32, 32),
                                            (128, 32), (None, 2)])
def test_auto_writer_threads(cores: int | None, threads: int,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """batching.writer_threads = 0: two I/O-bound writers per core, at most 32; a set
    value is used as it is."""
    from ttsd.config import BatchingConfig
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert BatchingConfig().writers == threads
    assert BatchingConfig(writer_threads=3).writers == 3
