"""An inbox treated the way people treat folders: file names that are not UTF-8, the
inbox itself deleted and made again. The real daemon, real files."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from harness import TONE, Site, assert_invariant


def test_a_file_name_that_is_not_utf8_is_spoken_and_never_loops(tmp_path: Path) -> None:
    """Latin-1 bytes in a name (café.txt from an old system): the file is taken under
    its name with the bad byte written \\xNN, spoken, and moved to done/; a restart has
    nothing left to do (no crash loop on the claimed copy)."""
    site = Site(tmp_path, env=TONE)
    site.write_config()
    site.inbox.mkdir(parents=True)
    raw = os.path.join(os.fsencode(site.inbox), b"caf\xe9.txt")
    with open(raw, "wb") as f:
        f.write(b"Coffee for two.\n")
    (site.inbox / "plain.txt").write_text("A plain file too.\n", encoding="utf-8")
    for _run in range(2):
        out = site.cli("run", "--once", timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
    names = sorted(n for (n,) in site.query("SELECT name FROM files"))
    assert names == ["caf\\xe9.txt", "plain.txt"], names
    assert (tmp_path / "done" / "caf\\xe9.txt").read_bytes() == b"Coffee for two.\n"
    assert sorted(site.query("SELECT state FROM lines")) == [("done",), ("done",)]
    assert_invariant(site)


def test_an_inbox_deleted_and_made_again_is_watched_again(tmp_path: Path) -> None:
    """With the periodic rescan far away (60 s), a file dropped into an inbox that was
    removed and made again is taken at once, as in the first one."""
    site = Site(tmp_path, env=TONE, extra_config="[input]\nrescan_s = 60\n")
    site.start()
    site.wait_ready()
    (site.inbox / "first.txt").write_text("The first file.\n", encoding="utf-8")
    site.wait_files_finished(1, timeout=30)
    # At once, as `rm -rf inbox && mkdir inbox` does: the new folder often gets the old
    # one's inode number back, so only the watch's own deletion event tells.
    shutil.rmtree(site.inbox)
    site.inbox.mkdir(exist_ok=True)   # (ttsd may have made it again already)
    time.sleep(0.5)
    (site.inbox / "second.txt").write_text("The second file.\n", encoding="utf-8")
    t0 = time.monotonic()
    site.wait_files_finished(2, timeout=40)
    assert time.monotonic() - t0 < 20, "the new inbox was found by the rescan, not watched"
    assert site.stop() == 0, site.logs()
    assert_invariant(site)
