"""``EngineOptions.overlap_halves``: the feeder runs the next batch's text half beside
the model thread's audio half. The real daemon, with the real voice on the CPU: the same
WAVs, sample for sample, as with both halves run one after the other in the model
thread, every line accounted for and the batches' model time still recorded."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from harness import FAULTS, Site, run_once

from ttsd.engine.options import EngineOptions

TEXTS = ["Yes.", "The first long line goes on for a while, with a comma or two.",
         "No.", "Another line, of middling length.", "Fine, thanks.",
         "A third line that is long enough to need several hundred frames of audio.",
         "Okay.", "The end."]


@pytest.mark.parametrize(("value", "gpu", "want"), [
    ("auto", True, True), ("auto", False, False), ("on", False, True), ("off", True, False)])
def test_overlap_halves_resolves(value: str, gpu: bool, want: bool) -> None:
    """One resolution for the daemon's feeder and the bench: auto = on with a GPU."""
    assert EngineOptions(overlap_halves=value).overlaps(gpu) is want


OVERLAPPED = {"TTSD_ENGINE_FACTORY": FAULTS["TTSD_ENGINE_FACTORY"] + ":overlapped"}
"""The daemon's engine with overlap_halves "on" (tests/faults.py); the CPU's default is
off."""


def _run(root: Path, overlap: bool) -> Site:
    return run_once(root, TEXTS, "[batching]\nmax_batch_size = 2\nlines_per_batch = 2\n"
                    "prefetch = 2\n", env=OVERLAPPED if overlap else None)


def test_overlapped_halves_write_the_same_wavs(tmp_path: Path) -> None:
    serial = _run(tmp_path / "serial", overlap=False)
    overlapped = _run(tmp_path / "overlap", overlap=True)
    for i, text in enumerate(TEXTS, 1):
        a, sr_a = sf.read(str(serial.outbox / "lines" / f"{i:04d}.wav"), dtype="int16")
        b, sr_b = sf.read(str(overlapped.outbox / "lines" / f"{i:04d}.wav"), dtype="int16")
        assert sr_a == sr_b == 22050
        assert len(a) == len(b) > 0.3 * 22050, (i, text, len(a), len(b))
        assert np.array_equal(a, b), (i, text)
    batches = overlapped.query("SELECT COUNT(*), MIN(model_ms), SUM(size) FROM batches")[0]
    assert batches[0] >= 4 and batches[1] > 0 and batches[2] == len(TEXTS), batches
    with open(overlapped.outbox / "lines" / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == TEXTS
