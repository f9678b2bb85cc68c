"""`ttsd say`: one line to one WAV, writing nothing else where it runs.

The converted voice (the ONNX voice turned into PyTorch weights, ``<sha256>-v<N>.pt``)
lives in one per-user cache folder ($XDG_CACHE_HOME/ttsd/voices) that ``say``, ``bench``
and the daemon share; an output ``say`` cannot write is refused before the voice loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from harness import ROOT, TEST_CACHE, Site, assert_invariant, subprocess_env

from ttsd.config import Config, from_dict
from ttsd.errors import ConfigError


def say(cwd: Path, xdg: Path, *args: str) -> subprocess.CompletedProcess:
    """``ttsd say ARGS`` on the CPU in ``cwd`` (no config file there: the built-in
    defaults), with $XDG_CACHE_HOME at ``xdg``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(xdg),
           "TTSD_CONFIG": ""}
    return subprocess.run([sys.executable, "-m", "ttsd.cli", "say", *args, "--device", "cpu"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def converted(xdg: Path) -> list[Path]:
    """Every file in the shared voice cache under ``xdg``."""
    folder = xdg / "ttsd" / "voices"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_say_writes_only_the_wav_and_every_user_shares_one_converted_voice(
        tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    first = tmp_path / "first"
    first.mkdir()
    out = say(first, xdg, "Hello there.", "-o", "out.wav")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in first.iterdir()) == ["out.wav"]
    assert sf.info(str(first / "out.wav")).frames > 0
    cache = converted(xdg)
    assert len(cache) == 1 and cache[0].name.endswith(".pt"), cache
    before = identity(cache[0])

    # Another folder, the same user: the converted voice is reused as it is. The suffix
    # is matched whatever its case.
    second = tmp_path / "second"
    second.mkdir()
    out = say(second, xdg, "Hello again.", "-o", "Again.WAV")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in second.iterdir()) == ["Again.WAV"]
    assert converted(xdg) == cache
    assert identity(cache[0]) == before

    # The daemon of a site reuses it too, and keeps no converted voice of its own.
    site = Site(tmp_path / "site", env={"XDG_CACHE_HOME": str(xdg)})
    site.inbox.mkdir(parents=True)
    (site.inbox / "lines.txt").write_text("One line for the daemon.\n", encoding="utf-8")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 0, site.logs()
    assert_invariant(site)
    assert not (site.root / "state" / "voices").exists()
    assert converted(xdg) == cache
    assert identity(cache[0]) == before


def test_say_works_when_the_voice_cache_cannot_be_created(tmp_path: Path) -> None:
    """The cache only saves time: where its folder cannot be made (here a file stands
    where a folder should be), the voice is converted in memory and the WAV written."""
    xdg = tmp_path / "not-a-folder"
    xdg.write_text("", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    out = say(work, xdg, "Hello there.", "-o", "out.wav")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in work.iterdir()) == ["out.wav"]
    assert xdg.read_text(encoding="utf-8") == ""


def refused(tmp_path: Path, output: str, *, cwd: Path | None = None) -> str:
    """``say -o OUTPUT``, which must exit 2 with one ``ttsd:`` line on stderr, well
    before a voice could load, and without converting one; returns that line."""
    xdg = tmp_path / "xdg"
    work = cwd or tmp_path
    listing = sorted(work.iterdir())
    t0 = time.monotonic()
    out = say(work, xdg, "Hi", "-o", output)
    wall = time.monotonic() - t0
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttsd: "), out.stderr
    assert not xdg.exists(), converted(xdg)   # no voice was loaded or converted
    assert sorted(work.iterdir()) == listing   # nothing written
    assert wall < 5, wall
    return lines[0]


def test_say_refuses_a_missing_output_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir"
    line = refused(tmp_path, str(missing / "x.wav"))
    assert f"folder {missing} does not exist" in line, line


def test_say_refuses_an_output_whose_suffix_names_no_format_it_writes(tmp_path: Path) -> None:
    line = refused(tmp_path, "out.m4a")
    assert ".m4a" in line and "suffix of its format" in line and ".mp3" in line, line
    line = refused(tmp_path, "out")
    assert "suffix of its format" in line, line


def test_say_refuses_an_output_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "taken.wav").mkdir()
    line = refused(tmp_path, "taken.wav")
    assert "taken.wav is a folder" in line, line


def test_say_refuses_a_folder_it_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user may write anywhere (root)")
        line = refused(tmp_path, str(locked / "x.wav"))
        assert f"folder {locked} is not writable" in line, line
    finally:
        locked.chmod(0o700)


def test_bench_keeps_nothing_where_it_runs_and_reuses_the_converted_voice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's own engines and the daemon of its end-to-end row (on a temp folder it
    removes) keep the converted voice in the user's cache, and nothing where they run."""
    from ttsd.bench import run as bench

    work = tmp_path / "work"
    work.mkdir()
    xdg = tmp_path / "xdg"
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.delenv("TTSD_CONFIG", raising=False)
    cfg = Config.load()   # the built-in defaults, relative to the current folder
    engine = bench._engine(cfg, "float32", 1, compile="off")
    try:
        engine.voice(cfg.engine.voice)
    finally:
        engine.close()
    cache = converted(xdg)
    assert len(cache) == 1 and cache[0].name.endswith(".pt"), cache
    assert list(work.iterdir()) == []
    # Gone, so that the daemon of the end-to-end row must convert it: into the same file.
    cache[0].unlink()
    row = bench.bench_end_to_end(cfg, bench.bench_lines(2), "float32", cache_run=False)
    assert row["synthesize"]["wavs"] == 2, row
    assert converted(xdg) == cache
    assert list(work.iterdir()) == []


def test_voice_cache_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``paths.voice_cache``: "" is the per-user cache folder (worked out from
    $XDG_CACHE_HOME when used); a path resolves like the other paths, and it is not one
    of the site's own folders, so it may lie in one of them (the old state/voices)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    conf = tmp_path / "site" / "config.toml"
    conf.parent.mkdir()
    conf.write_text("[paths]\n", encoding="utf-8")
    cfg = Config.load(conf)
    assert cfg.paths.voice_cache == ""
    assert cfg.paths.voices_cache == tmp_path / "xdg" / "ttsd" / "voices"
    for given, expected in (("state/voices", tmp_path / "site" / "state" / "voices"),
                            ("~/voices", tmp_path / "home" / "voices"),
                            (str(tmp_path / "shared"), tmp_path / "shared")):
        conf.write_text(f'[paths]\nvoice_cache = "{given}"\n', encoding="utf-8")
        assert Config.load(conf).paths.voices_cache == expected, given
    with pytest.raises(ConfigError, match=r"paths\.voice_cache: expected a string"):
        from_dict({"paths": {"voice_cache": 1}})


def test_harness_gives_its_subprocesses_the_shared_test_cache() -> None:
    """Every daemon and command the tests start converts the voice once into
    ``TEST_CACHE``, not into each site, nor into the user's ~/.cache; a test may still
    name its own."""
    assert subprocess_env()["XDG_CACHE_HOME"] == str(TEST_CACHE)
    assert subprocess_env({"PYTHONPATH": "x"}, None)["XDG_CACHE_HOME"] == str(TEST_CACHE)
    assert subprocess_env({}, {"XDG_CACHE_HOME": "/elsewhere"})["XDG_CACHE_HOME"] == \
        "/elsewhere"
