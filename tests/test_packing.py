"""How a batch's sentences are cut into audio-half calls (``ttsd.engine.packing``)."""

from __future__ import annotations

import itertools
import random

from ttsd.engine.packing import (
    CALL_COST,
    FRAME_STEP,
    TAIL_FRAMES,
    bucket,
    full_call_shapes,
    pack,
    padded_rows,
)


def _cost(frames: list[int], calls: list[tuple[int, int]]) -> int:
    return sum((j - i) * bucket(frames[i], FRAME_STEP) + CALL_COST for i, j in calls)


def _frames(n: int, seed: int) -> list[int]:
    """Sentence lengths like the bench's: short answers to long clauses, in frames."""
    rng = random.Random(seed)
    return sorted((max(20, int(rng.lognormvariate(5.6, 0.55))) for _ in range(n)), reverse=True)


def _check(frames: list[int], calls: list[tuple[int, int]], max_rows: int, budget: int,
           unit: int = 16) -> None:
    assert calls[0][0] == 0 and calls[-1][1] == len(frames)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(calls)), "every sentence once, in order"
    for k, (i, j) in enumerate(calls):
        rows = j - i
        assert 1 <= rows <= max_rows
        assert rows == 1 or rows * bucket(frames[i], FRAME_STEP) <= budget, (i, j)
        assert rows == 1 or rows % unit == 0 or k == len(calls) - 1, (i, j)


def test_pack_pads_less_than_fixed_runs_for_realistic_batches():
    for seed in range(5):
        frames = _frames(900, seed)
        calls = pack(frames, 128, 120_000)
        _check(frames, calls, 128, 120_000)
        fixed = [(i, min(i + 128, len(frames))) for i in range(0, len(frames), 128)]
        real = sum(frames)
        assert _cost(frames, calls) < _cost(frames, fixed)
        padded = sum((j - i) * bucket(frames[i], FRAME_STEP) for i, j in calls)
        padded_fixed = sum((j - i) * bucket(frames[i], FRAME_STEP) for i, j in fixed)
        assert real / padded > real / padded_fixed + 0.03, (real / padded, real / padded_fixed)


def test_pack_respects_the_frame_budget_and_small_batches():
    frames = _frames(300, 9)
    assert 60_000 // bucket(frames[0], FRAME_STEP) >= 16
    calls = pack(frames, 128, 60_000)
    _check(frames, calls, 128, 60_000)
    i, j = calls[0]
    assert j - i < 128   # the budget, not max_rows, bounds the longest sentences' call
    # Fewer rows than the unit (the CPU's small batches): any size.
    calls = pack(frames[:10], 4, 10**9)
    _check(frames[:10], calls, 4, 10**9, unit=1)
    # A budget that allows fewer than 16 rows: any size too, not calls of one.
    frames = _frames(60, 3)
    calls = pack(frames, 16, 4000)
    _check(frames, calls, 16, 4000, unit=1)
    fixed, start = [], 0
    while start < len(frames):   # fixed runs within the same budget
        end = start + 1
        while (end < len(frames) and end - start < 16
               and (end - start + 1) * bucket(frames[start], FRAME_STEP) <= 4000):
            end += 1
        fixed.append((start, end))
        start = end
    assert len(calls) <= len(fixed) + 2 and _cost(frames, calls) <= _cost(frames, fixed)


def test_pack_puts_an_oversized_sentence_alone_and_handles_edges():
    assert pack([], 128, 1000) == []
    assert pack([50], 128, 1000) == [(0, 1)]
    frames = [5000, 300, 290, 280]
    calls = pack(frames, 128, 1000)
    assert calls[0] == (0, 1)     # over the budget on its own: a call of one
    _check(frames, calls, 128, 1000)
    # Equal lengths: one call, however the rows fall against the unit.
    assert pack([100] * 40, 128, 10**9) == [(0, 40)]


def test_full_call_shapes_cover_every_bucket_within_the_budget():
    shapes = full_call_shapes(128, 120_000, 2048)
    frames = [f for _, f in shapes]
    assert frames == sorted(frames, reverse=True) and frames[0] == 2048 and frames[-1] == 64
    # every bucket a call of up to 2,048 frames can be padded to, once
    assert sorted(frames) == sorted({bucket(n, FRAME_STEP) for n in range(1, 2049)})
    for rows, f in shapes:
        assert rows == min(128, 120_000 // f)
    assert full_call_shapes(128, 120_000, 0) == []


def test_padded_rows_land_on_warmed_shapes():
    """A partial call's rows go up to a multiple of the row step, never past a full
    call's rows; every shape that gives, up to TAIL_FRAMES, is one the warm-up runs."""
    assert padded_rows(60, 128, 128, 120_000, 16) == 64
    assert padded_rows(127, 128, 128, 120_000, 16) == 128
    assert padded_rows(13, 128, 128, 120_000, 16) == 13       # under one step: as it is
    assert padded_rows(50, 2048, 128, 120_000, 16) == 58      # the full call's rows (budget)
    assert padded_rows(1, 4096, 128, 120_000, 16) == 1        # one sentence over the budget
    assert padded_rows(60, 128, 128, 120_000, 0) == 60        # off
    shapes = set(full_call_shapes(128, 120_000, 2048, row_step=16))
    assert shapes >= set(full_call_shapes(128, 120_000, 2048))
    for f in range(FRAME_STEP, TAIL_FRAMES + 1, FRAME_STEP):
        for rows in range(16, 129):
            assert (padded_rows(rows, f, 128, 120_000, 16), f) in shapes, (rows, f)
