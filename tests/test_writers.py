"""Programs that write into the inbox the way ordinary programs do: holding the file
open and pausing, finishing a sentence after a pause, reopening it to append, or
writing on after ttsd took it. Every line becomes audio once, or the file fails with a
reason; nothing is lost silently. The real daemon, real files, real SQLite."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from harness import FAULTS, TONE, Site, assert_invariant

PAUSE_S = 1.5
"""Longer than the tests' input.settle_s (0.3 s), as the user's 2.5 s was longer than 1 s."""


def _manifest(site: Site, stem: str) -> list[dict]:
    with open(site.outbox / stem / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _events(site: Site, name: str) -> list[dict]:
    out = []
    for line in site.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == name:
                out.append(ev)
    return out


def _spoken(site: Site) -> list[str]:
    """The text of every done line, in file and line order."""
    return [t for (t,) in site.query(
        "SELECT l.text FROM lines l JOIN files f ON f.id = l.file_id WHERE l.state = 'done' "
        "ORDER BY f.id, l.number")]


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_writer_that_holds_the_file_open_and_pauses_loses_nothing(
        tmp_path: Path, polling: bool) -> None:
    site = Site(tmp_path, env=TONE,
                extra_config=f"[input]\npolling = {str(polling).lower()}\n")
    site.start()
    site.wait_ready()
    lines = ["The first line.", "The second line.", "The third line.", "The fourth line."]
    with open(site.inbox / "held.txt", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
            f.flush()
            time.sleep(PAUSE_S)
    site.wait_files_finished(1)
    assert site.stop() == 0, site.logs()
    assert [r["text"] for r in _manifest(site, "held")] == lines
    assert _spoken(site) == lines
    assert (tmp_path / "done" / "held.txt").read_text() == "".join(s + "\n" for s in lines)
    assert_invariant(site)


def test_a_sentence_finished_after_a_pause_is_one_line(tmp_path: Path) -> None:
    site = Site(tmp_path, env=TONE)
    site.start()
    site.wait_ready()
    with open(site.inbox / "tide.txt", "w", encoding="utf-8") as f:
        f.write("The tide came in ")
        f.flush()
        time.sleep(PAUSE_S)
        f.write("and the boats rose with it.\nThen the gulls left.\n")
    site.wait_files_finished(1)
    assert site.stop() == 0, site.logs()
    assert _spoken(site) == ["The tide came in and the boats rose with it.",
                             "Then the gulls left."]
    assert sorted(p.name for p in (site.outbox / "tide").glob("*.wav")) == ["0001.wav",
                                                                            "0002.wav"]
    assert_invariant(site)


def test_a_writer_that_reopens_to_append_gets_every_line_and_a_warning(tmp_path: Path) -> None:
    """Each reopen after ttsd took the file makes a new file under the same name: its
    lines are spoken (in an outbox folder of its own, as any file dropped again), and
    the log says the name came back while it was being written."""
    site = Site(tmp_path, env=TONE)
    site.start()
    site.wait_ready()
    lines = [f"Appended line number {i}." for i in range(1, 5)]
    for line in lines:
        with open(site.inbox / "reopen.txt", "a", encoding="utf-8") as f:
            f.write(line + "\n")
        time.sleep(PAUSE_S)
    site.wait_files_finished(4)
    assert site.stop() == 0, site.logs()
    assert sorted(_spoken(site)) == sorted(lines)
    warned = _events(site, "file.name_reused")
    assert len(warned) == 3 and all(ev["level"] == "warning" and ev["name"] == "reopen.txt"
                                    for ev in warned), warned
    assert "rename" in warned[0]["hint"]
    assert_invariant(site)


def _work_copy(site: Site, name: str, timeout: float = 30) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list((site.root / "state" / "work").glob(f"*--{name}"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{name} was not claimed:\n{site.logs()}")


def test_lines_appended_after_the_claim_are_spoken_too(tmp_path: Path) -> None:
    """A writer that still had the file open when ttsd took it (a network file system,
    where ttsd cannot see other hosts' writers) appends to the claimed copy: the new
    lines are taken too, before the file is finished."""
    site = Site(tmp_path, env=FAULTS,
                extra_config="[batching]\nmax_batch_size = 1\n")
    site.start()
    site.wait_ready()
    first = "A slow first line. {{fault:slow:2000}}"
    (site.inbox / "grow.txt").write_text(first + "\n", encoding="utf-8")
    work = _work_copy(site, "grow.txt")
    time.sleep(0.5)
    with open(work, "a", encoding="utf-8") as f:
        f.write("Written after the claim.\nAnd one more.\n")
    site.wait_files_finished(1)
    assert site.stop() == 0, site.logs()
    assert [r["text"] for r in _manifest(site, "grow")] == [
        first, "Written after the claim.", "And one more."]
    assert (tmp_path / "done" / "grow.txt").read_text().endswith("And one more.\n")
    assert_invariant(site)


def test_a_file_rewritten_after_the_claim_fails_with_the_reason(tmp_path: Path) -> None:
    site = Site(tmp_path, env=FAULTS,
                extra_config="[batching]\nmax_batch_size = 1\n")
    site.start()
    site.wait_ready()
    (site.inbox / "swap.txt").write_text("Slow words here. {{fault:slow:2000}}\nTwo.\n",
                                         encoding="utf-8")
    work = _work_copy(site, "swap.txt")
    time.sleep(0.5)
    with open(work, "r+", encoding="utf-8") as f:
        f.write("Other")
    site.wait_files_finished(1)
    assert site.stop() == 0, site.logs()
    error = (tmp_path / "failed" / "swap.txt.error.txt").read_text()
    assert "changed after ttsd took it" in error, error
    (state, reason), = site.query("SELECT state, error FROM files")
    assert state == "failed" and "changed after ttsd took it" in reason
    assert_invariant(site)
