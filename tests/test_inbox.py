"""Inbox: watching, stability, claiming and reading (docs/reliability.md: huge-file,
appended-after-claim and the arrival cases)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent

import ttsd.ingest.inbox as inbox_mod
import ttsd.ingest.watch as watch_mod
from ttsd.config import InputConfig
from ttsd.errors import InputError
from ttsd.ingest.inbox import Claimed, Inbox, Rejected, claimed_name, human_bytes
from ttsd.ingest.names import eligible_name
from ttsd.ingest.watch import FileState, Seen, settled

SETTLE = 0.2


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test must stop what it started: no observer thread outlives it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.02)
    raise AssertionError(f"threads leaked: {extra}")


def make(tmp_path: Path, **kw: object) -> Inbox:
    kw.setdefault("settle_s", SETTLE)
    kw.setdefault("rescan_s", 30.0)
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return Inbox(tmp_path / "inbox", tmp_path / "work", InputConfig(**kw))  # type: ignore[arg-type]


def wait_for(ib: Inbox, want: Callable[[list[Path]], bool], timeout: float = 5.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        got = ib.ready()
        if want(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last ready() = {got}")
        time.sleep(0.03)


def run_with_timeout(fn: Callable[[], object], timeout: float = 5.0) -> object:
    """Run ``fn`` in a daemon thread; fail (instead of hanging) if it blocks."""
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked (a FIFO opened in blocking mode?)"
    return box[0]


# -- pure helpers ----------------------------------------------------------------------


def test_settled_restarts_on_any_change() -> None:
    """writer-still-writing: stable = (size, mtime_ns, inode) unchanged for settle_s; any change
    restarts."""
    a = FileState(10, 1000, 7)
    seen, ok = settled(None, a, 1.0, now=100.0)
    assert seen == Seen(a, 100.0) and not ok
    seen, ok = settled(seen, a, 1.0, now=100.5)
    assert not ok and seen.since == 100.0
    seen, ok = settled(seen, a, 1.0, now=101.0)
    assert ok
    for changed in (FileState(11, 1000, 7), FileState(10, 1001, 7), FileState(10, 1000, 8)):
        again, ok = settled(seen, changed, 1.0, now=101.0)
        assert not ok and again.since == 101.0
    assert settled(None, a, 0.0, now=5.0)[1], "settle_s = 0 means ready on first sight"


def test_eligible_names() -> None:
    """temp-then-rename: hidden, temp, partial and editor names wait to be renamed; suffixes ignore
    case."""
    sfx = (".txt", ".csv")
    for ok in ("a.txt", "B.TXT", "prompts.csv", "x y.Csv"):
        assert eligible_name(ok, sfx), ok
    for bad in (".x.txt", ".x.tmp", "x.txt.tmp", "x.txt.part", "x.txt~", ".x.txt.swp",
                "x.txt.swp", "x.wav", "x", "x.TMP", "txt"):
        assert not eligible_name(bad, sfx), bad


def test_human_bytes_and_claimed_name() -> None:
    """huge-file: the size in a rejection reads like a person wrote it."""
    assert human_bytes(5 * 1024**3) == "5.0 GiB"
    assert human_bytes(256 * 1024**2) == "256.0 MiB"
    assert human_bytes(12) == "12 B"
    assert claimed_name(Path("work/0123456789abcdef--chapter1.txt")) == "chapter1.txt"
    assert claimed_name(Path("work/a--b.txt")) == "a--b.txt"


# -- arrival and watching --------------------------------------------------------------


def test_file_still_being_written_is_not_ready(tmp_path: Path) -> None:
    """writer-still-writing: a file written in chunks while held open is ready only once stable; one
    claim with the full content."""
    ib = make(tmp_path, settle_s=0.3)
    path = tmp_path / "inbox" / "book.txt"
    chunk = b"hello world, this is a line\n" * 3745  # ~100 KB
    finished = threading.Event()

    def writer() -> None:
        with open(path, "wb") as f:
            for _ in range(10):
                f.write(chunk)
                f.flush()
                time.sleep(0.1)
        finished.set()

    with ib:
        t = threading.Thread(target=writer)
        t.start()
        try:
            while True:
                was_finished = finished.is_set()
                got = ib.ready()
                if path in got:
                    assert was_finished, "ready() returned a file that was still being written"
                    break
                time.sleep(0.03)
        finally:
            t.join()
        claimed = ib.claim(path)
    assert isinstance(claimed, Claimed)
    assert claimed.size == len(chunk) * 10
    assert claimed.sha256 == hashlib.sha256(chunk * 10).hexdigest()
    assert ib.read(claimed) == chunk * 10


def test_temp_names_wait_for_rename(tmp_path: Path) -> None:
    """temp-then-rename: .x.tmp / *.part are ignored; the rename's target is processed once."""
    ib = make(tmp_path)
    inbox = tmp_path / "inbox"
    with ib:
        ib.ready()
        (inbox / ".x.tmp").write_text("one\ntwo\n")
        (inbox / "y.txt.part").write_text("partial")
        time.sleep(SETTLE + 0.1)
        assert ib.ready() == []
        os.rename(inbox / ".x.tmp", inbox / "x.txt")
        got = wait_for(ib, bool)
        assert got == [inbox / "x.txt"]
        claimed = ib.claim(got[0])
        assert isinstance(claimed, Claimed) and claimed.name == "x.txt"
        time.sleep(SETTLE + 0.1)
        assert ib.ready() == []
    assert (inbox / "y.txt.part").exists()


def test_startup_scan_takes_files_dropped_while_down(tmp_path: Path) -> None:
    """dropped-while-down: 50 files present before start() are all found by the start-up scan."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(50):
        (inbox / f"f{i:02d}.txt").write_text(f"line {i}\n")
    ib = make(tmp_path)
    with ib:
        assert ib.ready() == []  # seen, not settled yet
        assert ib.pending() == 50
        got = wait_for(ib, lambda g: len(g) == 50)
        claims = [ib.claim(p) for p in got]
    assert all(isinstance(c, Claimed) for c in claims)
    assert sorted(c.name for c in claims if c) == [f"f{i:02d}.txt" for i in range(50)]
    assert ib.pending() == 0 and list(inbox.iterdir()) == []


def test_lost_events_are_found_by_rescan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lost-events: with the handler dropping every event, the periodic rescan finds the files."""
    ib = make(tmp_path, rescan_s=0.6)
    inbox = tmp_path / "inbox"
    with ib:
        monkeypatch.setattr(ib._events, "add", lambda path: None)
        assert ib.ready() == []  # first call: full scan of an empty inbox
        for i in range(3):
            (inbox / f"lost{i}.txt").write_text("x\n")
        assert ib.ready() == [] and ib.pending() == 0  # no event, no rescan yet
        got = wait_for(ib, lambda g: len(g) == 3)
    assert {p.name for p in got} == {"lost0.txt", "lost1.txt", "lost2.txt"}


def test_inotify_overflow_triggers_rescan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lost-events: watchdog's IN_Q_OVERFLOW warning is logged by ttsd and forces a rescan now."""
    ib = make(tmp_path, rescan_s=600.0)
    inbox = tmp_path / "inbox"
    with ib:
        monkeypatch.setattr(ib._events, "add", lambda path: None)
        ib.ready()
        (inbox / "a.txt").write_text("x\n")
        assert ib.ready() == [] and ib.pending() == 0
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost")
        with capture_logs() as logs:
            ib.ready()
        assert any(e["event"] == "inbox.overflow" for e in logs)
        assert ib.pending() == 1
        assert wait_for(ib, bool, timeout=2) == [inbox / "a.txt"]


def test_polling_from_config(tmp_path: Path) -> None:
    """inotify-unavailable: input.polling = true uses the polling observer (NFS/CIFS) and still sees
    files."""
    ib = make(tmp_path, polling=True, rescan_s=600.0)
    with ib:
        assert ib.mode == "polling"
        ib.ready()
        (tmp_path / "inbox" / "nfs.txt").write_text("x\n")
        assert wait_for(ib, bool) == [tmp_path / "inbox" / "nfs.txt"]
    assert ib.mode == "stopped"


def test_inotify_enospc_falls_back_to_polling(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify-unavailable: observer.start raising OSError(ENOSPC) → polling, a clear warning, no
    crash."""
    def no_watches(self: object) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watch_mod.Observer, "start", no_watches)
    ib = make(tmp_path, rescan_s=600.0)
    with capture_logs() as logs:
        ib.start()
    try:
        assert ib.mode == "polling"
        warn = [e for e in logs if e["event"] == "inbox.inotify_failed"]
        assert warn and warn[0]["log_level"] == "warning" and "max_user_watches" in warn[0]["error"]
        ib.ready()
        (tmp_path / "inbox" / "a.txt").write_text("x\n")
        assert wait_for(ib, bool) == [tmp_path / "inbox" / "a.txt"]
    finally:
        ib.stop()


def test_no_observer_at_all_still_finds_files(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify-unavailable: if polling fails too, start() does not raise; ready() rescans every
    second."""
    def broken(self: object) -> None:
        raise OSError(errno.EIO, "broken")

    monkeypatch.setattr(watch_mod.Observer, "start", broken)
    monkeypatch.setattr(watch_mod.PollingObserverVFS, "start", broken)
    ib = make(tmp_path, rescan_s=600.0)
    with ib:
        assert ib.mode == "rescan-only"
        ib.ready()
        (tmp_path / "inbox" / "a.txt").write_text("x\n")
        assert wait_for(ib, bool, timeout=4) == [tmp_path / "inbox" / "a.txt"]


def claim_race(ib: Inbox, path: Path) -> list[object]:
    """Two threads claim ``path`` at the same instant; returns both results."""
    barrier = threading.Barrier(2)
    results: list[object] = []
    lock = threading.Lock()

    def claimer() -> None:
        barrier.wait()
        r = ib.claim(path)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=claimer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_duplicate_events_and_claims_give_one_claim(tmp_path: Path) -> None:
    """duplicate-events: created + modified x5 + closed from 2 threads → one ready path;
    two threads claiming it at once → exactly one Claimed, the other None."""
    ib = make(tmp_path)
    inbox = tmp_path / "inbox"
    path = inbox / "dup.txt"
    path.write_text("hello\n")
    ib.ready()

    def fire() -> None:
        for ev in [FileCreatedEvent(str(path))] + [FileModifiedEvent(str(path))] * 5 + [
                FileClosedEvent(str(path))]:
            ib._handler.dispatch(ev)

    threads = [threading.Thread(target=fire) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wait_for(ib, bool) == [path]

    for round_ in range(30):
        p = inbox / f"race{round_}.txt"
        p.write_text("x\n")
        results = claim_race(ib, p)
        assert sum(isinstance(r, Claimed) for r in results) == 1, results
        assert results.count(None) == 1, results
    assert len(list((tmp_path / "work").iterdir())) == 30


def test_deleted_between_event_and_claim(tmp_path: Path) -> None:
    """deleted-mid-flight: unlinked or renamed away before the claim → None, a debug log, nothing
    owned."""
    ib = make(tmp_path, settle_s=0.0)
    inbox = tmp_path / "inbox"
    (inbox / "gone.txt").write_text("x\n")
    (inbox / "moved.txt").write_text("x\n")
    got = ib.ready()
    assert len(got) == 2
    os.unlink(inbox / "gone.txt")
    os.rename(inbox / "moved.txt", tmp_path / "elsewhere.txt")
    with capture_logs() as logs:
        assert ib.claim(inbox / "gone.txt") is None
        assert ib.claim(inbox / "moved.txt") is None
    assert [e["log_level"] for e in logs if e["event"] == "inbox.vanished"] == ["debug", "debug"]
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []
    assert ib.ready() == []


def test_after_claim_only_the_owned_copy_is_read(tmp_path: Path) -> None:
    """deleted-mid-flight: a new file dropped under the same name after the claim is not what we
    read."""
    ib = make(tmp_path, settle_s=0.0)
    path = tmp_path / "inbox" / "same.txt"
    path.write_text("original\n")
    claimed = ib.claim(path)
    assert isinstance(claimed, Claimed)
    assert claimed.path.parent == tmp_path / "work" and claimed.path.name.endswith("--same.txt")
    path.write_text("impostor\n")
    assert ib.read(claimed) == b"original\n"


def test_symlink_hardlink_fifo_directory_rejected(tmp_path: Path) -> None:
    """not-a-regular-file: symlink (to /etc/hostname and to a FIFO), hard link, FIFO and a directory
    named x.txt: never followed or blocked on; rejected with a reason; the dir is ignored."""
    ib = make(tmp_path, settle_s=0.0)
    inbox = tmp_path / "inbox"
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret\n")
    os.symlink("/etc/hostname", inbox / "a.txt")
    os.link(outside, inbox / "b.txt")
    os.mkfifo(inbox / "c.txt")
    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "pipe", inbox / "e.txt")
    os.symlink(tmp_path / "nowhere", inbox / "f.txt")
    (inbox / "d.txt").mkdir()

    got = run_with_timeout(ib.ready)
    assert {p.name for p in got} == {"a.txt", "b.txt", "c.txt", "e.txt", "f.txt"}  # type: ignore[union-attr]
    results = {p.name: run_with_timeout(lambda p=p: ib.claim(p)) for p in got}  # type: ignore[union-attr]
    for r in results.values():
        assert isinstance(r, Rejected), r
        assert r.path.parent == tmp_path / "work", "rejected files leave the inbox"
    assert "symbolic link" in results["a.txt"].reason  # type: ignore[union-attr]
    assert "regular files" in results["a.txt"].reason  # type: ignore[union-attr]
    assert os.path.islink(results["a.txt"].path)  # type: ignore[union-attr]
    assert "2 hard links" in results["b.txt"].reason  # type: ignore[union-attr]
    assert "FIFO" in results["c.txt"].reason  # type: ignore[union-attr]
    assert "symbolic link" in results["e.txt"].reason  # type: ignore[union-attr]
    assert "symbolic link" in results["f.txt"].reason  # type: ignore[union-attr]
    assert outside.read_text() == "top secret\n"
    assert run_with_timeout(lambda: ib.claim(inbox / "d.txt")) is None
    assert (inbox / "d.txt").is_dir()
    assert sorted(p.name for p in inbox.iterdir()) == ["d.txt"]


def test_unreadable_file_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """not-a-regular-file: a file ttsd may not open is rejected with the OS's reason, not a
    crash."""
    ib = make(tmp_path, settle_s=0.0)
    path = tmp_path / "inbox" / "locked.txt"
    path.write_text("x\n")
    path.chmod(0)
    real_open = os.open

    def deny(p: object, flags: int, *args: object, **kw: object) -> int:
        if str(p).endswith("--locked.txt"):  # as root, chmod 0 alone does not stop us
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(inbox_mod.os, "open", deny)
    r = ib.claim(path)
    assert isinstance(r, Rejected) and "cannot be read" in r.reason


@pytest.mark.usefixtures("frozen_heap")
def test_huge_sparse_file_rejected_on_stat(tmp_path: Path) -> None:
    """huge-file: a 5 GB sparse file is rejected from its size alone; memory stays flat."""
    ib = make(tmp_path, settle_s=0.0)
    path = tmp_path / "inbox" / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(5 * 1024**3)
    assert ib.ready() == [path]
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        r = ib.claim(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(r, Rejected)
    assert r.reason == "is 5.0 GiB, over input.max_file_bytes (256.0 MiB)"
    assert peak < 2 * 1024**2 and time.monotonic() - t0 < 1.0


def test_limit_checked_while_hashing(tmp_path: Path) -> None:
    """huge-file: max_file_bytes also holds when the file is exactly at / just over the limit."""
    ib = make(tmp_path, settle_s=0.0, max_file_bytes=1000)
    ok, big = tmp_path / "inbox" / "ok.txt", tmp_path / "inbox" / "big.txt"
    ok.write_bytes(b"a" * 1000)
    big.write_bytes(b"a" * 1001)
    assert isinstance(ib.claim(ok), Claimed)
    r = ib.claim(big)
    assert isinstance(r, Rejected) and "over input.max_file_bytes" in r.reason


def test_append_after_claim_raises_on_read(tmp_path: Path) -> None:
    """appended-after-claim: appended (through a writer's fd held since before the claim) or
    rewritten
    in place after the claim → InputError "file changed while being read"."""
    ib = make(tmp_path, settle_s=0.0)
    path = tmp_path / "inbox" / "grow.txt"
    with open(path, "wb") as f:
        f.write(b"first\n")
        f.flush()
        claimed = ib.claim(path)
        assert isinstance(claimed, Claimed) and claimed.size == 6
        f.write(b"second\n")
    with pytest.raises(InputError, match="file changed while being read"):
        ib.read(claimed)

    path2 = tmp_path / "inbox" / "same_size.txt"
    path2.write_bytes(b"aaaa\n")
    c2 = ib.claim(path2)
    assert isinstance(c2, Claimed)
    st = c2.path.stat()
    c2.path.write_bytes(b"bbbb\n")  # same size, same inode
    os.utime(c2.path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: the hash tells
    assert c2.path.stat().st_mtime == c2.mtime
    with pytest.raises(InputError, match="file changed while being read"):
        ib.read(c2)


def test_orphans_and_adopt_after_crash(tmp_path: Path) -> None:
    """kill-9 and dropped-while-down: a claim left in the work folder is listed by a new Inbox and
    re-adopted."""
    ib = make(tmp_path, settle_s=0.0)
    path = tmp_path / "inbox" / "chapter1.txt"
    path.write_text("a\nb\n")
    claimed = ib.claim(path)
    assert isinstance(claimed, Claimed)
    fresh = make(tmp_path, settle_s=0.0)
    assert fresh.orphans() == [claimed.path]
    again = fresh.adopt(claimed.path)
    assert isinstance(again, Claimed)
    assert again.name == "chapter1.txt" and again.sha256 == claimed.sha256


def test_cross_device_work_folder_falls_back_inside_inbox(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify-unavailable and duplicate-events: work folder on another filesystem (EXDEV) → claim
    into inbox/.ttsd-work,
    still one atomic rename; the fallback folder is hidden from the scan."""
    real_rename = os.rename
    work = str(tmp_path / "work")

    def rename(src: object, dst: object) -> None:
        if str(dst).startswith(work):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(inbox_mod.os, "rename", rename)
    ib = make(tmp_path, settle_s=0.0)
    path = tmp_path / "inbox" / "nfs.txt"
    path.write_text("x\n")
    c = ib.claim(path)
    assert isinstance(c, Claimed) and c.path.parent == tmp_path / "inbox" / ".ttsd-work"
    assert ib.ready() == []
    assert ib.orphans() == [c.path]


def test_claim_refuses_paths_outside_the_inbox(tmp_path: Path) -> None:
    """Invariant 4: claim() never renames anything that is not directly in the inbox."""
    ib = make(tmp_path)
    (tmp_path / "inbox" / "sub").mkdir()
    for p in (tmp_path / "x.txt", tmp_path / "inbox" / "sub" / "x.txt",
              tmp_path / "inbox" / ".." / "x.txt"):
        with pytest.raises(ValueError):
            ib.claim(p)


def test_long_name_claimed(tmp_path: Path) -> None:
    """long-name: a 250-byte inbox name still fits under the 16-hex work prefix."""
    ib = make(tmp_path, settle_s=0.0)
    name = "é" * 123 + ".txt"
    (tmp_path / "inbox" / name).write_text("x\n")
    c = ib.claim(tmp_path / "inbox" / name)
    assert isinstance(c, Claimed) and c.name == name
    assert len(os.fsencode(c.path.name)) <= 255 and c.path.name.endswith(".txt")


def test_unmovable_file_is_not_retried_until_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify-unavailable and not-a-regular-file: when the claim's rename fails (e.g. EACCES on the
    inbox), the file is
    Rejected in place and not returned again until it changes: no busy retry loop."""
    real_rename = os.rename
    denied = True

    def rename(src: object, dst: object) -> None:
        if denied:
            raise PermissionError(errno.EACCES, "Permission denied")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(inbox_mod.os, "rename", rename)
    ib = make(tmp_path, settle_s=0.0)
    path = tmp_path / "inbox" / "stuck.txt"
    path.write_text("x\n")
    assert ib.ready() == [path]
    r = ib.claim(path)
    assert isinstance(r, Rejected) and r.path == path and "Permission denied" in r.reason
    assert ib.ready() == [] and ib.ready(now=time.monotonic() + 3600) == []
    denied = False
    path.write_text("x\ny\n")
    assert ib.ready() == [path]
    assert isinstance(ib.claim(path), Claimed)
