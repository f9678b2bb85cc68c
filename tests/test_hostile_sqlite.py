"""The SQLite store's settings and a state folder the daemon cannot write (reading
and purging beside a writer are in test_status.py and test_purge.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT, Site, assert_invariant

from ttsd.store.journal import Store


def test_store_settings_wal_full_sync_busy_timeout(tmp_path: Path) -> None:
    """Every read-write connection (one per daemon thread) is in WAL mode with
    synchronous=FULL and busy_timeout >= 5000 ms, and writes use BEGIN IMMEDIATE; the
    database file the daemon leaves is a WAL database (header bytes 18-19 = 2)."""
    site = Site(tmp_path)
    site.start()
    site.wait_ready()
    (site.inbox / "a.txt").write_text("One line.\n", encoding="utf-8")
    site.wait_files_finished(1)
    assert site.stop() == 0
    assert_invariant(site)
    header = site.db.read_bytes()[:20]
    assert header[18] == 2 and header[19] == 2, header          # WAL read/write versions
    for _ in range(2):   # a fresh connection, as each daemon thread opens one
        store = Store(site.db)
        conn = store.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
        assert conn.isolation_level is None   # no implicit BEGIN (DEFERRED) from sqlite3
        traced: list[str] = []
        conn.set_trace_callback(traced.append)
        store.heartbeat(1, 0.0, "test", {})
        assert traced[0] == "BEGIN IMMEDIATE", traced
        store.close()


def _readonly_state_run(site: Site, *, prepare) -> subprocess.CompletedProcess:
    """Run `ttsd run --once` with the state folder bind-mounted read-only in a private
    mount namespace (as root, chmod alone does not stop writes)."""
    state = site.root / "state"
    state.mkdir(parents=True, exist_ok=True)
    prepare(state)
    site.write_config()
    site.inbox.mkdir(parents=True, exist_ok=True)
    script = (f"mount --bind {state} {state} && mount -o remount,ro,bind {state} && "
              f"exec {sys.executable} -m ttsd.cli --config {site.config} run --once")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=site.root, text=True,
                          capture_output=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -m (root or user namespaces)")
@pytest.mark.parametrize("existing_db", [False, True])
def test_readonly_state_folder_is_a_clear_error_at_start(tmp_path: Path,
                                                          existing_db: bool) -> None:
    """A read-only state folder (empty, or holding a database from an earlier
    run) stops `ttsd run` at start with one clear line naming the folder - exit 2, no
    traceback - before any input is claimed (WAL needs to create files beside the DB)."""
    site = Site(tmp_path)

    def prepare(state: Path) -> None:
        if existing_db:
            Store(state / "ttsd.db").close()
            for p in state.iterdir():
                if p.name != "ttsd.db":
                    p.unlink()

    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "a.txt").write_text("Hello.\n", encoding="utf-8")
    out = _readonly_state_run(site, prepare=prepare)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert str(tmp_path / "state") in out.stderr and "writ" in out.stderr, out.stderr
    assert (tmp_path / "inbox" / "a.txt").exists()          # nothing claimed
