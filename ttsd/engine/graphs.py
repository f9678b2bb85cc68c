"""CUDA graphs: the text half per (batch, tokens) bucket, the audio half per call shape.

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
most ``MAX_TOKENS``); bigger batches and longer sentences run eagerly. Extra rows
repeat row 0 and extra tokens are masked: rows never mix, so the real rows' outputs are
the eager ones (tests/test_graphs.py checks the padding on the CPU, the bench's quality
rows on the GPU). All graphs share one memory pool, so a
replay may overwrite another graph's outputs: each replay's outputs are copied out at
once, before anything else runs on the stream.

The audio half (flows + decoder) is big per call (30-110 ms on an H200 at 128 rows),
but its compiled kernels are launched from Python: alone they keep ahead of the GPU
(the bench's model-only rows run as fast with graphs as without), while inside the
daemon the model thread shares the interpreter with the writers and the feeder (a run's
batches measured 413-578 ms on the host launching audio calls for 452-674 ms of GPU
time). ``AudioGraphs`` captures the compiled audio half once per (rows, frames) call
shape; a call is then a few input copies and one launch: end to end 5,189 and 5,036x
against 4,479x without (H200, one run each). Its inputs live in buffers shared by every
shape (sized by the frame budget), so graphs never run concurrently: the engine
launches audio calls from one thread, on one stream, and copies each call's output out
before the next call's inputs are written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ttsd.engine.device import is_oom
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
            # from pinned memory: a pageable copy may wait for the stream's queued work
            dst.copy_(src.pin_memory() if dst.is_cuda else src, non_blocking=True)
        graph.replay()
        return tuple(x[:b].clone() for x in out)


class SharedPool:
    """A CUDA graph memory pool handle, set by the first capture into it."""

    handle: tuple | None = None


class AudioGraphs:
    """Replays ``fn`` (the compiled audio half: (m_p, logs_p, durations, frames,
    max_frames, sid, seeds, noise_scale) → audio [rows, max_frames * hop]) from one
    captured graph per (rows, frames) shape, on the current CUDA stream.

    The token axis of the inputs is padded to ``frames``: every token of a sentence
    lasts at least one frame, and padded tokens (no frames) only ever fill positions past
    the sentence's end, which are masked; so one graph serves every token count. A shape
    is captured when first run twice (or at warm-up, ``capture``), so a one-off shape
    never pays for a capture. The caller fills ``inputs(rows, frames)`` and calls
    ``replay``; the returned output is a view of a shared buffer, overwritten by the next
    replay (the engine copies it to the host first, in stream order).

    ``pool``: the memory pool to capture into, shared by every voice of an engine. Every
    graph's memory is scratch (its output is copied into the shared buffer inside the
    graph) and all audio calls run one after another on one stream, so one pool serves
    every shape of every voice: a second voice adds its buffers, not a second pool."""

    def __init__(self, fn: Callable[..., torch.Tensor], device: torch.device, inter: int,
                 hop: int, max_rows: int, budget: int, pool: SharedPool | None = None
                 ) -> None:
        self.fn = fn
        self.device = device
        self.inter, self.hop = inter, hop
        self.max_rows, self.budget = max_rows, budget
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.seen: set[tuple[int, int]] = set()
        self.failed: set[tuple[int, int]] = set()
        self.pool = pool if pool is not None else SharedPool()
        self.off: str | None = None
        self._buf: dict[str, torch.Tensor] | None = None
        self._stream: torch.cuda.Stream | None = None

    def fits(self, rows: int, frames: int) -> bool:
        return (not self.off and rows <= self.max_rows and rows * frames <= self.budget
                and (rows, frames) not in self.failed)

    def inputs(self, rows: int, frames: int) -> tuple[torch.Tensor, ...]:
        """Views of the shared buffers for one shape: m_p, logs_p [rows, inter, frames],
        durations [rows, frames], frames, sid, seeds [rows] (int64), noise_scale [rows]."""
        if self._buf is None:
            dev, n = self.device, self.budget
            self._buf = {
                "m": torch.zeros(n * self.inter, device=dev),
                "logs": torch.zeros(n * self.inter, device=dev),
                "dur": torch.zeros(n, dtype=torch.long, device=dev),
                # Separate tensors: Dynamo treats views of one storage as aliased inputs.
                "frames": torch.zeros(self.max_rows, dtype=torch.long, device=dev),
                "sid": torch.zeros(self.max_rows, dtype=torch.long, device=dev),
                "seeds": torch.zeros(self.max_rows, dtype=torch.long, device=dev),
                "noise": torch.zeros(self.max_rows, device=dev),
                "out": torch.zeros(n * self.hop, device=dev)}
        b, shape3 = self._buf, (rows, self.inter, frames)
        return (b["m"][:rows * self.inter * frames].view(shape3),
                b["logs"][:rows * self.inter * frames].view(shape3),
                b["dur"][:rows * frames].view(rows, frames),
                b["frames"][:rows], b["sid"][:rows], b["seeds"][:rows], b["noise"][:rows])

    def output(self, rows: int, frames: int) -> torch.Tensor:
        self.inputs(rows, frames)
        return self._buf["out"][:rows * frames * self.hop].view(rows, frames * self.hop)

    def ready(self, rows: int, frames: int) -> bool:
        """Whether the shape has a graph: captured now if this is its second use."""
        key = (rows, frames)
        if key in self.graphs:
            return True
        if not self.fits(rows, frames):
            return False
        if key not in self.seen:
            self.seen.add(key)
            return False
        return self.capture(rows, frames)

    def capture(self, rows: int, frames: int) -> bool:
        """Capture one shape (run once first: compiled code, cuDNN plans and workspaces
        are made outside the capture). False if it cannot be: a shape past the rows or
        the frame budget, or one that ran out of memory, runs eagerly; after any other
        failure every shape does (logged)."""
        key = (rows, frames)
        if key in self.graphs:
            return True
        if not self.fits(rows, frames):
            return False
        m, logs, dur, fr, sid, seeds, noise = self.inputs(rows, frames)
        out = self.output(rows, frames)
        m.zero_()
        logs.zero_()
        dur.zero_()
        dur[:, 0] = frames
        fr.fill_(frames)
        sid.zero_()
        seeds.zero_()
        noise.fill_(0.667)
        call = (m, logs, dur, fr, frames, sid, seeds, noise)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        here, side = torch.cuda.current_stream(self.device), self._stream
        graph = torch.cuda.CUDAGraph()
        try:
            self.fn(*call)
            side.wait_stream(here)
            with torch.cuda.stream(side):
                graph.capture_begin(pool=self.pool.handle, capture_error_mode="thread_local")
                try:
                    out.copy_(self.fn(*call))
                finally:
                    graph.capture_end()
            here.wait_stream(side)
        except Exception as exc:  # noqa: BLE001 - out of memory: this shape; else all
            here.wait_stream(side)
            if is_oom(exc):
                self.failed.add(key)
                log.warning("engine.audio_graph_oom", rows=rows, frames=frames)
                return False
            self.off = f"{type(exc).__name__}: {exc}"
            self.graphs.clear()
            log.warning("engine.audio_graphs_off", error=self.off[:300])
            return False
        if self.pool.handle is None:
            self.pool.handle = graph.pool()
        self.graphs[key] = graph
        return True

    def replay(self, rows: int, frames: int) -> torch.Tensor:
        self.graphs[(rows, frames)].replay()
        return self.output(rows, frames)

    def close(self) -> None:
        """Drop the graphs and buffers (the engine is done: a bench row, a closed
        worker); the pool's memory returns to the allocator with its last graph."""
        self.graphs.clear()
        self.seen.clear()
        self._buf = None
        self.off = "closed"
