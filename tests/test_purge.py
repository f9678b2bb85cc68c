"""``ttsd purge-cache``: options, LRU order, dry run, missing and tampered files, and
purging while another connection holds the write lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ttsd.config import PathsConfig
from ttsd.errors import ConfigError
from ttsd.service.purge import PurgeReport, parse_age, parse_size, purge, render
from ttsd.store.journal import Store

DAY = 86400.0


def make_paths(tmp_path: Path) -> PathsConfig:
    return PathsConfig(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox",
                       done=tmp_path / "done", failed=tmp_path / "failed",
                       state=tmp_path / "state")


def add_entry(store: Store, paths: PathsConfig, key: str, size: int,
              last_used: float | None = None, path: Path | str | None = None) -> Path:
    """A cache row (through Store.complete) and its file under paths.cache."""
    file = paths.cache / key[:2] / f"{key}.wav"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b"R" * size)
    store.complete([], [], [{"key": key, "path": str(path if path is not None else file),
                             "bytes": size, "seconds": 1.0, "voice": "v"}], None, {})
    if last_used is not None:
        store.conn.execute("UPDATE cache SET last_used = ? WHERE key = ?", (last_used, key))
    return file


def keys(store: Store) -> set[str]:
    return {r.key for r in store.cache_entries()}


@pytest.fixture()
def paths(tmp_path: Path) -> PathsConfig:
    return make_paths(tmp_path)


@pytest.fixture()
def store(paths: PathsConfig) -> Store:
    s = Store(paths.db)
    yield s
    s.close()


# ---------------------------------------------------------------------- options

@pytest.mark.parametrize("text, seconds", [
    ("30d", 30 * DAY), ("12h", 12 * 3600), ("90m", 90 * 60), ("45s", 45), ("2w", 14 * DAY),
    ("1.5h", 5400), ("1h30m", 5400), (" 7D ", 7 * DAY), ("0s", 0),
])
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "-1d", "1e3d", "nan", "30 days", "1d!"])
def test_parse_age_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="unit"):
        parse_age(text)


@pytest.mark.parametrize("text, size", [
    ("2GB", 2_000_000_000), ("500MB", 500_000_000), ("100k", 100_000), ("100kB", 100_000),
    ("1.5GiB", 1_610_612_736), ("64MiB", 64 * 2**20), ("1KiB", 1024), ("4096", 4096),
    ("0", 0), ("2 gb", 2_000_000_000), ("1TB", 10**12), ("12B", 12),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "2 GBs", "1e9", "2XB", "two"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="unit"):
        parse_size(text)


def test_decimal_and_binary_sizes_differ() -> None:
    """GB is 10^9 bytes and GiB 2^30, as --max-size's help says."""
    assert parse_size("2GB") == 2 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("2 gib") == parse_size("2GiB") and parse_size("2gb") == parse_size("2GB")
    assert "2GB is 2*10^9 bytes, 2GiB 2*2^30" in " ".join(_cli("purge-cache", "--help").split())


def _cli(*args: str, config: Path | None = None) -> str:
    cmd = [sys.executable, "-m", "ttsd.cli"]
    if config is not None:
        cmd += ["--config", str(config)]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


@pytest.mark.parametrize("size, removed", [("2kB", 2), ("2KiB", 1)])
def test_max_size_on_the_command_line_reads_both_units(paths: PathsConfig, store: Store,
                                                       tmp_path: Path, size: str,
                                                       removed: int) -> None:
    """Three entries of 1,010 bytes: 2kB (2,000 bytes) keeps one, 2KiB (2,048) two."""
    for i, key in enumerate(("k1", "k2", "k3")):
        add_entry(store, paths, key, 1010, last_used=100.0 + i)
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nstate = "{paths.state}"\n', encoding="utf-8")
    got = json.loads(_cli("purge-cache", "--max-size", size, "--json", config=config))
    assert (got["removed"], got["kept"]) == (removed, 3 - removed)
    assert keys(store) == {"k1", "k2", "k3"}.difference(["k1", "k2"][:removed])
    text = _cli("purge-cache", "--all", "--dry-run", config=config)
    assert text.startswith(f"would remove {3 - removed} cache entries, would free "
                           f"{'1010 B' if removed == 2 else '2.0 KiB'}"), text


def test_option_errors_are_user_errors(paths: PathsConfig) -> None:
    """Raised as ValueError and as ConfigError (a TtsdError the CLI prints plainly)."""
    with pytest.raises(ConfigError, match="--all, --older-than or --max-size"):
        purge(paths)
    with pytest.raises(ValueError, match="--all, --older-than or --max-size"):
        purge(paths, dry_run=True)
    with pytest.raises(ValueError, match="older-than"):
        purge(paths, older_than_s=-1)
    with pytest.raises(ValueError, match="max-size"):
        purge(paths, max_bytes=-5)


# ---------------------------------------------------------------------- purge

def test_no_store_nothing_to_do(paths: PathsConfig) -> None:
    report = purge(paths, all=True)
    assert report == PurgeReport()
    assert not paths.db.exists() and not paths.state.exists()


def test_all_removes_rows_and_files(paths: PathsConfig, store: Store) -> None:
    files = [add_entry(store, paths, f"{i:02x}key{i}", 100 + i) for i in range(5)]
    report = purge(paths, all=True)
    assert (report.removed, report.freed_bytes, report.kept, report.kept_bytes) == (5, 510, 0, 0)
    assert report.missing_files == report.refused == 0
    assert keys(store) == set()
    assert not any(f.exists() for f in files)
    assert paths.cache.is_dir()  # the folder itself stays


def test_older_than(paths: PathsConfig, store: Store) -> None:
    now = 1_000_000_000.0
    for name, age in (("aa1", 1), ("bb10", 10), ("cc40", 40), ("dd90", 90)):
        add_entry(store, paths, name, 10, last_used=now - age * DAY)
    report = purge(paths, older_than_s=parse_age("30d"), now=now)
    assert report.removed == 2 and report.freed_bytes == 20
    assert (report.kept, report.kept_bytes) == (2, 20)
    assert keys(store) == {"aa1", "bb10"}
    assert not (paths.cache / "cc" / "cc40.wav").exists()
    assert (paths.cache / "bb" / "bb10.wav").exists()


def test_max_size_removes_least_recently_used_first(paths: PathsConfig, store: Store) -> None:
    # inserted in one order, used in another: LRU follows last_used, not insertion
    used = {"k1": 400.0, "k2": 100.0, "k3": 300.0, "k4": 200.0}
    for key, at in used.items():
        add_entry(store, paths, key, 100, last_used=at)
    report = purge(paths, max_bytes=250, now=1000.0)
    assert report.removed == 2 and report.freed_bytes == 200
    assert (report.kept, report.kept_bytes) == (2, 200)
    assert keys(store) == {"k1", "k3"}
    assert purge(paths, max_bytes=200).removed == 0  # already within the bound
    assert purge(paths, max_bytes=0).removed == 2


def test_options_combine_as_a_union(paths: PathsConfig, store: Store) -> None:
    now = 10 * DAY
    for i, age in enumerate((9, 5, 3, 1)):  # 900 … 100 bytes, oldest largest
        add_entry(store, paths, f"k{i}", (9 - 2 * i) * 100, last_used=now - age * DAY)
    # --older-than 4d alone takes k0 and k1; --max-size 1500 alone takes k0 only
    report = purge(paths, older_than_s=4 * DAY, max_bytes=1500, now=now, dry_run=True)
    assert report.removed == 2
    # --max-size 300 alone takes k0, k1, k2; --older-than 8d alone takes k0
    report = purge(paths, older_than_s=8 * DAY, max_bytes=300, now=now)
    assert report.removed == 3 and keys(store) == {"k3"}


def test_many_entries_across_pages_with_tied_timestamps(paths: PathsConfig,
                                                         store: Store) -> None:
    """More entries than one page; many share a last_used (rowid breaks the tie)."""
    rows = [{"key": f"{i:04x}{i}", "path": str(paths.cache / f"{i:04x}.wav"), "bytes": 10,
             "seconds": 1.0, "voice": "v"} for i in range(1300)]
    paths.cache.mkdir(parents=True)
    for r in rows:
        Path(r["path"]).write_bytes(b"x" * 10)
    store.complete([], [], rows, None, {})
    store.conn.execute("UPDATE cache SET last_used = rowid / 100")  # ties in groups of 100
    report = purge(paths, max_bytes=3000)  # keep 300 of 13,000 bytes
    assert (report.removed, report.freed_bytes, report.kept) == (1000, 10_000, 300)
    survivors = store.q("SELECT MIN(last_used) AS lo FROM cache")[0]["lo"]
    assert survivors >= 10 and len(list(paths.cache.iterdir())) == 300
    assert purge(paths, all=True).removed == 300


def test_dry_run_changes_nothing(paths: PathsConfig, store: Store) -> None:
    now = 100 * DAY
    files = [add_entry(store, paths, f"k{i}", 50, last_used=now - i * DAY) for i in range(6)]
    files[5].unlink()
    before = store.cache_entries()
    dry = purge(paths, older_than_s=2.5 * DAY, dry_run=True, now=now)
    assert dry.dry_run and dry.removed == 3 and dry.missing_files == 1
    assert (dry.freed_bytes, dry.kept, dry.kept_bytes) == (100, 3, 150)
    assert store.cache_entries() == before and all(f.exists() for f in files[:5])
    assert "would remove 3" in render(dry) and "nothing was changed" in render(dry)
    real = purge(paths, older_than_s=2.5 * DAY, now=now)
    assert (real.removed, real.freed_bytes, real.kept, real.kept_bytes, real.missing_files) == \
        (dry.removed, dry.freed_bytes, dry.kept, dry.kept_bytes, dry.missing_files)
    assert not real.dry_run


def test_missing_files_are_counted_not_errors(paths: PathsConfig, store: Store) -> None:
    gone = add_entry(store, paths, "gone", 70)
    add_entry(store, paths, "here", 30)
    gone.unlink()
    report = purge(paths, all=True)
    assert (report.removed, report.missing_files, report.freed_bytes) == (2, 1, 30)
    assert keys(store) == set()
    assert "1 of their files were already missing" in render(report)


def test_tampered_paths_outside_the_cache_are_refused(paths: PathsConfig, store: Store,
                                                      tmp_path: Path) -> None:
    """A row pointing out of the cache folder loses its row; its file is never touched."""
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.wav").write_text("keep me too")
    paths.cache.mkdir(parents=True)
    (paths.cache / "link").symlink_to(elsewhere, target_is_directory=True)
    add_entry(store, paths, "etc", 1, path="/etc/passwd")
    add_entry(store, paths, "abs", 1, path=outside)
    add_entry(store, paths, "dots", 1, path=paths.cache / ".." / "ttsd.db")
    add_entry(store, paths, "rel", 1, path="../ttsd.db")
    add_entry(store, paths, "via-link", 1, path=paths.cache / "link" / "x.wav")
    add_entry(store, paths, "root", 1, path=paths.cache)
    add_entry(store, paths, "nul", 1, path=f"{paths.cache}/a\0/../../../ttsd.db")
    ok = add_entry(store, paths, "fine", 5)
    report = purge(paths, all=True)
    assert report.refused == 7 and report.removed == 8 and report.freed_bytes == 5
    assert "/etc/passwd" in report.refused_paths and str(outside) in report.refused_paths
    assert Path("/etc/passwd").exists() and outside.read_text() == "keep me"
    assert (elsewhere / "x.wav").read_text() == "keep me too"
    assert paths.db.exists() and paths.cache.is_dir() and not ok.exists()
    assert keys(store) == set()
    assert "outside the cache folder" in render(report)


def test_symlink_inside_the_cache_is_removed_not_followed(paths: PathsConfig, store: Store,
                                                          tmp_path: Path) -> None:
    target = tmp_path / "target.wav"
    target.write_bytes(b"t" * 9)
    link = paths.cache / "sy" / "sym.wav"
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    add_entry(store, paths, "zz-sym", 9, path=link)  # (its own file lies elsewhere)
    report = purge(paths, all=True)
    assert report.removed == 1 and report.refused == 0
    assert not os.path.lexists(link) and target.read_bytes() == b"t" * 9


def test_relative_paths_are_taken_from_the_cache_folder(paths: PathsConfig,
                                                        store: Store) -> None:
    file = add_entry(store, paths, "relkey", 11, path="re/relkey.wav")
    assert purge(paths, all=True).freed_bytes == 11 and not file.exists()


def test_files_still_linked_from_the_outbox_free_nothing(paths: PathsConfig,
                                                         store: Store) -> None:
    """With ``cache.link`` the daemon hard-links cached WAVs into the outbox: unlinking
    the cache's name gives no space back while the outbox WAV lives, and the report says
    so."""
    cached = add_entry(store, paths, "linked", 1000)
    add_entry(store, paths, "alone", 300)
    out = paths.outbox / "book" / "0001.wav"
    out.parent.mkdir(parents=True)
    os.link(cached, out)
    report = purge(paths, all=True)
    assert (report.removed, report.freed_bytes, report.linked, report.linked_bytes) == \
        (2, 300, 1, 1000)
    assert out.read_bytes() == b"R" * 1000 and not cached.exists()
    assert "hard-linked from the outbox" in render(report)


def test_purge_waits_for_a_writer_holding_the_lock(paths: PathsConfig, store: Store) -> None:
    """Another connection (the daemon) holds a write
    transaction for 2 s; purge waits through busy_timeout and succeeds, and the
    daemon's connection never sees "database is locked"."""
    files = [add_entry(store, paths, f"w{i}", 10) for i in range(3)]
    locked, errors = threading.Event(), []

    def daemon_writer() -> None:
        try:
            daemon = Store(paths.db)
            with daemon.tx() as c:
                c.execute("UPDATE cache SET hits = hits + 1")
                locked.set()
                time.sleep(2.0)
            daemon.heartbeat(os.getpid(), time.time(), "running", {})  # writes again after
            daemon.close()
        except Exception as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)
            locked.set()

    t = threading.Thread(target=daemon_writer)
    t.start()
    assert locked.wait(5)
    start = time.monotonic()
    report = purge(paths, all=True)
    waited = time.monotonic() - start
    t.join()
    assert not errors
    assert waited >= 1.0  # it waited for the lock instead of failing
    assert report.removed == 3 and not any(f.exists() for f in files)
    assert keys(store) == set()


def test_render_counts(paths: PathsConfig, store: Store) -> None:
    add_entry(store, paths, "k", 2048)
    text = render(purge(paths, all=True))
    assert text.startswith("removed 1 cache entries, freed 2.0 KiB; kept 0 entries (0 B)")
