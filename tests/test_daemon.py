"""End to end: the real `ttsd run` as a subprocess, the real voice on the CPU, real files,
real SQLite. Each test ends by checking the invariant (tests/harness.py)."""

from __future__ import annotations

import csv
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from harness import FAULTS, TONE, Site, assert_invariant, crash_env


def _check_wav(path: Path, text: str) -> None:
    audio, sr = sf.read(str(path), dtype="float32")
    assert sr == 22050
    seconds = len(audio) / sr
    # Plausible speech length: roughly 25–200 ms per character for this voice.
    assert 0.025 * len(text) < seconds < 0.2 * len(text) + 1.0, (path, seconds, text)
    assert float(np.sqrt(np.mean(audio ** 2))) > 0.01, f"{path} is silent"


def test_end_to_end_files_before_start_slow_writer_and_csv(tmp_path: Path) -> None:
    site = Site(tmp_path, extra_config="[input]\nsettle_s = 0.6\n")
    site.inbox.mkdir(parents=True)
    early = ["Hello there, this file was here before the daemon started.", "Second line."]
    (site.inbox / "early.txt").write_text("\n".join(early) + "\n", encoding="utf-8")
    site.start()
    site.wait_ready()
    # A CSV with ids, speeds and one bad row.
    (site.inbox / "prompts.csv").write_text(
        'id,text,speed\nwelcome,"Welcome, everyone.",1.2\nbad,"Too fast",nan\n'
        'bye,"Goodbye now!",\n', encoding="utf-8")
    # A file written slowly, in pieces, while held open.
    slow = ["A slowly written line.", "It arrives in pieces.", "The end."]
    with open(site.inbox / "slow.txt", "w", encoding="utf-8") as f:
        for line in slow:
            f.write(line + "\n")
            f.flush()
            time.sleep(0.25)
    site.wait_files_finished(3)
    status = site.status()
    assert status["daemon"]["state"] == "up"
    assert status["lines"]["done"] == 2 + 2 + 3
    assert site.stop() == 0

    out = site.outbox
    _check_wav(out / "early" / "0001.wav", early[0])
    _check_wav(out / "early" / "0002.wav", early[1])
    for i, line in enumerate(slow, 1):
        _check_wav(out / "slow" / f"{i:04d}.wav", line)
    _check_wav(out / "prompts" / "welcome.wav", "Welcome, everyone.")
    assert not (out / "prompts" / "bad.wav").exists()
    with open(out / "prompts" / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_id = {r["id"]: r for r in rows}
    assert by_id["welcome"]["wav"] == "welcome.wav" and not by_id["welcome"]["error"]
    assert "speed" in by_id["bad"]["error"] and by_id["bad"]["wav"] == ""
    assert (tmp_path / "done" / "prompts.csv").exists()
    assert (tmp_path / "done" / "slow.txt").read_text() == "".join(s + "\n" for s in slow)
    # The store agrees: one row per line, faster speed gives shorter audio than default.
    rows = site.query("SELECT state, COUNT(*) FROM lines GROUP BY state")
    assert dict(rows) == {"done": 7, "failed": 1}
    assert site.query("SELECT COUNT(*) FROM batches")[0][0] >= 1
    assert_invariant(site)


def test_kill9_mid_batch_then_restart_finishes_each_line_once(tmp_path: Path) -> None:
    """kill-9: kill -9 while batches are in flight; a restart finishes the rest, and no
    line finished before the kill is synthesized again."""
    site = Site(tmp_path, extra_config="[batching]\nmax_batch_size = 2\n",
                env=FAULTS)
    site.inbox.mkdir(parents=True)
    lines = [f"Line number {i} {{{{fault:slow:700}}}}" for i in range(10)]
    (site.inbox / "book.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    site.start()
    site.wait_ready()
    deadline = time.time() + 60
    while time.time() < deadline:
        if site.db.exists() and site.query(
                "SELECT COUNT(*) FROM lines WHERE state='done'")[0][0] >= 2:
            break
        time.sleep(0.1)
    site.kill9()
    done_before = {r[0] for r in site.query("SELECT id FROM lines WHERE state='done'")}
    assert 2 <= len(done_before) < 10
    site.start()
    site.wait_ready()
    site.wait_files_finished(1)
    assert site.stop() == 0
    rows = site.query("SELECT id, state, synth_count FROM lines")
    assert len(rows) == 10 and all(r[1] == "done" for r in rows)
    for line_id, _state, count in rows:
        if line_id in done_before:
            assert count == 1, f"line {line_id} finished before the kill was redone"
        else:
            assert count in (1, 2)
    assert len(list((site.outbox / "book").glob("*.wav"))) == 10
    assert_invariant(site)


def test_notify_socket_ready_watchdog_stopping(tmp_path: Path) -> None:
    """notify-protocol and watchdog: READY=1 after load and scan, WATCHDOG=1 from the work loop,
    STOPPING=1."""
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    got: list[str] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                got.append(sock.recv(4096).decode())
            except socket.timeout:
                continue

    t = threading.Thread(target=listen)
    t.start()
    try:
        site = Site(tmp_path, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "2000000"})
        site.start()
        site.wait_ready()
        deadline = time.time() + 20
        while time.time() < deadline and not any("WATCHDOG=1" in m for m in got):
            time.sleep(0.1)
        assert site.stop() == 0
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
        sock.close()
    text = "\n".join(got)
    assert "READY=1" in text
    assert "WATCHDOG=1" in text
    assert "STATUS=" in text
    assert "STOPPING=1" in text


def test_cache_hit_then_purge_while_running(tmp_path: Path) -> None:
    """The same line twice: the second is a cache hit with no model work; purge-cache
    --all while the daemon runs removes the cache but not the outbox WAVs."""
    site = Site(tmp_path)
    site.start()
    site.wait_ready()
    (site.inbox / "a.txt").write_text("The same sentence, twice.\n", encoding="utf-8")
    site.wait_files_finished(1)
    (site.inbox / "b.txt").write_text("The same sentence, twice.\n", encoding="utf-8")
    site.wait_files_finished(2)
    rows = site.query("SELECT cached, synth_count FROM lines ORDER BY id")
    assert rows == [(0, 1), (1, 0)]
    assert site.status()["cache"]["hits"] == 1
    dry = site.cli("purge-cache", "--all", "--dry-run")
    assert dry.returncode == 0 and site.query("SELECT COUNT(*) FROM cache")[0][0] == 1
    out = site.cli("purge-cache", "--all")
    assert out.returncode == 0, out.stderr
    assert site.query("SELECT COUNT(*) FROM cache")[0][0] == 0
    assert not list((tmp_path / "state" / "cache").rglob("*.wav"))
    assert (site.outbox / "a" / "0001.wav").exists() and (site.outbox / "b" / "0001.wav").exists()
    # After the purge the same line is synthesized again, not failed.
    (site.inbox / "c.txt").write_text("The same sentence, twice.\n", encoding="utf-8")
    site.wait_files_finished(3)
    assert site.query("SELECT cached, synth_count FROM lines ORDER BY id")[-1] == (0, 1)
    assert site.stop() == 0
    assert_invariant(site)


def test_damaged_cache_files_among_many_hits(tmp_path: Path) -> None:
    """damaged-cache-file at volume (fast stand-in model): 300 known lines come back, answered from
    the cache as their file is parsed; a deleted, a truncated (44 B) and a replaced
    cache file (another line's valid WAV) among them are evicted and synthesized again
    (only they reach the model), the others are copies of their cached WAVs. A third run
    is all hits again, each with its own line's audio: the cache holds the fresh WAVs,
    not the damaged files."""
    site = Site(tmp_path, env=TONE)
    site.write_config()
    site.inbox.mkdir(parents=True)
    text = "".join(f"Known line number {i}, said {'again ' * (i % 7)}once.\n"
                   for i in range(1, 301))

    def run(name: str) -> int:
        (site.inbox / name).write_text(text, encoding="utf-8")
        out = site.cli("run", "--once", "--no-progress", timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        return site.query("SELECT id FROM files WHERE name=?", (name,))[0][0]

    run("a.txt")
    path = dict(site.query("SELECT l.number, c.path FROM lines l JOIN cache c "
                           "ON c.key = l.cache_key WHERE l.file_id = 1"))
    assert len(path) == 300
    # Damage the cache's files by name (unlinked; two written anew): the outbox WAVs of
    # a.txt, which the third run compares against, stay as they were.
    Path(path[10]).unlink()
    head = Path(path[150]).read_bytes()[:44]
    os.unlink(path[150])
    Path(path[150]).write_bytes(head)
    os.unlink(path[290])
    Path(path[290]).write_bytes(Path(path[291]).read_bytes())
    last_batch = site.query("SELECT MAX(id) FROM batches")[0][0]
    b = run("b.txt")
    rows = {n: (state, cached, synth) for n, state, cached, synth in site.query(
        "SELECT number, state, cached, synth_count FROM lines WHERE file_id=?", (b,))}
    damaged = {10, 150, 290}
    assert {n for n, r in rows.items() if r == ("done", 0, 1)} == damaged
    assert all(r == ("done", 1, 0) for n, r in rows.items() if n not in damaged)
    # The hits were answered as b.txt was parsed: only the damaged lines reached a batch.
    sizes = [n for (n,) in site.query("SELECT size FROM batches WHERE id > ?", (last_batch,))]
    assert sum(sizes) == len(damaged), sizes
    for n in (1, 11, 289, 300):   # copies of the cache's files, not the files themselves
        assert (site.outbox / "b" / f"{n:04d}.wav").read_bytes() == Path(path[n]).read_bytes()
        assert not os.path.samefile(site.outbox / "b" / f"{n:04d}.wav", path[n])
    c = run("c.txt")
    assert site.query("SELECT COUNT(*), SUM(cached) FROM lines WHERE file_id=?", (c,)) \
        == [(300, 300)]
    for n in (10, 150, 290, 291):
        a_wav = (site.outbox / "a" / f"{n:04d}.wav").read_bytes()
        assert (site.outbox / "c" / f"{n:04d}.wav").read_bytes() == a_wav, n
    # Every entry, the three written again included, carries its file's stamp (the
    # one-stat hit check): the very inode and mtime now on disk.
    stamps = site.query("SELECT path, ino, mtime_ns FROM cache")
    assert len(stamps) == 300
    for p, ino, mtime in stamps:
        st = os.lstat(p)
        assert (ino, mtime) == (st.st_ino, st.st_mtime_ns), p
    assert_invariant(site)


def test_once_exits_nonzero_when_a_file_fails(tmp_path: Path) -> None:
    """`run --once` finishes what is in the inbox and exits; a binary file fails it."""
    site = Site(tmp_path)
    site.write_config()
    site.inbox.mkdir(parents=True)
    (site.inbox / "good.txt").write_text("Just one line.\n", encoding="utf-8")
    (site.inbox / "bad.txt").write_bytes(os.urandom(2048) + b"\x00" * 16)
    out = site.cli("run", "--once", timeout=180)
    assert out.returncode == 1, out.stderr[-2000:]
    assert (site.outbox / "good" / "0001.wav").exists()
    err = (tmp_path / "failed" / "bad.txt.error.txt").read_text()
    assert "binary" in err
    assert_invariant(site)


def test_say_writes_a_wav(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.write_config()
    out = site.cli("say", "Testing one, two, three.", "-o", str(tmp_path / "x.wav"),
                   "--speed", "1.5", "--seed", "3")
    assert out.returncode == 0, out.stderr
    _check_wav(tmp_path / "x.wav", "Testing one, two, three.")


def _foreign_file_at_an_output_path(tmp_path: Path, cached: bool) -> tuple[Site, bytes]:
    """A file whose lines were claimed and taken when the process died (crash point
    mid_batch), and, before the restart, a user's file that is not a WAV put at line 2's
    output path. ``cached``: its lines are cache hits (an earlier file said them), so
    they are answered as they are parsed: the process dies after linking their WAVs
    and before inserting them (crash point after_hit_links), and the user's file
    replaces line 2's link."""
    site = Site(tmp_path, env=TONE)
    site.write_config()
    site.inbox.mkdir(parents=True)
    text = "".join(f"Line {i} of the {'known' if cached else 'new'} file.\n" for i in (1, 2, 3))
    if cached:
        (site.inbox / "a.txt").write_text(text, encoding="utf-8")
        out = site.cli("run", "--once", "--no-progress", timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
    (site.inbox / "b.txt").write_text(text, encoding="utf-8")
    # Popen with its log in a file, not cli(): a phonemizer process the kill orphans
    # would hold a captured stderr open.
    site.start("--once", env=crash_env("after_hit_links" if cached else "mid_batch"))
    assert site.proc.wait(timeout=180) == 137, site.logs()
    taken = site.query("SELECT l.number, l.state FROM lines l JOIN files f ON f.id = "
                       "l.file_id WHERE f.name = 'b.txt' AND f.out_dir = ?",
                       (str(site.outbox / "b"),))
    if cached:   # linked, not yet in the store
        assert taken == [], taken
        assert len(list((site.outbox / "b").glob("*.wav"))) == 3
        (site.outbox / "b" / "0002.wav").unlink()   # the link, not the cache's file
    else:
        assert ("2", "running") in {(str(n), s) for n, s in taken}, taken
    note = b"my own notes, not audio\n" * 10
    (site.outbox / "b").mkdir(parents=True, exist_ok=True)
    (site.outbox / "b" / "0002.wav").write_bytes(note)
    return site, note


def _check_foreign_file_kept_and_line_failed(site: Site, note: bytes, cached: bool) -> None:
    out = site.cli("run", "--once", "--no-progress", timeout=180)
    assert out.returncode == 1, out.stderr[-3000:]   # a line failed: the run says so
    assert "b.txt line 2:" in out.stderr, out.stderr[-3000:]
    foreign = site.outbox / "b" / "0002.wav"
    assert foreign.read_bytes() == note             # never overwritten
    rows = {n: (state, cached_, error) for n, state, cached_, error in site.query(
        "SELECT l.number, l.state, l.cached, l.error FROM lines l JOIN files f "
        "ON f.id = l.file_id WHERE f.name = 'b.txt'")}
    state, _c, error = rows[2]
    assert state == "failed" and str(foreign) in error and "not a valid WAV" in error, rows[2]
    for n in (1, 3):   # the rest of the batch completes
        assert rows[n][:2] == ("done", int(cached)), rows[n]
        _check_wav(site.outbox / "b" / f"{n:04d}.wav", "Line 1 of the new file.")
    with open(site.outbox / "b" / "manifest.csv", newline="", encoding="utf-8") as f:
        manifest = {r["line"]: r for r in csv.DictReader(f)}
    assert manifest["2"]["wav"] == "" and str(foreign) in manifest["2"]["error"]
    assert (site.root / "done" / "b.txt").exists()
    foreign.unlink()   # the user's file aside, every line is one WAV or one reason
    assert_invariant(site)


def test_a_foreign_file_at_a_cache_hits_path_fails_that_line_only(tmp_path: Path) -> None:
    """id-collision and damaged-cache-file: a file that is not a WAV at a cache hit's output
    path is never overwritten; that line fails with an error naming the path, the other hits of the
    batch are done, and the daemon goes on (it used to stop: the sink re-raised)."""
    site, note = _foreign_file_at_an_output_path(tmp_path, cached=True)
    _check_foreign_file_kept_and_line_failed(site, note, cached=True)


def test_a_foreign_file_at_a_synthesized_lines_path_fails_it_instead_of_looping(
        tmp_path: Path) -> None:
    """The same for a line the model synthesizes: it used to go back to pending with its
    attempt undone, be synthesized and refused again, forever (`run --once` never
    finished); it fails once, naming the path, and the file is kept."""
    site, note = _foreign_file_at_an_output_path(tmp_path, cached=False)
    _check_foreign_file_kept_and_line_failed(site, note, cached=False)
