"""Batches of similar lengths: ``batching.sort_window``.

The model pays for the longest line of a batch, so a batch of lines in file order pads a
lot; the store hands out the oldest pending line with the lines nearest to it in length
among the next ``sort_window``. Checked on the store (every line once, the oldest always
next, suspects still alone, one voice) and on the real daemon (less padding, every WAV
and the manifest in line order)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import soundfile as sf

from harness import Site, assert_invariant
from ttsd.store import NewLine, Store


def _store(tmp_path: Path, texts: list[str], voices: list[str] | None = None,
           scales: list[float] | None = None) -> Store:
    store = Store(tmp_path / "ttsd.db")
    fid = store.add_file("a.txt", tmp_path / "w", 1, "0" * 64, tmp_path / "a")
    store.add_lines(fid, [NewLine(number=i + 1, text=t, out_name=f"{i + 1:04d}",
                                  voice=(voices[i] if voices else "v"),
                                  length_scale=(scales[i] if scales else 1.0))
                          for i, t in enumerate(texts)])
    return store


def _efficiency(batches: list[list[int]]) -> float:
    """Used / padded cost over batches of line lengths."""
    return sum(sum(b) for b in batches) / sum(len(b) * max(b) for b in batches)


def _drain(store: Store, limit: int, window: int) -> list[list]:
    taken = []
    while True:
        oldest = store.one("SELECT MIN(id) FROM lines WHERE state='pending'")
        rows, dead = store.take(limit, 3, window=window)
        assert not dead
        if not rows:
            return taken
        assert rows[0].id == oldest, "the oldest pending line always goes next"
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        taken.append(rows)


def test_windowed_take_pads_less_and_takes_every_line_once(tmp_path: Path) -> None:
    rng = random.Random(5)
    texts = ["x" * rng.randint(5, 300) for _ in range(200)]
    by_order = _drain(_store(tmp_path / "a", texts), 8, 0)
    by_length = _drain(_store(tmp_path / "b", texts), 8, 64)
    for batches in (by_order, by_length):
        ids = [r.id for b in batches for r in b]
        assert sorted(ids) == list(range(1, 201)), "each line exactly once"
        assert all(len(b) == 8 for b in batches)
    plain = _efficiency([[len(r.text) for r in b] for b in by_order])
    sorted_ = _efficiency([[len(r.text) for r in b] for b in by_length])
    assert plain < 0.6 and sorted_ > 0.9, (plain, sorted_)


def test_window_keeps_suspects_alone_and_one_voice(tmp_path: Path) -> None:
    texts = ["a" * n for n in (50, 10, 51, 300, 49, 52, 12, 48, 53)]
    voices = ["v", "v", "w", "v", "w", "v", "v", "v", "v"]
    store = _store(tmp_path, texts, voices)
    rows, _ = store.take(4, 3, window=9)
    # Line 1 (50 chars) with the three "v" lines nearest it: 52, 48, 53 chars — not the
    # "w" lines of 51 and 49, not 300 or the short ones.
    assert [r.number for r in rows] == [1, 6, 8, 9]
    store.release([r.id for r in rows], undo_attempt=False)   # as after a crash
    rows, _ = store.take(4, 3, window=9)
    assert [r.number for r in rows] == [1], "a suspect comes alone, window or not"


def test_window_weighs_length_scale(tmp_path: Path) -> None:
    # Line 1: 100 chars at length_scale 1; line 2: 50 chars spoken twice as slowly is
    # as long as line 1; line 3: 100 chars at double speed is half as long.
    store = _store(tmp_path, ["a" * 100, "b" * 50, "c" * 100, "d" * 200],
                   scales=[1.0, 2.0, 0.5, 1.0])
    rows, _ = store.take(2, 3, window=4)
    assert [r.number for r in rows] == [1, 2]


def _wav_seconds(path: Path) -> float:
    info = sf.info(str(path))
    assert info.samplerate == 22050
    return info.duration


def test_daemon_batches_similar_lengths_and_keeps_line_order(tmp_path: Path) -> None:
    short = ["Yes.", "No.", "Fine.", "Okay.", "Thanks.", "Right."]
    long = ["This is a much longer line that goes on for quite a while, with commas, "
            "clauses and a number or two, like 42 and 7, before it finally stops.",
            "Another long sentence arrives here, full of words that take time to say, "
            "so that its audio is many times longer than the short replies around it.",
            "The third long line talks about batching, padding and the cost of waiting "
            "for the longest line in every batch of the model, again and again.",
            "Finally the fourth long line closes the file with one more rambling "
            "sentence that is there only to be long, and then it is over at last."]
    texts = [t for pair in zip(short, long) for t in pair] + short[len(long):]
    site = Site(tmp_path, extra_config="[batching]\nmax_batch_size = 2\nsort_window = 64\n")
    site.inbox.mkdir(parents=True)
    (site.inbox / "mixed.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 0, site.logs()
    assert_invariant(site)
    used, padded = site.query("SELECT SUM(used_frames), SUM(padded_frames) FROM batches")[0]
    # In file order every batch of two pairs a short line with a long one (≈ 0.55);
    # by length, short with short and long with long.
    assert used / padded > 0.85, (used, padded)
    out = site.outbox / "mixed"
    for i, text in enumerate(texts, 1):
        seconds = _wav_seconds(out / f"{i:04d}.wav")
        assert (seconds > 3.0) == (text in long), (i, text, seconds)
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == texts
    assert [int(r["line"]) for r in rows] == list(range(1, len(texts) + 1))
