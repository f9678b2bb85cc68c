"""One daemon per state folder: a second `ttsd run` (or a cron `ttsd run --once` beside
the service) is refused at once, naming the running pid, and the first is unharmed."""

from __future__ import annotations

import time
from pathlib import Path

from harness import TONE, Site, assert_invariant

EXIT_LOCKED = 3


def _wait_running(site: Site, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if site.db.exists() and site.query(
                "SELECT COUNT(*) FROM lines WHERE state = 'running'")[0][0] > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"no line started in {timeout}s:\n{site.logs()}")


def test_a_second_daemon_is_refused_and_the_first_finishes_each_line_once(
        tmp_path: Path) -> None:
    site = Site(tmp_path, extra_config="[batching]\nmax_batch_size = 1\n",
                env=TONE)
    site.inbox.mkdir(parents=True)
    lines = [f"Line {i} of the book. {{{{fault:slow:600}}}}" for i in range(4)]
    (site.inbox / "book.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = site.start()
    site.wait_ready()
    _wait_running(site)
    for args in (("run",), ("run", "--once")):
        t0 = time.monotonic()
        second = site.cli(*args, timeout=60)
        assert second.returncode == EXIT_LOCKED, (args, second.returncode, second.stderr[-2000:])
        assert time.monotonic() - t0 < 30
        assert str(first.pid) in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    status = site.status()
    assert status["daemon"]["state"] == "up" and status["daemon"]["pid"] == first.pid
    site.wait_files_finished(1)
    assert site.stop() == 0, site.logs()
    rows = site.query("SELECT attempts, synth_count FROM lines")
    assert rows == [(1, 1)] * 4, rows
    assert_invariant(site)


def test_the_lock_goes_with_the_process(tmp_path: Path) -> None:
    """A daemon killed with -9 leaves no lock behind: the next one starts."""
    site = Site(tmp_path, env=TONE)
    site.start()
    site.wait_ready()
    site.kill9()
    site.start()
    site.wait_ready()
    assert site.stop() == 0, site.logs()
