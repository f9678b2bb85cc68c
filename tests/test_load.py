"""Load (docs/reliability.md: one-big-file and burst-of-files). The benchmarks
(ttsd/bench/load.py) are marked slow and run small sizes; the back-pressure contract of
burst-of-files runs in CI. Both use the real daemon with the tone model
(``harness.TONE``, ``TTSD_MODEL=tone``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import TONE, Site, assert_invariant

from ttsd.bench.load import run_load


def test_burst_of_files_each_once_claiming_pauses_under_backpressure(tmp_path: Path) -> None:
    """burst-of-files (contract, small): 30 files of 10 lines dropped at once with
    max_pending_lines = 25: claiming pauses while the queue is over the limit (it never
    holds more than the limit plus one file), every file is processed exactly once."""
    site = Site(tmp_path, env=TONE, extra_config=(
        "[input]\nmax_pending_lines = 25\nsettle_s = 0.1\n"
        "[batching]\nmax_batch_size = 4\nmax_wait_ms = 5\n"))
    site.start()
    site.wait_ready()
    staging = tmp_path / "staging"
    staging.mkdir()
    for f in range(30):
        (staging / f"f{f:02d}.txt").write_text(
            "".join(f"File {f} line {i}.\n" for i in range(10)), encoding="utf-8")
    for p in sorted(staging.iterdir()):
        p.rename(site.inbox / p.name)
    peak = 0
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = site.query("SELECT (SELECT COUNT(*) FROM lines WHERE state IN "
                          "('pending','running')), (SELECT COUNT(*) FROM files WHERE state "
                          "IN ('done','failed'))")
        peak = max(peak, rows[0][0])
        if rows[0][1] == 30:
            break
        time.sleep(0.02)
    assert site.stop() == 0
    assert peak <= 25 - 1 + 10, peak
    assert site.query("SELECT COUNT(*), COUNT(DISTINCT name) FROM files "
                      "WHERE state='done'") == [(30, 30)]
    assert site.query("SELECT COUNT(*) FROM lines WHERE state='done' AND synth_count=1") \
        == [(300,)]
    assert len(list((tmp_path / "done").iterdir())) == 30
    assert_invariant(site)


@pytest.mark.slow
def test_load_one_big_file_peak_rss_does_not_grow_with_size(tmp_path: Path) -> None:
    """one-big-file: one file of 5,000 then 25,000 lines: every line done, the first WAV
    while the file is still being parsed (chunked commits), `ttsd status` under a
    second throughout, and the peak RSS of the bigger input within 40 MB of the
    smaller one (memory bounded whatever the input size)."""
    small = run_load(5_000, root=tmp_path / "small")
    big = run_load(25_000, root=tmp_path / "big")
    for r in (small, big):
        assert r["done"] == r["lines"] and r["failed"] == 0, r
        assert r["status_failures"] == 0 and r["status_max_ms"] < 1000, r
    assert big["first_wav_while_parsing"], big
    assert big["rss_peak_mb"] - small["rss_peak_mb"] < 40, (small, big)


@pytest.mark.slow
def test_load_burst_of_files(tmp_path: Path) -> None:
    """burst-of-files: 200 files of 20 lines dropped at once: each processed once, status fast."""
    r = run_load(20, files=200, root=tmp_path)
    assert r["done"] == 4000 and r["failed"] == 0, r
    assert r["status_failures"] == 0 and r["status_max_ms"] < 1000, r
