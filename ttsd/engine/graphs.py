"""CUDA graphs for the text half: one captured graph per (batch, tokens) bucket.

The text half (encoder + stochastic duration predictor, strict float32) is
launch-bound: several hundred small kernels, ≈ 17 ms a call eager at any batch size on
an H100, so its time is mostly the CPU issuing launches (and holding the GIL that the
daemon's other threads need). It has no host synchronisation and, once padded, static
shapes, so each padded shape is captured once and then replayed with one launch.

Only small batches are graphed: measured on an H200 (strict float32, 281 tokens), a call
at batch 1 takes 12.0 ms eager and 2.0 ms replayed, at batch 32 11.1 vs 5.6 ms, but at
batch 128 the GPU itself is busy 20-40 ms a call, eager or not (19.9 vs 18.8 ms at 157
tokens), and padding up to a bucket then costs more than the launches it saves (the
bench: 3,898x graphed vs 4,558x eager at batch 128). So up to ``MAX_ROWS`` rows the
batch rounds up to a power of two and the tokens up to a multiple of ``TOKEN_STEP`` (at
most ``MAX_TOKENS``); bigger batches and longer sentences run eagerly. Extra rows repeat row 0 and extra tokens are masked: rows never mix, so
the real rows' outputs are the eager ones (tests/test_graphs.py checks the padding on
the CPU, the bench's quality rows on the GPU). All graphs share one memory pool, so a
replay may overwrite another graph's outputs: each replay's outputs are copied out at
once, before anything else runs on the stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ttsd.log import get_logger

log = get_logger(__name__)

TOKEN_STEP = 64
MAX_TOKENS = 512
MAX_ROWS = 32

Inputs = tuple[torch.Tensor, ...]
"""ids [B, T] int64, lengths, sid, seeds [B] int64, noise_w, length_scale [B] float32."""


def batch_bucket(b: int, max_batch: int) -> int:
    p = 1
    while p < b:
        p *= 2
    return max(b, min(p, max_batch))


def token_bucket(t: int) -> int:
    return -(-t // TOKEN_STEP) * TOKEN_STEP


def pad_inputs(inputs: Inputs, rows: int, tokens: int) -> Inputs:
    """``inputs`` padded to [rows, tokens]: extra tokens are id 0 past each length,
    extra rows repeat row 0."""
    ids, *per_row = inputs
    b, t = ids.shape
    if tokens > t:
        ids = torch.nn.functional.pad(ids, (0, tokens - t))
    out = [ids, *per_row]
    if rows > b:
        out = [torch.cat([x, x[:1].expand(rows - b, *x.shape[1:])]) for x in out]
    return tuple(out)


class TextGraphs:
    """Replays ``fn`` (the text half: inputs → (m_p, logs_p, durations, frames)) from
    captured graphs on the current CUDA stream. ``run`` returns the first ``b`` rows
    (copies) or None when the shape is not graphed (or capture failed: then the
    engine runs eagerly from there on, and says so once in the log)."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], device: torch.device,
                 max_batch: int) -> None:
        self.fn = fn
        self.device = device
        self.max_batch = min(max_batch, MAX_ROWS)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Inputs, tuple]] = {}
        self.pool = None
        self.off: str | None = None

    def shape(self, b: int, t: int) -> tuple[int, int] | None:
        if self.off or t > MAX_TOKENS or b > self.max_batch:
            return None
        return batch_bucket(b, self.max_batch), token_bucket(t)

    def shapes(self) -> list[tuple[int, int]]:
        """Every bucket shape, largest first (the pool grows once, to the largest)."""
        rows, b = [], 1
        while b < self.max_batch:
            rows.append(b)
            b *= 2
        rows.append(self.max_batch)
        return [(r, t) for r in reversed(rows)
                for t in range(MAX_TOKENS, 0, -TOKEN_STEP)]

    def capture(self, rows: int, tokens: int) -> bool:
        """Capture the graph of one shape (a no-op when it exists); False when
        capturing failed and graphs are off."""
        if (rows, tokens) in self.graphs:
            return True
        if self.off:
            return False
        dev = self.device
        ids = torch.zeros(rows, tokens, dtype=torch.long, device=dev)
        ids[:, :1] = 1
        static = (ids, torch.full((rows,), tokens, dtype=torch.long, device=dev),
                  torch.zeros(rows, dtype=torch.long, device=dev),
                  torch.zeros(rows, dtype=torch.long, device=dev),
                  torch.ones(rows, dtype=torch.float32, device=dev),
                  torch.ones(rows, dtype=torch.float32, device=dev))
        try:
            self.fn(*static)   # lazy initialisation (cuBLAS handles, workspaces) first
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self.fn(*static)
        except Exception as exc:  # noqa: BLE001 - any failure: eager from here on
            self.off = f"{type(exc).__name__}: {exc}"
            self.graphs.clear()
            log.warning("engine.text_graphs_off", error=self.off[:300])
            return False
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(rows, tokens)] = (graph, static, out)
        return True

    def run(self, inputs: Inputs) -> tuple[torch.Tensor, ...] | None:
        b, t = inputs[0].shape
        shape = self.shape(b, t)
        if shape is None or not self.capture(*shape):
            return None
        graph, static, out = self.graphs[shape]
        for dst, src in zip(static, pad_inputs(inputs, *shape)):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return tuple(x[:b].clone() for x in out)
