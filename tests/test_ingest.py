"""Ingest's per-line decisions that a user reads in the manifest."""

from __future__ import annotations

import threading
from pathlib import Path

from test_cache_key import VOICE

from ttsd.config import from_dict
from ttsd.ingest.files import Ingest
from ttsd.records import Line


def test_a_case_twin_id_names_the_file_the_earlier_line_writes(tmp_path: Path) -> None:
    """Ids "a5" and "A5" write one file name (case folds on many file systems): the
    second fails naming the line and the file that line really writes."""
    cfg = from_dict({"paths": {k: str(tmp_path / k) for k in
                               ("inbox", "outbox", "done", "failed", "state")},
                     "engine": {"voice": "joe"}})
    ing = Ingest(cfg, {"joe": VOICE}, threading.Event(), fmt="wav/PCM_16")
    seen: dict = {}
    first = ing._new_line(Line(6, "First.", id="a5"), 4, seen)
    assert first.error is None and first.out_name == "a5"
    twin = ing._new_line(Line(9, "Second.", id="A5"), 4, seen)
    assert twin.error == "duplicate id 'A5': line 6 already writes a5.wav", twin.error
