"""GPU faults through the real daemon on the CPU (docs/reliability.md: gpu-oom,
nan-audio, runaway-length and lost-device).

The daemon's engine (``harness.FAULTS``: tests/faults.py) turns a token ``{{fault:...}}``
in a line's text into a misbehaving model for that line; the token is removed before
phonemizing.
The real voice runs; only the fault is injected. Each test ends with the invariant.
The engine-level seams are also tested in tests/test_engine.py.
"""

from __future__ import annotations

from pathlib import Path

from harness import FAULTS, Site, assert_invariant, restart_until_finished


def _site(tmp_path: Path, batch: int = 8, extra: str = "") -> Site:
    # Whole batches from the first one (idle_batch = 1.0): the tests count them.
    site = Site(tmp_path, env=FAULTS,
                extra_config=f"[batching]\nmax_batch_size = {batch}\nmax_wait_ms = 200\n"
                             f"idle_batch = 1.0\n{extra}")
    site.inbox.mkdir(parents=True)
    return site


def _lines(site: Site) -> dict[int, tuple[str, str | None, int, str | None]]:
    """line number → (state, error, synth_count, cache_key) for the first file."""
    return {r[0]: r[1:] for r in site.query(
        "SELECT number, state, error, synth_count, cache_key FROM lines ORDER BY id")}


def test_oom_on_a_big_batch_halves_and_retries(tmp_path: Path) -> None:
    """gpu-oom: a fake OOM whenever a sub-batch holding the line has more than 2 (or 1)
    items: the batch of 8 is halved down to fit and every line is written; a line
    that runs out of memory even alone (oom:0) fails alone with a reason. (On the CPU
    ``empty_cache`` is a no-op; the release call is covered in test_engine.py.)"""
    site = _site(tmp_path)
    text = ["One small line.", "Two {{fault:oom:2}} lines.", "Three lines now.",
            "Four {{fault:oom:1}} of them.", "Five.", "Six {{fault:oom:0}} never fits.",
            "Seven.", "Eight is the last."]
    (site.inbox / "big.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    site.start()
    site.wait_ready()
    site.wait_files_finished(1)
    assert site.stop() == 0
    lines = _lines(site)
    assert {n for n, v in lines.items() if v[0] == "failed"} == {6}
    assert "out of GPU memory even alone" in lines[6][1]
    assert all(v[0] == "done" and v[2] == 1 for n, v in lines.items() if n != 6)
    # One batch of 8 went to the model: the split happened inside it, not by refeeding.
    assert site.query("SELECT size FROM batches") == [(8,)]
    assert not site.query("SELECT 1 FROM cache WHERE key = ?", (lines[6][3],))
    assert_invariant(site)


def test_nan_audio_is_never_written_nor_cached(tmp_path: Path) -> None:
    """nan-audio: a line whose audio holds NaN fails with a reason, no WAV, no cache row;
    the same text later is synthesized again (not a cache hit) and fails again; its
    batch-mates are written. The one float32 retry needs a half-precision decoder on
    CUDA (the CPU runs float32 only): covered at engine level in test_engine.py."""
    site = _site(tmp_path)
    bad = "This one {{fault:nan}} goes wrong."
    (site.inbox / "a.txt").write_text(f"Fine before.\n{bad}\nFine after.\n", encoding="utf-8")
    site.start()
    site.wait_ready()
    site.wait_files_finished(1)
    (site.inbox / "b.txt").write_text(f"{bad}\n", encoding="utf-8")
    site.wait_files_finished(2)
    assert site.stop() == 0
    rows = site.query("SELECT f.name, l.number, l.state, l.error, l.cache_key, l.cached "
                      "FROM lines l JOIN files f ON f.id = l.file_id ORDER BY l.id")
    failed = [r for r in rows if r[2] == "failed"]
    assert [(r[0], r[1]) for r in failed] == [("a.txt", 2), ("b.txt", 1)]
    assert all("non-finite" in r[3] for r in failed)
    assert failed[0][4] == failed[1][4] and failed[1][5] == 0   # same key, not a hit
    assert not site.query("SELECT 1 FROM cache WHERE key = ?", (failed[0][4],))
    assert not (site.outbox / "a" / "0002.wav").exists()
    assert_invariant(site)


def test_runaway_length_fails_the_line_and_is_not_cached(tmp_path: Path) -> None:
    """runaway-length: a line predicting runaway audio (over 2 s + 0.5 s per character) fails
    with the cap in its reason; not written, not cached; the others are written."""
    site = _site(tmp_path)
    (site.inbox / "a.txt").write_text("Short and fine.\nThis {{fault:long}} never ends.\n"
                                      "Also fine.\n", encoding="utf-8")
    site.start()
    site.wait_ready()
    site.wait_files_finished(1)
    assert site.stop() == 0
    lines = _lines(site)
    assert lines[2][0] == "failed" and "runaway length" in lines[2][1] and "cap" in lines[2][1]
    assert lines[1][0] == lines[3][0] == "done"
    assert not site.query("SELECT 1 FROM cache WHERE key = ?", (lines[2][3],))
    assert site.query("SELECT COUNT(*) FROM cache")[0][0] == 2
    assert_invariant(site)


def test_sticky_device_error_exits_for_a_restart_and_requeues(tmp_path: Path) -> None:
    """lost-device: a sticky "illegal memory access" is not retried in the same process: the
    daemon exits 75 (non-zero: systemd's Restart=on-failure restarts it) with the batch
    still owned by the store; after the restart the line runs alone and, failing
    every time, fails after max_attempts while every other line is written once."""
    site = _site(tmp_path, batch=4, extra="[daemon]\nmax_attempts = 2\n")
    text = ["First line.", "Second line.", "Third {{fault:sticky}} breaks the card.",
            "Fourth line.", "Fifth line.", "Sixth line."]
    (site.inbox / "a.txt").write_text("\n".join(text) + "\n", encoding="utf-8")

    def after_exit(site: Site) -> None:
        assert site.logs().count("engine.device_lost") == 1, site.logs()   # no retry here
        states = dict(site.query("SELECT number, state FROM lines"))
        assert states[3] in ("running", "pending"), states   # requeued, not failed

    exits = restart_until_finished(site, 1, after_exit=after_exit)
    assert exits == [75, 75], exits
    lines = _lines(site)
    assert lines[3][0] == "failed" and "never finished" in lines[3][1]
    assert all(v[0] == "done" and v[2] == 1 for n, v in lines.items() if n != 3), lines
    assert_invariant(site)
