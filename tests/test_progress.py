"""`ttsd run --once` on a terminal: a progress bar that starts at zero, with the log's
lines printed above it, never on the bar's line."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from harness import TONE, Site, subprocess_env

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_on_a_terminal(site: Site, timeout: float = 120) -> tuple[int, str]:
    """`ttsd run --once` with a pseudo-terminal as stdout and stderr; what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ttsd.cli", "--config", str(site.config),
                             "run", "--once"], cwd=site.root, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=subprocess_env(site.env))
    os.close(slave)
    out = bytearray()
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:   # the terminal closed: the process is gone
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), out.decode("utf-8", "replace")


def test_the_bar_starts_at_zero_and_log_lines_print_above_it(tmp_path: Path) -> None:
    site = Site(tmp_path, env=TONE)
    site.write_config()
    site.inbox.mkdir(parents=True)
    (site.inbox / "book.txt").write_text(
        "".join(f"Line {i} of the book.\n" for i in range(1, 13)), encoding="utf-8")
    status, drawn = _run_on_a_terminal(site)
    assert status == 0, drawn[-3000:]
    # Each redraw of the bar starts with a carriage return; what was printed between
    # redraws is on lines of its own.
    frames = [ANSI.sub("", f) for f in re.split(r"[\r\n]+", drawn) if f.strip()]
    bars = [f for f in frames if re.search(r"\d+/(\d+|\?) lines", f) and "|" in f]
    assert bars, drawn[-3000:]
    first = re.search(r"\|(#*)\s*\| (\d+)/(\d+|\?) lines", bars[0])
    assert first and first.group(2) == "0" and first.group(1) == "", bars[0]   # empty, not full
    assert re.search(r"12/12 lines", bars[-1]), bars[-1]
    events = [f for f in frames if re.search(r"\[(info|warning|error|debug)\s*\]", f)]
    assert any("file.claimed" in e for e in events), frames
    for e in events:   # no log line shares its line with the bar
        assert not re.search(r"\d+/(\d+|\?) lines", e), e
