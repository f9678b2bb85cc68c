"""A damaged journal (``state/ttsd.db``).

Every command that opens it stops with one line naming the file and what to do, exit
status 4 (systemd does not restart on it), and never writes to it. ``ttsd
repair-store`` keeps the damaged copy, rebuilds a journal from the rows SQLite can
still read (one bad page loses only its own rows), and the daemon then finishes the
work without writing again a WAV that is already in the outbox.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import ROOT, TONE, Site, assert_invariant, crash_env

from ttsd.config import PathsConfig
from ttsd.errors import StoreDamagedError
from ttsd.service import repair
from ttsd.store.journal import DONE_AUDIO_US, DONE_CACHED, NewLine, Store, damaged

LINES = 200
"""Lines of the input the real-daemon tests drop: enough for a dozen pages of lines."""


# ---------------------------------------------------------------------- helpers

def garbage(n: int, seed: int = 7) -> bytes:
    """``n`` bytes that are nothing SQLite recognises (the same every run)."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def overwrite(db: Path, offset: int, n: int) -> None:
    with open(db, "r+b") as f:
        f.seek(offset)
        f.write(garbage(n))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint(db: Path) -> None:
    """Move the WAL's pages into the database file (as a clean restart would), so that
    damage written into the file is what SQLite reads."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def quick_check(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return "; ".join(r[0] for r in conn.execute("PRAGMA quick_check"))
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()


def leaf_pages(db: Path, table: str) -> tuple[int, list[int]]:
    """(page size, the table's leaf pages in key order)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [p for (p,) in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path",
            (table,))]
        return size, pages
    finally:
        conn.close()


def root_page(db: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                            (table,)).fetchone()[0]
    finally:
        conn.close()


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        b = buf[at + i]
        if i == 8:
            return (value << 8) | b, at + 9
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, at + i + 1
    raise AssertionError("unreachable")


def rowids_on_page(db: Path, page: int, page_size: int) -> set[int]:
    """The rowids a table leaf page holds, read from the file's bytes (SQLite's file
    format: header at 0, cell pointers from 8; a cell is payload size, rowid, ...)."""
    with open(db, "rb") as f:
        f.seek((page - 1) * page_size)
        buf = f.read(page_size)
    assert buf[0] == 0x0D, f"page {page} is not a table leaf"
    cells = int.from_bytes(buf[3:5], "big")
    ids = set()
    for i in range(cells):
        at = int.from_bytes(buf[8 + 2 * i:10 + 2 * i], "big")
        _size, at = _varint(buf, at)
        ids.add(_varint(buf, at)[0])
    return ids


def fast_site(root: Path) -> Site:
    """A site whose daemon uses the fast stand-in model (a tone, no neural network)."""
    return Site(root, env={**TONE, "PYTHONPATH": str(ROOT)})


def drop(site: Site, name: str = "a.txt", n: int = LINES) -> None:
    site.inbox.mkdir(parents=True, exist_ok=True)
    (site.inbox / name).write_text("".join(f"This is line number {i} of the book.\n"
                                           for i in range(1, n + 1)), encoding="utf-8")


def run_once(site: Site, env: dict | None = None, timeout: float = 300) -> int:
    site.start("--once", env=env)
    return site.proc.wait(timeout=timeout)


def wavs(site: Site) -> dict[str, tuple[int, int]]:
    """Every WAV under the outbox → (inode, mtime_ns)."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in site.outbox.rglob("*.wav")}


def assert_damage_reported(out: subprocess.CompletedProcess, db: Path) -> None:
    assert out.returncode == 4, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"ttsd: the journal {db} is damaged" in out.stderr, out.stderr[-3000:]
    assert "ttsd repair-store" in out.stderr, out.stderr


# ---------------------------------------------------------------------- recognising damage

def test_damaged_tells_damage_from_other_sqlite_errors(tmp_path: Path) -> None:
    """``damaged`` is true for SQLite's "malformed" and "not a database", false for a
    busy lock, a constraint or malformed JSON."""
    bad = tmp_path / "bad.db"
    bad.write_bytes(garbage(8192))
    conn = sqlite3.connect(bad)
    with pytest.raises(sqlite3.DatabaseError) as caught:
        conn.execute("SELECT * FROM sqlite_master").fetchall()
    conn.close()
    assert damaged(caught.value)
    assert damaged(sqlite3.DatabaseError("database disk image is malformed"))
    assert not damaged(sqlite3.OperationalError("database is locked"))
    assert not damaged(sqlite3.OperationalError("malformed JSON"))
    assert not damaged(sqlite3.IntegrityError("UNIQUE constraint failed: lines.id"))
    assert not damaged(ValueError("database disk image is malformed"))


def test_opening_a_file_that_is_not_a_database_names_it(tmp_path: Path) -> None:
    db = tmp_path / "state" / "ttsd.db"
    db.parent.mkdir()
    db.write_bytes(garbage(20000))
    before = digest(db)
    for open_it in (lambda: Store(db), lambda: Store.open_readonly(db)):
        with pytest.raises(StoreDamagedError) as caught:
            open_it()
        assert caught.value.path == db and caught.value.exit_status == 4
        assert str(db) in str(caught.value) and "repair-store" in str(caught.value)
    assert digest(db) == before


# ---------------------------------------------------------------------- salvage, in-process

def _paths(root: Path) -> PathsConfig:
    return PathsConfig(inbox=root / "inbox", outbox=root / "outbox", done=root / "done",
                       failed=root / "failed", state=root / "state")


def _journal(paths: PathsConfig, n: int = 3000) -> dict[int, tuple]:
    """A journal of one queued file (its claimed copy in the work folder) of ``n``
    lines: the first half done, two running, the rest pending. Returns id → row."""
    paths.work.mkdir(parents=True)
    work = paths.work / "book.txt"
    work.write_text("x\n", encoding="utf-8")
    store = Store(paths.db)
    fid = store.add_file("book.txt", work, 2, "0" * 64, paths.outbox / "book")
    store.add_lines(fid, [NewLine(i, f"Line {i} of a book that is long enough to fill pages.",
                                  out_name=f"{i:04d}", name_key=f"{i:04d}", voice="v",
                                  cache_key=f"{i:064x}") for i in range(1, n + 1)])
    store.file_parsed(fid, "txt", n, None)
    with store.tx() as c:
        c.execute("UPDATE lines SET state = 'done', wav = 'outbox/book/' || out_name || '.wav', "
                  "seconds = 0.25 + id / 1000.0, cached = id % 2 WHERE id <= ?", (n // 2,))
        c.execute("UPDATE lines SET state = 'running', attempts = 1 WHERE id IN (?, ?)",
                  (n // 2 + 1, n // 2 + 2))
        c.execute("INSERT INTO cache (key, path, bytes, seconds, created_at, last_used) "
                  "VALUES ('k', 'state/cache/k.wav', 100, 1.5, 0, 0)")
        c.execute("INSERT INTO counters VALUES ('cache_hits', 7)")
    rows = {r[0]: r for r in store.conn.execute("SELECT * FROM lines")}
    store.close()   # the last connection: the WAL goes into the file
    return rows


def _rebuilt(paths: PathsConfig) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{paths.db}?mode=ro", uri=True)


@pytest.mark.parametrize("where", ["leaf", "root"])
def test_one_bad_page_loses_only_its_rows(tmp_path: Path, where: str) -> None:
    """A damaged leaf of the lines table loses exactly the rows on it; a damaged root
    loses the table's rows but not the other tables. Every salvaged row is the same as
    before, running lines are pending again, the done totals equal the salvaged rows'
    sums, the unfinished file goes back to parsing, and the damaged copy is kept."""
    paths = _paths(tmp_path)
    before = _journal(paths)
    page_size, leaves = leaf_pages(paths.db, "lines")
    assert len(leaves) > 10
    if where == "leaf":
        page = leaves[len(leaves) // 3]
        lost = rowids_on_page(paths.db, page, page_size)
        assert lost and max(lost) <= 1500   # done lines
    else:
        page, lost = root_page(paths.db, "lines"), set(before)
    overwrite(paths.db, (page - 1) * page_size, page_size)
    assert quick_check(paths.db) != "ok"
    damaged_bytes = digest(paths.db)

    report = repair.repair(paths, now=time.mktime((2030, 1, 2, 3, 4, 5, 0, 0, -1)))

    assert report.rebuilt and report.damaged_copy is not None
    copy = Path(report.damaged_copy)
    assert copy.name == "ttsd.db.damaged-20300102-030405"
    assert digest(copy) == damaged_bytes
    assert quick_check(paths.db) == "ok"
    conn = _rebuilt(paths)
    after = {r[0]: r for r in conn.execute("SELECT * FROM lines")}
    assert set(after) == set(before) - lost
    state = [c[1] for c in conn.execute("PRAGMA table_info(lines)")].index("state")
    for i, row in after.items():
        want = before[i]
        if want[state] == "running":
            want = (*want[:state], "pending", *want[state + 1:])
        assert row == want, i
    (audio, cached), = conn.execute("SELECT COALESCE(SUM(seconds), 0), COALESCE(SUM(cached), 0) "
                                    "FROM lines WHERE state = 'done'")
    counters = dict(conn.execute("SELECT name, value FROM counters"))
    assert abs(counters[DONE_AUDIO_US] / 1e6 - audio) <= 1e-6 * (len(after) + 1)
    assert counters[DONE_CACHED] == cached
    assert counters["cache_hits"] == 7
    assert conn.execute("SELECT COUNT(*) FROM cache").fetchone()[0] == 1
    assert conn.execute("SELECT state FROM files").fetchall() == [("parsing",)]
    conn.close()
    lines = report.table("lines")
    assert (lines.salvaged, lines.lost) == (len(before) - len(lost), len(lost))
    assert report.salvage.reparse == ["book.txt"]
    text = repair.render(report)
    assert str(copy) in text and f"{len(lost):,} lost" in text


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    before = _journal(paths, 600)
    page_size, leaves = leaf_pages(paths.db, "lines")
    overwrite(paths.db, (leaves[1] - 1) * page_size, page_size)
    listing = sorted(p.name for p in paths.state.iterdir())
    damaged_bytes = digest(paths.db)
    report = repair.repair(paths, dry_run=True)
    assert report.dry_run and not report.rebuilt
    assert sorted(p.name for p in paths.state.iterdir()) == listing
    assert digest(paths.db) == damaged_bytes
    lines = report.table("lines")
    assert 0 < lines.lost < len(before) and lines.salvaged + lines.lost == len(before)
    assert "would" in repair.render(report)


def test_a_sound_journal_is_left_alone(tmp_path: Path) -> None:
    """SQLite's quick_check passes: nothing to repair (``--force`` rebuilds anyway)."""
    paths = _paths(tmp_path)
    _journal(paths, 50)
    sound = digest(paths.db)
    report = repair.repair(paths)
    assert not report.rebuilt and report.problem is None
    assert digest(paths.db) == sound
    assert "nothing to repair" in repair.render(report)
    forced = repair.repair(paths, force=True)
    assert forced.rebuilt and forced.table("lines").salvaged == 50


def test_repair_refuses_while_a_daemon_holds_the_state_folder(tmp_path: Path) -> None:
    """The daemon holds ``state/ttsd.lock`` for its life: repair-store exits 3 naming
    its pid, and renames nothing."""
    site = fast_site(tmp_path)
    site.write_config()
    state = tmp_path / "state"
    state.mkdir()
    (state / "ttsd.db").write_bytes(garbage(9000))
    lock = os.open(state / "ttsd.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(lock, b"43210\n")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = site.cli("repair-store")
    finally:
        os.close(lock)
    assert out.returncode == 3, (out.returncode, out.stderr)
    assert "43210" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert sorted(p.name for p in state.iterdir()) == ["ttsd.db", "ttsd.lock"]


def test_unit_and_cli_say_what_exit_4_means() -> None:
    """systemd does not restart on 4 (a damaged journal) nor on 2 (a config error)."""
    unit = (ROOT / "systemd" / "ttsd.service").read_text(encoding="utf-8")
    codes = [ln.split("=", 1)[1].split() for ln in unit.splitlines()
             if ln.startswith("RestartPreventExitStatus=")]
    assert len(codes) == 1 and {"2", "4"} <= set(codes[0]), codes
    out = subprocess.run([sys.executable, "-m", "ttsd.cli", "--help"], check=False,
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "4" in out.stdout and "journal is damaged" in out.stdout, out.stdout
    assert "repair-store" in out.stdout


# ---------------------------------------------------------------------- the real daemon

def test_damaged_journal_stops_run_status_and_purge_with_exit_4(tmp_path: Path) -> None:
    """Bytes overwritten in the middle of a journal the daemon made. `ttsd run`
    exits 4 at once (before claiming anything), as do `status` and `purge-cache`: one
    line naming the file, no traceback, and the file is not written to."""
    site = fast_site(tmp_path)
    drop(site)
    assert run_once(site) == 0, site.logs()
    assert not (site.db.parent / "ttsd.db-wal").exists()   # clean exit: all in the file
    size = site.db.stat().st_size
    overwrite(site.db, size // 4, size // 2)
    assert quick_check(site.db) != "ok"
    damaged_bytes = digest(site.db)
    drop(site, "b.txt", 3)
    t0 = time.monotonic()
    site.start("--once")
    code = site.proc.wait(timeout=120)
    took = time.monotonic() - t0
    stderr = site.log.read_text(errors="replace")
    assert_damage_reported(subprocess.CompletedProcess([], code, "", stderr), site.db)
    assert took < 30, took
    assert (site.inbox / "b.txt").exists()   # nothing claimed
    for args in (("status",), ("status", "--json"), ("purge-cache", "--all"),
                 ("purge-cache", "--all", "--dry-run")):
        assert_damage_reported(site.cli(*args), site.db)
    assert digest(site.db) == damaged_bytes


def test_the_daemon_checks_the_whole_journal_at_start(tmp_path: Path) -> None:
    """One page in the middle of the lines table damaged, where neither a table's ends
    nor ``status``'s counts look: the daemon (not only --once) refuses to start on it,
    exit 4, before it claims or writes anything (it used to run and write batches into
    the damaged journal)."""
    site = fast_site(tmp_path)
    drop(site, n=2000)
    assert run_once(site) == 0, site.logs()
    size, pages = leaf_pages(site.db, "lines")
    assert len(pages) > 10
    overwrite(site.db, (pages[len(pages) // 2] - 1) * size + 100, 3000)
    assert quick_check(site.db) != "ok"
    damaged_bytes = digest(site.db)
    drop(site, "b.txt", 3)
    site.start()   # the daemon, which would otherwise run on
    code = site.proc.wait(timeout=120)
    stderr = site.log.read_text(errors="replace")
    assert_damage_reported(subprocess.CompletedProcess([], code, "", stderr), site.db)
    assert (site.inbox / "b.txt").exists()   # nothing claimed
    assert digest(site.db) == damaged_bytes


@pytest.mark.parametrize("cache", [True, False])
def test_repair_then_the_daemon_finishes_without_rewriting_wavs(tmp_path: Path,
                                                                cache: bool) -> None:
    """A daemon killed half-way through a file; then a page of its done lines is
    damaged. repair-store keeps the damaged copy and sends the file back to parsing;
    the next run re-reads the claimed copy and finishes: every line done with its WAV,
    the done totals right, and the WAVs already in the outbox untouched (same inode,
    same mtime). With the cache, the lost lines are answered from it (no synthesis);
    without, they are synthesized again and the WAV already at the path is kept."""
    site = fast_site(tmp_path)
    site.extra_config = "" if cache else "[cache]\nenabled = false"
    drop(site)
    assert run_once(site, env=crash_env("after_commit:25")) == 137, site.logs()
    checkpoint(site.db)
    done_before = {n for (n,) in site.query("SELECT number FROM lines WHERE state = 'done'")}
    assert 40 <= len(done_before) < LINES
    page_size, leaves = leaf_pages(site.db, "lines")
    overwrite(site.db, (leaves[1] - 1) * page_size, page_size)
    assert quick_check(site.db) != "ok"
    damaged_bytes = digest(site.db)
    before = wavs(site)
    assert len(before) == len(done_before)

    dry = site.cli("repair-store", "--dry-run")
    assert dry.returncode == 0 and "would" in dry.stdout, dry.stdout + dry.stderr
    assert digest(site.db) == damaged_bytes
    assert not list(site.db.parent.glob("ttsd.db.damaged-*"))

    out = site.cli("repair-store")
    assert out.returncode == 0, out.stdout + out.stderr
    copy, = (c for c in site.db.parent.glob("ttsd.db.damaged-*")
             if not c.name.endswith(("-wal", "-shm")))
    assert digest(copy) == damaged_bytes and str(copy) in out.stdout, out.stdout
    assert quick_check(site.db) == "ok"
    kept = {n for (n,) in site.query("SELECT number FROM lines")}
    lost = set(range(1, LINES + 1)) - kept
    assert lost and lost <= done_before, sorted(lost)
    assert site.query("SELECT state FROM files") == [("parsing",)]

    assert run_once(site) == 0, site.logs()
    assert_invariant(site)
    rows = dict(site.query("SELECT number, state FROM lines"))
    assert set(rows) == set(range(1, LINES + 1)) and set(rows.values()) == {"done"}
    answered = site.query("SELECT number, cached, synth_count FROM lines WHERE number IN "
                          f"({','.join(map(str, sorted(lost)))})")
    want = (1, 0) if cache else (0, 1)   # (cached, synth_count)
    assert all((cached, synth) == want for _n, cached, synth in answered), answered
    after = wavs(site)
    for path, ident in before.items():
        assert after.get(path) == ident, f"{path} was written again"
    assert digest(copy) == damaged_bytes


def test_repair_of_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """A journal overwritten whole (not a database at all): `run` exits 4; repair keeps
    it and starts a fresh journal; the next run adopts the claimed copy left in the
    work folder and finishes it."""
    site = fast_site(tmp_path)
    drop(site, n=3)
    assert run_once(site, env=crash_env("after_claim")) == 137, site.logs()
    assert len(list((tmp_path / "state" / "work").iterdir())) == 1
    site.db.write_bytes(garbage(site.db.stat().st_size or 4096))
    for extra in ("-wal", "-shm"):
        Path(f"{site.db}{extra}").unlink(missing_ok=True)
    damaged_bytes = digest(site.db)
    code = run_once(site, timeout=120)
    assert_damage_reported(subprocess.CompletedProcess([], code, "", site.logs()), site.db)

    out = site.cli("repair-store")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "not a database" in out.stdout and "work" in out.stdout, out.stdout
    copy, = site.db.parent.glob("ttsd.db.damaged-*")
    assert digest(copy) == damaged_bytes

    assert run_once(site) == 0, site.logs()
    assert_invariant(site)
    assert site.query("SELECT COUNT(*) FROM lines WHERE state = 'done'") == [(3,)]
