"""Faults of the machine, met by the real daemon: an outbox that turns read-only or
fills up, a journal on a full disk, a start on a full disk, a folder deleted, a folder
in the way of a manifest. Each is a state the daemon lives through: it says what is
wrong and where (log, ``ttsd status``, systemd STATUS=), stops taking work that would
only fail, retries with back-off, and once the place is writable again finishes with
nothing lost and nothing synthesized twice. ``run --once`` gives up after
``daemon.once_blocked_s`` with exit 75.

Read-only and full file systems are small tmpfs mounts (root only: skipped elsewhere),
unmounted at the end of each test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import FAULTS, TONE, Site, assert_invariant

EXIT_TEMPFAIL = 75


def _can_mount(tmp: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = tmp / "mount-probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


class Tmpfs:
    """A small tmpfs mounted at a folder, to be made read-only or full at will."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(path)], check=True)

    def read_only(self, ro: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(self.path)],
                       check=True)

    def fill(self) -> Path:
        """Fill it up (a file of every free byte); returns the filler."""
        filler = self.path / ".filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            while os.write(fd, bytes(65536)):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        return filler

    def umount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator:
    if not _can_mount(tmp_path):
        pytest.skip("needs root to mount a tmpfs")
    mounted: list[Tmpfs] = []

    def make(path: Path, size: str = "64m") -> Tmpfs:
        fs = Tmpfs(path, size)
        mounted.append(fs)
        return fs

    yield make
    for fs in reversed(mounted):
        fs.umount()


def _events(site: Site, name: str) -> list[dict]:
    out = []
    for line in site.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == name:
                out.append(ev)
    return out


def _wait_for(cond, timeout: float, site: Site, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if site.proc is not None and site.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({site.proc.returncode}):\n{site.logs()}")
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s:\n{site.logs()}")


def _requeued(site: Site) -> int:
    """Lines whose synthesized audio could not be written (and went back to pending)."""
    return sum(int(ev.get("requeued", 0)) for ev in _events(site, "batch.done"))


class _Notify:
    """A socket standing in for systemd's $NOTIFY_SOCKET; keeps every message."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self.got.append(self.sock.recv(65536).decode())
            except socket.timeout:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _lines(n: int) -> str:
    return "".join(f"Line number {i} of the book.\n" for i in range(1, n + 1))


def _each_line_once(site: Site, n: int) -> None:
    rows = site.query("SELECT state, attempts, synth_count FROM lines")
    assert len(rows) == n and all(r == ("done", 1, 1) for r in rows), rows
    assert_invariant(site)


def test_an_outbox_turned_read_only_is_waited_out_without_synthesizing_in_a_loop(
        tmp_path: Path, tmpfs) -> None:
    notify = _Notify(tmp_path / "notify.sock")
    site = Site(tmp_path, env={**TONE, "NOTIFY_SOCKET": str(notify.sock.getsockname())})
    outbox = tmpfs(site.outbox)
    try:
        site.start()
        site.wait_ready()
        outbox.read_only()
        (site.inbox / "book.txt").write_text(_lines(5), encoding="utf-8")
        _wait_for(lambda: _events(site, "site.blocked"), 30, site, "outbox reported blocked")
        blocked = _events(site, "site.blocked")[0]
        assert blocked["level"] == "error" and blocked["place"] == "outbox"
        assert "Read-only" in blocked["error"], blocked
        _wait_for(lambda: site.status()["blocked"], 10, site, "status shows the blockage")
        status = site.status()
        assert status["daemon"]["state"] == "up"
        assert [b["place"] for b in status["blocked"]] == ["outbox"], status["blocked"]
        out = site.cli("status")
        assert "BLOCKED" in out.stdout and "Read-only" in out.stdout, out.stdout
        _wait_for(lambda: any("BLOCKED outbox" in m for m in notify.got), 10, site,
                  "STATUS= says the outbox is blocked")
        # No loop: what was in flight failed once, then nothing is synthesized while
        # the outbox stays read-only (a probe write is tried with back-off instead).
        time.sleep(2)
        first = _requeued(site)
        assert 1 <= first <= 10, first
        time.sleep(6)
        assert _requeued(site) == first
        assert len(_events(site, "site.still_blocked")) <= 4
        outbox.read_only(False)
        t0 = time.monotonic()
        site.wait_files_finished(1, timeout=90)
        # The back-off counts rounds, not the writes of one batch: 1, 2, 4, 8 s…
        assert time.monotonic() - t0 < 20, "the retry came a minute late"
        assert site.status()["blocked"] == []
        assert site.stop() == 0, site.logs()
    finally:
        notify.close()
    assert _events(site, "site.unblocked")
    _each_line_once(site, 5)


def test_once_gives_up_on_an_unwritable_outbox_and_loses_nothing(tmp_path: Path,
                                                                  tmpfs) -> None:
    site = Site(tmp_path, env=TONE,
                extra_config="[daemon]\nonce_blocked_s = 3\n")
    outbox = tmpfs(site.outbox)
    site.write_config()
    site.inbox.mkdir(parents=True)
    (site.inbox / "book.txt").write_text(_lines(3), encoding="utf-8")
    outbox.read_only()
    t0 = time.monotonic()
    out = site.cli("run", "--once", timeout=120)
    assert out.returncode == EXIT_TEMPFAIL, (out.returncode, out.stderr[-3000:])
    assert time.monotonic() - t0 < 60
    tail = out.stderr[out.stderr.rindex("ttsd run --once:"):]
    assert "gave up" in tail and str(site.outbox) in tail and "Read-only" in tail, tail
    assert "Traceback" not in out.stderr
    states = sorted(s for (s,) in site.query("SELECT state FROM lines"))
    assert states == ["pending"] * 3, states          # nothing failed, nothing lost
    outbox.read_only(False)
    again = site.cli("run", "--once", timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    _each_line_once(site, 3)


def test_a_full_outbox_is_waited_out(tmp_path: Path, tmpfs) -> None:
    site = Site(tmp_path, env=TONE)
    outbox = tmpfs(site.outbox, "2m")
    site.start()
    site.wait_ready()
    filler = outbox.fill()
    (site.inbox / "book.txt").write_text(_lines(4), encoding="utf-8")
    _wait_for(lambda: _events(site, "site.blocked"), 30, site, "outbox reported blocked")
    assert "No space" in _events(site, "site.blocked")[0]["error"]
    time.sleep(3)
    assert site.proc.poll() is None
    filler.unlink()
    site.wait_files_finished(1, timeout=90)
    assert site.stop() == 0, site.logs()
    _each_line_once(site, 4)


def test_a_full_journal_is_waited_out(tmp_path: Path, tmpfs) -> None:
    site = Site(tmp_path, env=TONE)
    state = tmpfs(tmp_path / "state", "16m")
    site.start()
    site.wait_ready()
    filler = state.fill()
    (site.inbox / "book.txt").write_text(_lines(4), encoding="utf-8")
    _wait_for(lambda: any(ev["place"] == "state" for ev in _events(site, "site.blocked")), 30,
              site, "journal reported blocked")
    _wait_for(lambda: any(b["place"] == "state" for b in site.status()["blocked"]), 10, site,
              "status shows the journal blocked")
    time.sleep(3)
    assert site.proc.poll() is None
    filler.unlink()
    site.wait_files_finished(1, timeout=90)
    assert site.stop() == 0, site.logs()
    _each_line_once(site, 4)


def test_a_start_on_a_full_disk_waits_instead_of_dying(tmp_path: Path, tmpfs) -> None:
    """The whole site on one volume, full before the daemon starts (a restart while the
    disk is still full): it stays up and says why, then finishes once there is room."""
    site = Site(tmp_path, env=TONE,
                extra_config='[paths]\ninbox = "data/inbox"\noutbox = "data/outbox"\n'
                             'done = "data/done"\nfailed = "data/failed"\nstate = "data/state"\n')
    data = tmpfs(tmp_path / "data", "16m")
    site.write_config()
    (tmp_path / "data" / "inbox").mkdir()
    (tmp_path / "data" / "inbox" / "book.txt").write_text(_lines(3), encoding="utf-8")
    filler = data.fill()
    site.start()
    _wait_for(lambda: _events(site, "site.blocked"), 60, site, "the full disk reported")
    time.sleep(3)
    assert site.proc.poll() is None, site.logs()
    filler.unlink()
    _wait_for(lambda: (tmp_path / "data" / "done" / "book.txt").exists(), 90, site,
              "the file finished")
    assert site.stop() == 0, site.logs()
    conn = sqlite3.connect(tmp_path / "data" / "state" / "ttsd.db")
    rows = conn.execute("SELECT state, synth_count FROM lines").fetchall()
    conn.close()
    assert rows == [("done", 1)] * 3, rows
    assert len(list((tmp_path / "data" / "outbox" / "book").glob("*.wav"))) == 3


def test_an_outbox_deleted_while_working_is_made_again(tmp_path: Path) -> None:
    site = Site(tmp_path, env=FAULTS, extra_config="[batching]\nmax_batch_size = 1\n")
    site.start()
    site.wait_ready()
    (site.inbox / "book.txt").write_text(
        "".join(f"Line {i} of the book. {{{{fault:slow:400}}}}\n" for i in range(1, 6)),
        encoding="utf-8")
    _wait_for(lambda: (site.outbox / "book" / "0001.wav").exists(), 60, site, "a first WAV")
    shutil.rmtree(site.outbox)
    site.wait_files_finished(1, timeout=90)
    assert site.stop() == 0, site.logs()
    rows = site.query("SELECT number, state, synth_count FROM lines ORDER BY number")
    assert all(r[1] == "done" and r[2] == 1 for r in rows), rows
    # The lines written before the folder went are gone with it; the others are there.
    assert (site.outbox / "book" / "manifest.csv").exists()


def test_a_folder_in_the_way_of_a_manifest_is_reported_and_retried(tmp_path: Path) -> None:
    site = Site(tmp_path, env=FAULTS, extra_config="[batching]\nmax_batch_size = 1\n")
    site.start()
    site.wait_ready()
    (site.inbox / "a.txt").write_text("A slow line. {{fault:slow:1500}}\n", encoding="utf-8")
    _wait_for(lambda: site.db.exists() and site.query("SELECT COUNT(*) FROM files")[0][0], 30,
              site, "the file claimed")
    blocker = site.outbox / "a" / "manifest.csv"
    blocker.mkdir(parents=True)
    _wait_for(lambda: _events(site, "site.blocked"), 60, site, "the manifest reported")
    ev = _events(site, "site.blocked")[0]
    assert ev["place"] == "manifests" and "manifest.csv" in ev["error"] + ev["path"], ev
    assert site.proc.poll() is None
    blocker.rmdir()
    site.wait_files_finished(1, timeout=90)
    assert site.stop() == 0, site.logs()
    assert (site.outbox / "a" / "manifest.csv").is_file()
    assert_invariant(site)


def test_a_restart_on_a_full_outbox_synthesizes_nothing_until_there_is_room(
        tmp_path: Path, tmpfs) -> None:
    """Lines waiting when the daemon starts on a full outbox (a restart while the disk
    is still full): the outbox is tried before any line is taken, so nothing is
    synthesized only to fail; each restart under systemd used to redo a batch."""
    site = Site(tmp_path, env=TONE)
    outbox = tmpfs(site.outbox, "2m")
    filler = outbox.fill()
    site.write_config()
    site.inbox.mkdir(parents=True)
    (site.inbox / "book.txt").write_text(_lines(6), encoding="utf-8")
    site.start()
    _wait_for(lambda: _events(site, "site.blocked"), 60, site, "the full outbox reported")
    time.sleep(4)
    assert _events(site, "batch.done") == [], "lines were synthesized into a full outbox"
    filler.unlink()
    site.wait_files_finished(1, timeout=90)
    assert site.stop() == 0, site.logs()
    _each_line_once(site, 6)


def test_an_outbox_that_fills_up_mid_file_backs_off_instead_of_retrying_every_second(
        tmp_path: Path, tmpfs) -> None:
    """A 1 MB outbox filled by the file's own WAVs: room for the probe now and then, not
    for a batch. Each passing probe lets one batch try, and its failure doubles the
    back-off (it used to unblock and fail again every second); once the volume is
    grown every line is done once."""
    site = Site(tmp_path, env=TONE)
    outbox = tmpfs(site.outbox, "1m")
    site.start()
    site.wait_ready()
    (site.inbox / "fill.txt").write_text(
        "".join(f"Filling the outbox with line number {i} and some more words to make it "
                "long.\n" for i in range(1, 201)), encoding="utf-8")
    _wait_for(lambda: _events(site, "site.blocked"), 60, site, "the full outbox reported")
    time.sleep(12)
    assert len(_events(site, "site.unblocked")) <= 1, _events(site, "site.unblocked")
    before = len(_events(site, "batch.done"))
    time.sleep(8)
    assert len(_events(site, "batch.done")) - before <= 1   # one trial at most, not a loop
    subprocess.run(["mount", "-o", "remount,size=100m", str(outbox.path)], check=True)
    site.wait_files_finished(1, timeout=180)
    assert site.stop() == 0, site.logs()
    _each_line_once(site, 200)
