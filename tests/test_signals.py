"""What signals do to the real daemon (README, "Signals"): SIGTERM or SIGINT once, a
warm stop; twice, a stop now that still puts its lines back and leaves nothing behind;
SIGHUP, the config read again (what can change while running changes, the rest is
named as needing a restart) and the inbox looked at again."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from harness import TONE, Site, assert_invariant


def _events(site: Site, name: str) -> list[dict]:
    out = []
    for line in site.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == name:
                out.append(ev)
    return out


def _wait(cond, timeout: float, site: Site, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s:\n{site.logs()}")


def test_a_second_sigterm_stops_now_and_still_releases_what_it_holds(tmp_path: Path) -> None:
    site = Site(tmp_path, env=TONE,
                extra_config="[batching]\nmax_batch_size = 1\n[engine]\nphonemizer_processes = 2\n")
    site.start()
    site.wait_ready()
    lines = [f"A slow line number {i}. {{{{fault:slow:4000}}}}" for i in range(1, 5)]
    (site.inbox / "slow.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _wait(lambda: site.db.exists() and site.query(
        "SELECT COUNT(*) FROM lines WHERE state = 'running'")[0][0] > 0, 60, site, "a line running")
    # A line is 'running' from its claim, before its batch reaches the model: let the
    # model enter its 4 s call, or the first signal's warm stop finishes before the
    # second arrives (the scenario is a second signal while a batch is in the model).
    time.sleep(1.0)
    site.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t0 = time.monotonic()
    status = site.stop(signal.SIGTERM, timeout=30)
    assert time.monotonic() - t0 < 10, "the second signal did not stop it at once"
    assert status == 128 + signal.SIGTERM, (status, site.logs())
    log = site.log.read_text(errors="replace")
    assert "leaked semaphore" not in log and "resource_tracker" not in log, log[-3000:]
    assert site.query("SELECT COUNT(*) FROM lines WHERE state = 'running'") == [(0,)]
    assert _events(site, "daemon.force_stop")
    site.start()
    site.wait_ready()
    site.wait_files_finished(1, timeout=120)
    assert site.stop() == 0, site.logs()
    rows = site.query("SELECT state, synth_count FROM lines")
    assert rows == [("done", 1)] * 4, rows
    assert_invariant(site)


def test_sighup_reads_the_config_again_and_keeps_running(tmp_path: Path) -> None:
    site = Site(tmp_path, env=TONE)
    site.start()
    site.wait_ready()
    site.extra_config = ('[daemon]\nlog_level = "debug"\n[input]\nsettle_s = 0.2\n'
                         "[engine]\nspeed = 1.5\n")
    site.write_config()
    site.proc.send_signal(signal.SIGHUP)
    _wait(lambda: _events(site, "config.reloaded"), 20, site, "the reload")
    assert site.proc.poll() is None, site.logs()
    ev = _events(site, "config.reloaded")[0]
    assert sorted(ev["applied"]) == ["daemon.log_level", "input.settle_s"], ev
    restart = _events(site, "config.restart_needed")
    assert restart and restart[0]["keys"] == ["engine.speed"], restart
    (site.inbox / "a.txt").write_text("After the reload.\n", encoding="utf-8")
    site.wait_files_finished(1)
    assert any(ev.get("level") == "debug" for ev in
               (json.loads(ln) for ln in site.log.read_text().splitlines()
                if ln.startswith("{"))), "the new log level was not applied"
    # A broken config is refused: the daemon goes on with the one it has.
    site.config.write_text("[input]\nsettle_s = -1\n", encoding="utf-8")
    site.proc.send_signal(signal.SIGHUP)
    _wait(lambda: _events(site, "config.reload_failed"), 20, site, "the refused reload")
    assert "settle_s" in _events(site, "config.reload_failed")[0]["error"]
    assert site.proc.poll() is None
    assert site.stop() == 0, site.logs()
    assert_invariant(site)
