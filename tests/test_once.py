"""`ttsd run --once`: finishes every file present at its start, then exits with a status
that says how it went (README, "Exit status"), a summary of what failed on stderr and
one warning per failed line in the log."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness import TONE, Site, assert_invariant

EXIT_OK, EXIT_FAILED = 0, 1


def _events(stderr: str, name: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == name:
                out.append(ev)
    return out


def test_once_finishes_the_file_it_found_every_time(tmp_path: Path) -> None:
    """A fresh site with one file, many times over: each run takes the file, writes its
    WAV, moves it to done/ and exits 0; nothing is left in the work folder. (The file
    carries a long blank tail, so its claim takes a while: the window in which a run
    used to think it had nothing left to do.)"""
    for run in range(6):
        root = tmp_path / f"site{run}"
        site = Site(root, env=TONE)
        site.inbox.mkdir(parents=True)
        site.write_config()
        (site.inbox / "one.txt").write_bytes(b"Hello there.\n" + b" " * 40_000_000 + b"\n")
        out = site.cli("run", "--once", timeout=120)
        assert out.returncode == EXIT_OK, (run, out.stderr[-3000:])
        assert (site.outbox / "one" / "0001.wav").exists(), (run, out.stderr[-3000:])
        assert (root / "done" / "one.txt").exists(), run
        assert not any((root / "state" / "work").iterdir()), run
        assert_invariant(site)


def test_once_with_failed_lines_exits_1_with_a_summary_and_a_warning_per_line(
        tmp_path: Path) -> None:
    site = Site(tmp_path, env=TONE)
    site.write_config()
    site.inbox.mkdir(parents=True)
    rows = ["id,text,speed,voice",
            "a,Good line one.,,",
            "b,Too fast.,nan,",
            "c,Too slow.,-1,",
            "d,Who speaks?,,nobody",
            "e,Fast again.,inf,",
            "f,,,",
            "g,Speed words.,quick,",
            "h,Huge speed.,1e308,",
            "i,Good line two.,,"]
    (site.inbox / "prompts.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (site.inbox / "junk.txt").write_bytes(os.urandom(1024) + b"\x00" * 64)
    out = site.cli("run", "--once", timeout=120)
    assert out.returncode == EXIT_FAILED, out.stderr[-3000:]
    warned = _events(out.stderr, "line.failed")
    assert sorted(ev["line"] for ev in warned) == [3, 4, 5, 6, 7, 8, 9], warned
    assert all(ev["level"] == "warning" and ev["file"] == "prompts.csv" and ev["error"]
               for ev in warned), warned
    summary = out.stderr[out.stderr.rindex("ttsd run --once:"):]
    assert "7 of 9 lines failed" in summary, summary
    assert "prompts.csv line 3" in summary and "junk.txt" in summary, summary
    assert "binary" in summary, summary
    assert_invariant(site)


def test_once_all_done_exits_0_and_says_so(tmp_path: Path) -> None:
    site = Site(tmp_path, env=TONE)
    site.write_config()
    site.inbox.mkdir(parents=True)
    (site.inbox / "a.txt").write_text("One.\nTwo.\n", encoding="utf-8")
    out = site.cli("run", "--once", timeout=120)
    assert out.returncode == EXIT_OK, out.stderr[-3000:]
    summary = out.stderr[out.stderr.rindex("ttsd run --once:"):]
    assert "1 file done" in summary and "2 lines done" in summary, summary
    assert not _events(out.stderr, "line.failed")
