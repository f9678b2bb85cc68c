"""SIGTERM mid-batch through the real daemon (docs/reliability.md, sigterm-mid-batch).
notify-protocol, watchdog and unit-hardening are in test_notify.py, test_daemon.py and
test_systemd.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from harness import FAULTS, Site, assert_invariant


def test_sigterm_mid_batch_finishes_it_requeues_the_rest_exit_0(tmp_path: Path) -> None:
    """sigterm-mid-batch: SIGTERM while a slow batch is in the model: that batch finishes and is
    written, batches prepared but not started go back to pending with their attempt
    undone, the exit status is 0; the restart finishes the rest, each line once."""
    site = Site(tmp_path, env=FAULTS,   # batches of 2, the first one too
                extra_config="[batching]\nmax_batch_size = 2\nmax_wait_ms = 5\n"
                             "idle_batch = 1.0\n")
    site.inbox.mkdir(parents=True)
    text = [f"Line {i} {{{{fault:slow:600}}}} here." for i in range(1, 11)]
    (site.inbox / "a.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    site.start()
    site.wait_ready()
    deadline = time.time() + 60
    while site.logs().count("batch.done") < 1:
        assert time.time() < deadline, site.logs()
        time.sleep(0.02)
    time.sleep(0.3)    # the second batch is now inside the model (1.2 s), more prefetched
    running = site.query("SELECT COUNT(*) FROM lines WHERE state='running'")[0][0]
    assert running >= 4, running    # in the model + prefetched behind it
    assert site.stop(signal.SIGTERM) == 0, site.logs()
    states = site.query("SELECT number, state, attempts, synth_count FROM lines ORDER BY number")
    done = [r for r in states if r[1] == "done"]
    assert [r[0] for r in done] == [1, 2, 3, 4], states    # the batch in flight finished
    assert all(r[1] == "pending" and r[2] == 0 for r in states if r[0] > 4), states
    site.start()
    site.wait_ready()
    site.wait_files_finished(1)
    assert site.stop() == 0
    rows = site.query("SELECT state, attempts, synth_count FROM lines")
    assert rows == [("done", 1, 1)] * 10, rows
    assert_invariant(site)
