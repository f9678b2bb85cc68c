"""How a batch's sentences are cut into audio-half calls.

The audio half runs padded: a call of ``rows`` sentences costs about ``rows ×
bucket(longest)`` frames of GPU work plus a fixed cost per call. Cutting the sentences
(sorted longest first) into fixed runs of ``max_rows`` pads every call to its first
sentence, and the last frames bucket adds more: for the bench's 2,000 lines, batches of
512, 0.78 of the padded frames were real. ``pack`` chooses the cuts by dynamic
programming instead, minimising padded frames plus ``call_cost`` frames per call
(0.86 with the same lines; measured on an H200 at 128 rows × 320 frames, a call costs
≈ 3.6 ms plus 0.27 ms a row, so a call is worth ≈ 4,000 padded frames).

Row counts stay multiples of ``unit`` (except a batch's last call and calls of one
sentence), so the number of distinct (rows, frames) shapes stays small: the first call
of a new shape costs 20-45 ms more (cuDNN builds its plans).
"""

from __future__ import annotations

from collections.abc import Sequence

FRAME_STEP = 64
"""Frames are padded to multiples of this (of 4 × this past 16 steps): see ``bucket``."""

CALL_COST = 4000
"""Padded frames a call is worth (its fixed cost on the GPU)."""

ROW_UNIT = 16
"""``pack``'s calls hold a multiple of this many sentences (few distinct shapes)."""

TAIL_FRAMES = 512
"""The warm-up runs the padded partial shapes (``full_call_shapes``) of frames buckets up
to this: a batch's last call holds its shortest sentences (on the bench's lines, 128 or
256 frames in every batch)."""


def bucket(n: int, step: int) -> int:
    """Round a padded length up to a few fixed shapes (multiples of ``step`` up to
    16 steps, then of 4 steps), so cuDNN's per-shape algorithm search runs once per
    bucket instead of once per batch. Padding is masked: results do not change."""
    unit = step if n <= 16 * step else 4 * step
    return -(-n // unit) * unit


def full_call_shapes(max_rows: int, budget: int, max_frames: int,
                     step: int = FRAME_STEP, row_step: int = 0,
                     tail_frames: int = TAIL_FRAMES) -> list[tuple[int, int]]:
    """(rows, frames) of the full audio-half calls that fixed runs of ``max_rows``
    sentences make: every frames bucket up to ``max_frames``, with as many rows as
    ``max_rows`` and ``budget`` allow, longest first (the warm-up runs them once); with
    ``row_step``, also the partial calls' padded rows (``padded_rows``) of the buckets
    up to ``tail_frames`` (every bucket for ``pack``'s calls, whose rows are multiples
    of ``ROW_UNIT`` anywhere)."""
    shapes, f = [], step
    while f <= max_frames:
        rows = min(max_rows, budget // f)
        if rows >= 1:
            if row_step > 1 and f <= tail_frames:
                shapes.extend((r, f) for r in range(row_step, rows, row_step))
            shapes.append((rows, f))
        f = bucket(f + 1, step)
    return shapes[::-1]


def padded_rows(rows: int, frames: int, max_rows: int, budget: int, row_step: int) -> int:
    """The rows a call of ``rows`` sentences of ``frames`` padded frames runs with:
    up to a multiple of ``row_step``, or the full call's rows (``full_call_shapes``),
    whichever is fewer; a call of fewer than ``row_step`` (or more than a full call's:
    one sentence over the budget) runs as it is."""
    full = min(max_rows, budget // frames)
    if row_step <= 1 or rows < row_step or rows >= full:
        return rows
    return min(-(-rows // row_step) * row_step, full)


def pack(frames: Sequence[int], max_rows: int, budget: int, *, unit: int = ROW_UNIT,
         call_cost: int = CALL_COST, step: int = FRAME_STEP) -> list[tuple[int, int]]:
    """Cut ``frames`` (sorted longest first) into calls: (start, end) index pairs in
    order, covering every index once. A call holds at most ``max_rows`` sentences and at
    most ``budget`` padded frames (rows × its longest, bucketed), unless it is one
    sentence alone."""
    n = len(frames)
    if n == 0:
        return []
    if max_rows < unit or budget // bucket(frames[0], step) < unit:
        unit = 1   # small batches, or a budget that allows fewer rows: any count
    inf = float("inf")
    best = [0.0] + [inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        sizes = [1, *range(unit, min(max_rows, j) + 1, unit)]
        if j == n:
            sizes = range(1, min(max_rows, j) + 1)
        for rows in sorted(set(sizes)):
            i = j - rows
            padded = bucket(frames[i], step)
            if rows > 1 and rows * padded > budget:
                break   # longer calls start at longer sentences: over the budget too
            cost = best[i] + rows * padded + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    calls = []
    j = n
    while j > 0:
        calls.append((cut[j], j))
        j = cut[j]
    return calls[::-1]
