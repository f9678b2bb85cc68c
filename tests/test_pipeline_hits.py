"""The lines stage without a model: how the feeder sorts a take (a WAV of an earlier
attempt, a cache hit, work for the model) and how the sink commits cache hits
(docs/reliability.md: kill-9 and damaged-cache-file). A stub engine stands in: all-hit
batches never reach it."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ttsd import cache
from ttsd.output import formats
from ttsd.cache import cache_path
from ttsd.config import CacheConfig, Config, PathsConfig
from ttsd.output.wav import write_wav
from ttsd.pipeline.batcher import Feeder, out_path
from ttsd.pipeline.sink import Sink
from ttsd.store.journal import NewLine, Store

SR = 22050
VOICE = "v"


def _engine() -> SimpleNamespace:
    return SimpleNamespace(device=SimpleNamespace(type="cpu"), dtype="float32",
                           prepare=lambda requests: [], plan=None, overlaps=False)


def _tone(seconds: float, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _site(tmp_path: Path, texts: list[str], *, cached: list[str]) -> tuple[Config, Store]:
    """A store with one queued file of ``texts``, and cache entries (with valid WAVs)
    for the texts in ``cached``."""
    paths = PathsConfig(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox",
                        done=tmp_path / "done", failed=tmp_path / "failed",
                        state=tmp_path / "state")
    cfg = dataclasses.replace(Config(), paths=paths, cache=CacheConfig())
    store = Store(paths.db)
    out_dir = paths.outbox / "a"
    fid = store.add_file("a.txt", paths.work / "a.txt", 1, "0" * 64, out_dir)
    store.add_lines(fid, [NewLine(i, t, out_name=f"{i:04d}", voice=VOICE, cache_key=_key(t))
                          for i, t in enumerate(texts, 1)])
    store.file_parsed(fid, "txt", len(texts), None)
    rows = []
    for t in dict.fromkeys(cached):
        path = cache_path(paths.cache, _key(t))
        path.parent.mkdir(parents=True, exist_ok=True)
        size = write_wav(path, _tone(0.2), SR)
        rows.append({"key": _key(t), "path": str(path), "bytes": size, "seconds": 0.2,
                     "voice": VOICE})
    store.complete([], [], rows, None, {})
    return cfg, store


def _lines(store: Store) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in store.conn.execute(
        "SELECT text, state, cached, synth_count, attempts, wav FROM lines")}


def test_damaged_cache_files_in_a_big_take_are_misses_and_evicted(tmp_path: Path) -> None:
    """damaged-cache-file inside one big take of hits: a deleted, a truncated (44 B) and a replaced
    (other sample rate) cache file each make their lines misses for the model and lose
    their cache rows; every other line, repeats included, is a hit checked once."""
    texts = [f"Line {i}." for i in range(40)] + ["Line 3.", "Line 5.", "Line 7."]
    cfg, store = _site(tmp_path, texts, cached=texts)
    cache = cfg.paths.cache
    cache_path(cache, _key("Line 3.")).unlink()
    with open(cache_path(cache, _key("Line 5.")), "r+b") as f:
        f.truncate(44)
    os.unlink(cache_path(cache, _key("Line 7.")))
    write_wav(cache_path(cache, _key("Line 7.")), _tone(0.2, 16000), 16000)
    feeder = Feeder(cfg, _engine(), {VOICE: SR}, size=4)
    feeder.take_size = 64
    batch = feeder.next_batch(store, threading.Event())
    assert len(batch.rows) == len(texts) and not batch.existing
    assert sorted(g[0].text for g in batch.groups) == ["Line 3.", "Line 5.", "Line 7."]
    assert [len(g) for g in batch.groups] == [2, 2, 2]
    assert len(batch.hits) == len(texts) - 6
    left = {r[0] for r in store.conn.execute("SELECT key FROM cache")}
    assert left == {_key(t) for t in texts} - {_key(f"Line {i}.") for i in (3, 5, 7)}


def test_sink_commits_hits_after_placing_and_adopts_a_valid_wav(tmp_path: Path) -> None:
    """Hits are copies of the cache's files (files of their own: nothing done to them
    reaches the cache), committed done (cached) in one transaction. A first take does
    not look at its outbox path; a valid WAV found there when placing (left by an
    earlier attempt) is adopted as it is, never replaced."""
    texts = ["One.", "Two.", "Three.", "One."]
    cfg, store = _site(tmp_path, texts, cached=texts)
    feeder = Feeder(cfg, _engine(), {VOICE: SR}, size=8)
    batch = feeder.next_batch(store, threading.Event())
    assert len(batch.hits) == 4 and not batch.groups and not batch.existing
    two = next(r for r, _e in batch.hits if r.text == "Two.")
    out_path(two).parent.mkdir(parents=True)
    write_wav(out_path(two), _tone(0.5), SR)
    inode = out_path(two).stat().st_ino
    counts = Sink(cfg, _engine(), 1).write(store, batch)
    assert counts == {"done": 4, "failed": 0, "requeued": 0}
    lines = _lines(store)
    assert lines["Two."][:3] == ("done", 0, 1)   # adopted like the feeder does: not a hit
    assert out_path(two).stat().st_ino == inode
    assert abs(store.one("SELECT seconds FROM lines WHERE text='Two.'") - 0.5) < 0.01
    for row, entry in batch.hits:
        if row is not two:
            assert not os.path.samefile(out_path(row), entry["path"])
            assert out_path(row).read_bytes() == Path(entry["path"]).read_bytes()
            assert store.one("SELECT state || cached FROM lines WHERE id=?", (row.id,)) == "done1"
            assert store.one("SELECT wav FROM lines WHERE id=?", (row.id,)) == str(out_path(row))
    assert store.counters()["cache_hits"] == 3
    assert store.one("SELECT hits FROM cache WHERE key=?", (_key("One."),)) == 2
    assert store.one("SELECT hits FROM cache WHERE key=?", (_key("Two."),)) == 0


def test_a_hit_on_an_unchanged_stamped_file_reads_no_header(tmp_path: Path,
                                                           monkeypatch) -> None:
    """The one-stat check: an entry without a stamp gets the full header check once
    and is stamped (inode, mtime); after that its file takes one lstat. A stamped file
    edited in place (same size, a later mtime) or replaced (another inode), even by a
    good WAV, was changed by someone since ttsd wrote it: a miss, evicted, never
    served."""
    texts = ["Kept.", "Edited.", "Replaced."]
    cfg, store = _site(tmp_path, texts, cached=texts)
    full: list[str] = []
    real = formats.wav_ok   # the full check of a WAV line file, counted
    monkeypatch.setattr(formats, "wav_ok", lambda p, **kw: full.append(p) or real(p, **kw))
    feeder = Feeder(cfg, _engine(), {VOICE: SR}, size=8)

    def take() -> tuple:
        batch = feeder.next_batch(store, threading.Event())
        store.release([r.id for r in batch.rows])
        return batch

    def stamps() -> dict:
        return {k: (ino, mtime) for k, ino, mtime in
                store.conn.execute("SELECT key, ino, mtime_ns FROM cache")}

    assert set(stamps().values()) == {(None, None)}
    assert len(take().hits) == 3 and len(full) == 3
    for key, (ino, mtime) in stamps().items():
        st = os.lstat(cache_path(cfg.paths.cache, key))
        assert (ino, mtime) == (st.st_ino, st.st_mtime_ns)
    full.clear()
    assert len(take().hits) == 3 and full == []     # stamped: no header read
    edited = cache_path(cfg.paths.cache, _key("Edited."))
    with open(edited, "r+b") as f:
        f.write(b"JUNK")
    st = os.stat(edited)
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # an edit a moment later
    replaced = cache_path(cfg.paths.cache, _key("Replaced."))
    data = replaced.read_bytes()
    replaced.unlink()
    replaced.write_bytes(data)
    batch = take()
    assert sorted(r.text for r, _e in batch.hits) == ["Kept."]
    assert sorted(g[0].text for g in batch.groups) == ["Edited.", "Replaced."]
    assert full == []                                               # the stamp alone
    assert set(stamps()) == {_key("Kept.")}                         # the others evicted


def test_a_piece_carries_the_batch_s_answered_lines_in_its_rows(tmp_path: Path) -> None:
    """The first piece of a streamed batch takes the lines answered without the model
    (the sink writes them with it), and has them in its rows: the daemon takes a
    piece's rows out of its in-flight set, and a hit requeued by the piece must not
    stay there (a suspect would wait on it, or run beside it). Later pieces and the
    batch itself do not write them again."""
    from ttsd.engine.records import Result
    texts = ["Known one.", "Known two.", "New line.", "Another new line."]
    cfg, store = _site(tmp_path, texts, cached=texts[:2])
    batch = Feeder(cfg, _engine(), {VOICE: SR}, size=8).next_batch(store, threading.Event())
    assert len(batch.hits) == 2 and len(batch.groups) == 2
    first = batch.piece([Result(1, _tone(0.2), SR, None, 10)])
    assert sorted(r.text for r in first.rows) == ["Another new line.", "Known one.",
                                                  "Known two."]
    assert len(first.hits) == 2 and [r.key for r in first.results] == [0]
    second = batch.piece([Result(0, _tone(0.2), SR, None, 10)])
    assert [r.text for r in second.rows] == ["New line."] and not second.hits
    assert batch.streamed == {0, 1} and not batch.hits


def test_inode_numbers_past_2_63_fit_the_store(tmp_path: Path) -> None:
    """NFS, CIFS, FUSE and overlay file systems hand out inode numbers of 2**63 and
    above, which SQLite's signed INTEGER cannot hold (the commit raised OverflowError,
    killing the sink on every batch). They are stored two's-complement, one to one."""
    assert [cache.sqlite_ino(i) for i in (0, 2**63 - 1, 2**63, 2**64 - 1)] == \
        [0, 2**63 - 1, -2**63, -1]
    store = Store(tmp_path / "db.sqlite")
    store.complete([], [], [{"key": "k", "path": "/c/k.wav", "bytes": 100, "seconds": 1.0,
                             "voice": VOICE, "ino": cache.sqlite_ino(2**64 - 5),
                             "mtime_ns": 2**62}], None, {})
    store.cache_stamp([("k", cache.sqlite_ino(2**63 + 7), 2**62 + 1)])
    assert store.cache_get_many(["k"])["k"]["ino"] == cache.sqlite_ino(2**63 + 7)


def test_a_retried_line_adopts_its_wav_in_the_feeder(tmp_path: Path) -> None:
    """kill-9: a line taken again after a crash (attempts > 1) whose WAV was renamed
    into place before the crash is answered from the outbox, not the cache."""
    cfg, store = _site(tmp_path, ["Hello."], cached=["Hello."])
    feeder = Feeder(cfg, _engine(), {VOICE: SR}, size=8)
    first = feeder.next_batch(store, threading.Event())
    row = first.rows[0]
    out_path(row).parent.mkdir(parents=True)
    write_wav(out_path(row), _tone(0.3), SR)
    store.recover(cfg.daemon.max_attempts)          # the process died; restart
    again = feeder.next_batch(store, threading.Event())
    assert [r.id for r in again.existing] == [row.id] and not again.hits
    assert again.rows[0].attempts == 2


def test_a_partial_take_after_answered_batches_does_not_wait_for_more_lines(
        tmp_path: Path, monkeypatch) -> None:
    """A partial batch waits ``max_wait_ms`` for more lines to fill a model call; once
    the feeder is answering lines without the model (its take grew past a batch), the
    tail of a re-run must not wait: there is no model call to fill."""
    texts = [f"Line {i}." for i in range(300)]
    cfg, store = _site(tmp_path, texts, cached=texts)
    cfg = dataclasses.replace(cfg, batching=dataclasses.replace(cfg.batching, max_wait_ms=500))
    slept: list[float] = []
    monkeypatch.setattr("ttsd.pipeline.batcher.time.sleep", slept.append)
    feeder = Feeder(cfg, _engine(), {VOICE: SR}, size=256)
    first = feeder.next_batch(store, threading.Event())
    assert len(first.hits) == 256 and not slept    # a full batch of hits: no wait
    assert feeder.take_size > feeder.size          # answered: the next take is bigger
    tail = feeder.next_batch(store, threading.Event())
    assert len(tail.hits) == 44 and not slept, "the tail of a re-run waited for more lines"
    # A partial first take of new lines still waits for more (trickling input).
    fid = store.add_file("b.txt", cfg.paths.work / "b.txt", 1, "1" * 64, cfg.paths.outbox / "b")
    store.add_lines(fid, [NewLine(1, "Brand new.", out_name="0001", voice=VOICE,
                                  cache_key=_key("Brand new."))])
    feeder.take_size = feeder.size
    fresh = feeder.next_batch(store, threading.Event())
    assert [g[0].text for g in fresh.groups] == ["Brand new."] and slept == [0.5]


def test_lines_answered_as_parsed_go_in_done_and_count_once(tmp_path: Path) -> None:
    """``answer_new_lines`` places the WAVs of the known lines of a new file and
    ``add_lines`` inserts them done (the unknown one pending), counting each cache use
    once; the same chunk parsed again (a crash before the file was queued) finds its
    WAVs in place, changes nothing in the store and counts nothing again."""
    cfg, store = _site(tmp_path, [], cached=["Known one.", "Known two."])
    out_dir = cfg.paths.outbox / "b"
    fid = store.add_file("b.txt", cfg.paths.work / "b.txt", 1, "0" * 64, out_dir)

    def chunk() -> list[NewLine]:
        return [NewLine(i, t, out_name=f"{i:04d}", voice=VOICE, cache_key=_key(t))
                for i, t in enumerate(["Known one.", "Brand new.", "Known two."], 1)]
    first = chunk()
    cache.answer_new_lines(store, first, out_dir, {VOICE: SR})
    assert store.add_lines(fid, first) == 2
    rows = {r[0]: r[1:] for r in store.conn.execute(
        "SELECT number, state, cached, wav FROM lines WHERE file_id = ?", (fid,))}
    assert rows[1] == ("done", 1, str(out_dir / "0001.wav"))
    assert rows[2] == ("pending", 0, None)
    assert rows[3] == ("done", 1, str(out_dir / "0003.wav"))
    for n, t in ((1, "Known one."), (3, "Known two.")):
        cached = cache_path(cfg.paths.cache, _key(t))
        assert not os.path.samefile(out_dir / f"{n:04d}.wav", cached)   # a copy of its own
        assert (out_dir / f"{n:04d}.wav").read_bytes() == cached.read_bytes()
    assert not (out_dir / "0002.wav").exists()
    hits = dict(store.conn.execute("SELECT key, hits FROM cache"))
    assert hits == {_key("Known one."): 1, _key("Known two."): 1}
    assert store.counters()["cache_hits"] == 2
    again = chunk()   # parsed again: the very copies are found ("placed"), not re-counted
    cache.answer_new_lines(store, again, out_dir, {VOICE: SR})
    assert [ln.cached for ln in again] == [True, False, True]
    assert store.add_lines(fid, again) == 0
    assert dict(store.conn.execute("SELECT key, hits FROM cache")) == hits
    assert store.counters()["cache_hits"] == 2


def test_answering_a_chunk_sends_the_odd_hits_the_full_way(tmp_path: Path) -> None:
    """300 known lines answered as parsed, their entries stamped by a first pass: the
    unchanged files are copied; a file edited in place since its stamp (broken header,
    later mtime) is a miss and evicted, a path held by a foreign file is never
    overwritten and its line stays pending, and a path holding another whole WAV (an
    earlier attempt's) is adopted."""
    texts = [f"Line number {i}." for i in range(300)]
    cfg, store = _site(tmp_path, [], cached=texts)

    def chunk() -> list[NewLine]:
        return [NewLine(i, t, out_name=f"{i:04d}", voice=VOICE, cache_key=_key(t))
                for i, t in enumerate(texts, 1)]
    warm = chunk()
    cache.answer_new_lines(store, warm, cfg.paths.outbox / "warm", {VOICE: SR})
    assert all(ln.cached for ln in warm)
    assert store.one("SELECT COUNT(*) FROM cache WHERE ino IS NOT NULL") == 300
    edited = cache_path(cfg.paths.cache, _key(texts[10]))
    with open(edited, "r+b") as f:
        f.write(b"JUNK")
    st = os.stat(edited)
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    out_dir = cfg.paths.outbox / "big"
    out_dir.mkdir(parents=True)
    (out_dir / "0201.wav").write_bytes(b"not mine")            # line 201: taken
    write_wav(out_dir / "0251.wav", _tone(0.3), SR)             # line 251: adopted
    lines = chunk()
    cache.answer_new_lines(store, lines, out_dir, {VOICE: SR})
    by_number = {ln.number: ln for ln in lines}
    assert by_number[11].wav is None and not by_number[11].cached          # edited: a miss
    assert store.one("SELECT COUNT(*) FROM cache WHERE key = ?", (_key(texts[10]),)) == 0
    assert by_number[201].wav is None                                      # taken: pending
    assert (out_dir / "0201.wav").read_bytes() == b"not mine"
    assert by_number[251].wav == str(out_dir / "0251.wav") and not by_number[251].cached
    assert by_number[251].seconds == 0.3
    linked = [ln for ln in lines if ln.number not in (11, 201, 251)]
    assert all(ln.cached and ln.seconds == 0.2 for ln in linked)
    for ln in linked:
        assert ln.wav == str(out_dir / f"{ln.number:04d}.wav")
        assert Path(ln.wav).read_bytes() == \
            cache_path(cfg.paths.cache, ln.cache_key).read_bytes()
