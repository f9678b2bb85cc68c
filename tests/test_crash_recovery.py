"""kill -9 (docs/reliability.md, kill-9) at each named crash point and at random
moments, restart, and the invariant holds with no line synthesized twice.

The real daemon runs as a subprocess. ``harness.crash_env("NAME[:N]")`` makes it
``os._exit(137)`` the N-th time it reaches NAME (ttsd/crash.py, armed by tests/faults.py),
exactly as a kill -9 there would; the restart runs without the variable. What "no line
synthesized twice" can mean is what the store can show (tests/harness.py ``assert_no_redo``): a line whose
done row was committed before the kill is never taken again (``attempts`` unchanged),
never counted as synthesized again (``synth_count`` unchanged, at most 1 for any line)
and its WAV is never rewritten (same inode and mtime). A line that was *in the model*
when the process died is synthesized again on restart (its WAV is still written once);
a WAV renamed into place before the kill but not yet committed is adopted as it is.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import (
    FAULTS,
    ROOT,
    TONE,
    Site,
    assert_invariant,
    assert_no_redo,
    crash_env,
    restart_until_finished,
    snapshot,
)

from ttsd import crash

LINES = ["Good morning.", "The cat sat on the mat.", "Rain again today.", "One more."]


def _crashed_run(site: Site, spec: str, timeout: float = 90) -> None:
    site.start(env=crash_env(spec))
    try:
        rc = site.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        site.proc.kill()
        raise AssertionError(f"{spec} never reached:\n{site.logs()}") from None
    assert rc == 137, f"exit {rc} instead of 137 at {spec}:\n{site.logs()}"


def _restart_and_finish(site: Site, files: int) -> None:
    site.start()
    site.wait_ready()
    site.wait_files_finished(files)
    assert site.stop() == 0, site.logs()


def test_every_crash_point_is_reached_in_the_code() -> None:
    """kill-9: each name in crash.POINTS is passed to crash.point() somewhere in ttsd/."""
    source = "\n".join(p.read_text() for p in (ROOT / "ttsd").rglob("*.py"))
    named = set(re.findall(r"crash\.point\(\"(\w+)\"\)", source))
    named |= set(re.findall(r"crash_at=\"(\w+)\"", source))
    assert named == set(crash.POINTS)


@pytest.mark.parametrize("spec", ["after_claim", "mid_batch:2", "after_tmp:2", "after_rename:1",
                                  "before_commit:2", "after_commit:1"])
def test_kill_at_crash_point_then_restart(tmp_path: Path, spec: str) -> None:
    """kill-9: kill -9 at each named crash point (real voice on the CPU, batches of 2);
    the restart removes orphan temps, puts claimed work back, adopts WAVs renamed but not
    committed, never marks anything done early and never redoes a finished line."""
    # Batches of exactly 2 lines, the first one too (idle_batch = 1.0), and one writer
    # thread: the counts below (the second WAV's temp is the one left, the first one
    # already renamed) assume that shape. With a pool of writers the first WAV may still
    # be a temp when the second one reaches after_tmp (random kills cover that).
    site = Site(tmp_path, extra_config="[batching]\nmax_batch_size = 2\nmax_wait_ms = 5\n"
                                       "idle_batch = 1.0\nwriter_threads = 1\n")
    site.inbox.mkdir(parents=True)
    (site.inbox / "a.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    (site.inbox / "b.txt").write_text("Second file.\n", encoding="utf-8")
    _crashed_run(site, spec)
    before = snapshot(site)
    point = spec.split(":")[0]
    states = [v[0] for v in before.lines.values()]
    done = {lid for lid, v in before.lines.items() if v[0] == "done"}
    # Never done early: every committed line already has its WAV.
    for lid in done:
        assert before.lines[lid][3] in before.wavs, f"line {lid} done without its WAV"
    if point == "after_claim":
        work = list((tmp_path / "state" / "work").iterdir())
        assert len(work) == 1 and not states, (work, states)  # claimed, not yet recorded
    elif point == "mid_batch":
        assert "running" in states and not before.temps
    elif point == "after_tmp":
        assert len(before.temps) == 1, before.temps          # written + synced, not renamed
    elif point in ("after_rename", "before_commit"):
        assert len(before.wavs) > len(done), "a renamed WAV should wait for its commit"
    elif point == "after_commit":
        assert done and len(before.wavs) == len(done)
    _restart_and_finish(site, 2)
    after = snapshot(site)
    assert_invariant(site)
    assert_no_redo(before, after)
    assert all(v[0] == "done" for v in after.lines.values()), after.lines
    assert len(after.lines) == len(LINES) + 1
    if point == "after_claim":
        assert len(list((tmp_path / "done").iterdir())) == 2


def test_kill_after_hit_links_then_restart_records_each_hit_once(tmp_path: Path) -> None:
    """kill-9 for lines answered from the cache as their file is parsed: kill -9 after
    their WAVs are linked into the outbox and before the lines are in the store. The
    restart parses the file again, finds those very links, and records every line
    done once, as a cache hit, with the cached audio; no line reaches the model."""
    site = Site(tmp_path, env=TONE)
    site.write_config()
    site.inbox.mkdir(parents=True)
    text = "\n".join(LINES) + "\n"
    (site.inbox / "a.txt").write_text(text, encoding="utf-8")
    out = site.cli("run", "--once", "--no-progress", timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    batches = site.query("SELECT COUNT(*) FROM batches")[0][0]
    (site.inbox / "b.txt").write_text(text, encoding="utf-8")
    _crashed_run(site, "after_hit_links")
    before = snapshot(site)
    b = site.outbox / "b"
    assert site.query("SELECT COUNT(*) FROM lines l JOIN files f ON f.id = l.file_id "
                      "WHERE f.name = 'b.txt'") == [(0,)]
    assert len(list(b.glob("*.wav"))) == len(LINES)   # linked, not yet recorded
    _restart_and_finish(site, 2)
    after = snapshot(site)
    assert_no_redo(before, after)
    assert_invariant(site)
    rows = site.query("SELECT l.number, l.state, l.cached, l.synth_count, c.path FROM lines l "
                      "JOIN files f ON f.id = l.file_id JOIN cache c ON c.key = l.cache_key "
                      "WHERE f.name = 'b.txt' ORDER BY l.number")
    assert [r[:4] for r in rows] == [(n, "done", 1, 0) for n in range(1, len(LINES) + 1)]
    for n, *_rest, cache_file in rows:
        wav = b / f"{n:04d}.wav"
        assert wav.read_bytes() == Path(cache_file).read_bytes()   # a copy of the cache's file
        assert not os.path.samefile(wav, cache_file)
        assert wav.read_bytes() == (site.outbox / "a" / f"{n:04d}.wav").read_bytes()
    assert site.query("SELECT COUNT(*) FROM batches")[0][0] == batches   # no model work
    assert site.status()["cache"]["hits"] == len(LINES)


def _wait_log(site: Site, event: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while event not in site.logs():
        assert time.time() < deadline and site.proc.poll() is None, site.logs()
        time.sleep(0.02)


def _drop(site: Site, cycle: int, rng: random.Random) -> int:
    """Two new files; a few lines repeat earlier text (cache hits); returns lines added."""
    n = 0
    for k in range(2):
        lines = [f"Cycle {cycle} file {k} line {j}." if rng.random() > 0.05
                 else f"A repeated line {rng.randrange(5)}." for j in range(rng.randrange(40, 120))]
        tmp = site.inbox / f".c{cycle}-{k}.part"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.rename(site.inbox / f"c{cycle}-{k}.txt")
        n += len(lines)
    return n


def _random_kills(root: Path, seed: int, kills: int) -> tuple[int, int]:
    """Drop files, start the daemon (fast stand-in model), SIGKILL it at a random moment
    once the model is loaded (during recovery, the start-up scan, parsing or batches;
    kills during imports would test nothing), check no finished
    line was redone, repeat; finally run to the end and check the invariant."""
    rng = random.Random(seed)
    site = Site(root, env=TONE, extra_config=(
        "[batching]\nmax_batch_size = 8\nmax_wait_ms = 5\n[input]\nsettle_s = 0.1\n"
        "[daemon]\nmax_attempts = 50\n"))
    site.inbox.mkdir(parents=True)
    total = files = 0
    during_work = 0
    for cycle in range(kills):
        total += _drop(site, cycle, rng)
        files += 2
        before = snapshot(site)
        site.start()
        _wait_log(site, "engine.ready")
        time.sleep(rng.uniform(0.0, 1.2))   # recovery, start-up scan, parsing, batches
        assert site.proc.poll() is None, site.logs()
        site.kill9()
        during_work += "batch.done" in site.logs()
        after = snapshot(site)
        assert_no_redo(before, after)
        for lid, (state, _a, _s, wav) in after.lines.items():
            assert state != "done" or wav in after.wavs, f"line {lid} done without its WAV"
    before = snapshot(site)
    _restart_and_finish(site, files)
    after = snapshot(site)
    assert_no_redo(before, after)
    assert_invariant(site)
    assert len(after.lines) == total
    assert all(v[0] == "done" for v in after.lines.values())
    assert all(v[2] == 1 for v in after.lines.values() if v[3] and v[2] != 0)
    return total, during_work


def test_random_kills_then_restart_finish_each_line_once(tmp_path: Path) -> None:
    """kill-9: 20 SIGKILLs at seeded random moments (two sites side by side, 10 each,
    one per core), new files dropped while the daemon is down; after every kill nothing
    finished is redone, and the last run finishes every line exactly once."""
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(_random_kills, tmp_path / f"site{s}", 1000 + s, 10) for s in (0, 1)]
        results = [f.result() for f in futs]
    # The kills must land in real work, not only in start-up.
    assert sum(r[1] for r in results) >= 5, results


def test_a_line_that_kills_the_process_every_time_fails_alone(tmp_path: Path) -> None:
    """poison-line: ``{{fault:exit}}`` makes the process die (status 137) whenever the line
    is synthesized. The attempt is committed before synthesis, so after max_attempts
    starts the line fails with a reason and the file goes on; its batch-mates and the
    lines prefetched behind it each lose at most one attempt (a crash suspect runs
    alone) and are written once."""
    site = Site(tmp_path, env=FAULTS, extra_config=(
        "[batching]\nmax_batch_size = 3\nmax_wait_ms = 100\n[daemon]\nmax_attempts = 3\n"))
    site.inbox.mkdir(parents=True)
    text = [f"Innocent line {i}." for i in range(1, 10)]
    text[1] = "This line {{fault:exit}} kills it."
    (site.inbox / "a.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    exits = restart_until_finished(site, 1)
    assert exits == [137, 137, 137], exits
    rows = {r[0]: r[1:] for r in site.query(
        "SELECT number, state, error, attempts, synth_count FROM lines")}
    assert rows[2][0] == "failed" and "never finished" in rows[2][1], rows[2]
    assert rows[2][2] == 3
    for n, (state, _err, attempts, synth) in rows.items():
        if n != 2:
            assert state == "done" and synth == 1 and attempts <= 2, (n, rows[n])
    assert (tmp_path / "done" / "a.txt").exists()
    assert_invariant(site)
