"""What is done to the outbox stays in the outbox: an output edited in place changes
nothing the cache serves, and a folder swapped for a symbolic link is never written
through. The real daemon, real files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from harness import FAULTS, TONE, Site, assert_invariant

LINE = "The cache keeps what was said."


def _once(site: Site, name: str) -> None:
    (site.inbox / name).write_text(LINE + "\n", encoding="utf-8")
    out = site.cli("run", "--once", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def _normalise_in_place(path: Path) -> None:
    """What a user's tool might do: rewrite the samples louder, in the same file."""
    audio, sr = sf.read(str(path), dtype="int16")
    louder = np.clip(audio.astype(np.int32) * 3, -32768, 32767).astype(np.int16)
    with open(path, "r+b") as f:   # same inode, same size
        f.seek(44)
        f.write(louder.tobytes())


@pytest.mark.parametrize("link", [False, True], ids=["default", "links"])
def test_an_output_edited_in_place_changes_nothing_the_cache_serves(tmp_path: Path,
                                                                      link: bool) -> None:
    """By default the outbox gets copies; with cache.link = true, links, and an edit
    made through one is seen and not served."""
    site = Site(tmp_path, extra_config="[cache]\nlink = true\n" if link else "")
    site.write_config()
    site.inbox.mkdir(parents=True)
    _once(site, "a.txt")
    first = site.outbox / "a" / "0001.wav"
    original = first.read_bytes()
    _normalise_in_place(first)
    assert first.read_bytes() != original
    _once(site, "b.txt")
    second = site.outbox / "b" / "0001.wav"
    assert second.read_bytes() == original, "the cache served the edited audio"
    cached = dict(site.query("SELECT f.name, l.cached FROM lines l JOIN files f "
                             "ON f.id = l.file_id"))
    # Copies: the cache's own file was untouched, b is a hit. Links: the edit reached
    # the cache's file through the link, was seen, and b was synthesized again.
    assert cached == {"a.txt": 0, "b.txt": 0 if link else 1}, cached
    if not link:
        assert os.stat(first).st_ino != os.stat(second).st_ino
        _normalise_in_place(second)
        _once(site, "c.txt")
        assert (site.outbox / "c" / "0001.wav").read_bytes() == original


def test_a_folder_swapped_for_a_symlink_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    site = Site(tmp_path, env=FAULTS,
                extra_config="[batching]\nmax_batch_size = 1\n")
    site.start()
    site.wait_ready()
    lines = [f"Line {i} of the book. {{{{fault:slow:300}}}}" for i in range(1, 9)]
    (site.inbox / "x.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    deadline = time.time() + 60
    while not (site.outbox / "x" / "0001.wav").exists():
        assert time.time() < deadline, site.logs()
        time.sleep(0.05)
    os.rename(site.outbox / "x", tmp_path / "x.moved")
    os.symlink(outside, site.outbox / "x")
    deadline = time.time() + 60
    while "not a folder" not in site.log.read_text():
        assert time.time() < deadline, site.logs()
        time.sleep(0.1)
    time.sleep(2)
    assert list(outside.iterdir()) == [], list(outside.iterdir())
    events = [json.loads(ln) for ln in site.log.read_text().splitlines() if ln.startswith("{")]
    blocked = [e for e in events if e.get("event") == "site.blocked"]
    assert blocked and blocked[0]["place"] == "outbox", blocked
    assert site.proc.poll() is None
    os.unlink(site.outbox / "x")   # the user takes the link away: the rest is written
    site.wait_files_finished(1, timeout=120)
    assert site.stop() == 0, site.logs()
    assert list(outside.iterdir()) == []
    states = {s for (s,) in site.query("SELECT state FROM lines")}
    assert states == {"done"}, states
    assert (site.outbox / "x" / "manifest.csv").exists()


def test_a_file_dropped_again_is_named_one_way_and_empty_files_are_like_blank_ones(
        tmp_path: Path) -> None:
    """The second chapter1.txt goes to outbox/chapter1-2/ and done/chapter1-2.txt (one
    scheme for both); an empty file and a blank one both get their outbox folder with
    a manifest of no rows and move to done/."""
    site = Site(tmp_path, env=TONE)
    site.write_config()
    site.inbox.mkdir(parents=True)
    for _ in range(2):
        (site.inbox / "chapter1.txt").write_text("One line.\n", encoding="utf-8")
        (site.inbox / "empty.txt").write_bytes(b"")
        (site.inbox / "blank.txt").write_text("\n   \n\n", encoding="utf-8")
        out = site.cli("run", "--once", timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
    done = sorted(p.name for p in (tmp_path / "done").iterdir())
    assert done == ["blank-2.txt", "blank.txt", "chapter1-2.txt", "chapter1.txt",
                    "empty-2.txt", "empty.txt"], done
    assert sorted(p.name for p in site.outbox.iterdir()) == [
        "blank", "blank-2", "chapter1", "chapter1-2", "empty", "empty-2"]
    for stem in ("blank", "empty", "blank-2", "empty-2"):
        manifest = (site.outbox / stem / "manifest.csv").read_text(encoding="utf-8")
        assert manifest.splitlines() == [
            ("id,line,text,wav,seconds,cached,error,format,sample_rate,lufs,timestamps,"
             "markup,said")], stem
    assert (site.outbox / "chapter1-2" / "0001.wav").exists()
    assert_invariant(site)
