"""Batches of more lines than one model call: ``batching.lines_per_batch``.

The model pays for the longest sentence of each call, and the engine sorts a batch's
sentences by length before it cuts them into calls of ``max_batch_size``; so a batch of
more lines than one call pads less. Checked on the real daemon: less padding, and every
WAV and the manifest in line order."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import soundfile as sf
from harness import run_once

from ttsd.config import BatchingConfig


@pytest.mark.parametrize(("lines", "model", "gpu", "want"), [
    (0, 128, True, 512), (0, 1, False, 1), (0, 4, False, 4), (200, 128, True, 200)])
def test_lines_per_batch_resolves(lines: int, model: int, gpu: bool, want: int) -> None:
    assert BatchingConfig(lines_per_batch=lines).lines(model, gpu) == want


def _wav_seconds(path: Path) -> float:
    info = sf.info(str(path))
    assert info.samplerate == 22050
    return info.duration


def test_batches_of_more_lines_than_a_model_call_pad_less(tmp_path: Path) -> None:
    short = ["Yes.", "No.", "Fine.", "Okay.", "Thanks.", "Right."]
    long = [("This is a much longer line that goes on for quite a while, with commas, "
             "clauses and a number or two, like 42 and 7, before it finally stops."),
            ("Another long sentence arrives here, full of words that take time to say, "
             "so that its audio is many times longer than the short replies around it."),
            ("The third long line talks about batching, padding and the cost of waiting "
             "for the longest line in every batch of the model, again and again."),
            ("Finally the fourth long line closes the file with one more rambling "
             "sentence that is there only to be long, and then it is over at last.")]
    texts = [t for pair in zip(short, long) for t in pair] + short[len(long):]
    efficiency = {}
    for lines in (2, 8):   # one model call of two, or four calls sorted by length
        site = run_once(tmp_path / str(lines), texts,
                        f"[batching]\nmax_batch_size = 2\nlines_per_batch = {lines}\n",
                        name="mixed.txt")
        used, padded = site.query("SELECT SUM(used_frames), SUM(padded_frames) FROM batches")[0]
        efficiency[lines] = used / padded
    # Two lines a batch, in file order: a short line beside a long one in every call
    # (≈ 0.55); eight: short with short, long with long.
    assert efficiency[2] < 0.7 and efficiency[8] > 0.85, efficiency
    out = site.outbox / "mixed"
    for i, text in enumerate(texts, 1):
        seconds = _wav_seconds(out / f"{i:04d}.wav")
        assert (seconds > 3.0) == (text in long), (i, text, seconds)
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == texts
    assert [int(r["line"]) for r in rows] == list(range(1, len(texts) + 1))
