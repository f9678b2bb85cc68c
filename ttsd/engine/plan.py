"""The text half of a batch (``Engine.plan``): every sentence of every line becomes an
item; items run longest first in padded calls, all queued, then one copy of their
frame counts to the host; lines whose predicted audio exceeds their cap fail alone
(the runaway guard). The ``Plan`` waits for the audio half (``decode``)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ttsd.engine.device import (
    Precision,
    device_errors,
    is_oom,
    is_sticky,
    release_memory,
    to_device,
)
from ttsd.engine.graphs import MAX_ROWS
from ttsd.engine.loaded import LoadedVoice, call_half
from ttsd.engine.options import EngineOptions, Tuning
from ttsd.engine.packing import bucket
from ttsd.engine.records import Prepared, Result, RunStats
from ttsd.errors import DeviceLostError
from ttsd.log import get_logger

log = get_logger(__name__)


@dataclass
class Tokens:
    """A batch's text half, token by token: ``m`` and ``logs`` [tokens, channels],
    ``dur`` [tokens] (each call's rows, padding included, one after another), so that an
    audio call gathers its items' tokens with one index instead of a view per item."""
    m: torch.Tensor
    logs: torch.Tensor
    dur: torch.Tensor


@dataclass
class Item:
    """One sentence of one line."""
    line: int          # index into the voice's prepared lines
    sentence: int
    ids: list[int]
    seed: int
    text: Tokens | None = None
    """Its batch's text half, every token in one row of flat tensors (``Tokens``)."""
    tok: int = 0
    """Its first token's row in ``text`` (its ``len(ids)`` tokens follow)."""
    frames: int = 0
    out: np.ndarray | None = None
    """Where its samples go: a view into its line's audio (``decode.AudioHalf._line_buffers``)."""
    durs: list[int] | None = None
    """With ``EngineOptions.timings``: its tokens' frames, read back with the frame counts."""
    ok: bool = False
    """Its audio is in ``out``, finite."""
    error: str | None = None


@dataclass
class VoicePlan:
    """One voice's lines of a planned batch."""
    voice: LoadedVoice
    lines: list[int]
    """Indices into ``Plan.prepared``."""
    items: list[Item]
    line_error: dict[int, str]
    """Index into ``lines`` → why that line fails (runaway, out of memory)."""


@dataclass
class Plan:
    """A batch after its text half (durations known), waiting for its audio half."""
    prepared: list[Prepared]
    stats: RunStats
    results: list[Result | None]
    """Lines failed before the text half (no phonemes, unknown voice); None: pending."""
    voices: list[VoicePlan] = field(default_factory=list)


def line_seed(seed: int, text: str, sentence: int) -> int:
    """The noise seed of one sentence: depends on (seed, text, index) only."""
    h = hashlib.blake2b(f"{seed}\x00{sentence}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def chunks(items: list[Item], cost: Callable[[Item], int], budget: int, max_rows: int
           ) -> Iterator[list[Item]]:
    """Sorted items (longest first) → sub-batches within ``max_rows`` and a padded
    budget (rows × the first item's ``cost``)."""
    chunk: list[Item] = []
    for it in items:
        longest = cost(chunk[0]) if chunk else cost(it)
        if chunk and (len(chunk) >= max_rows or longest * (len(chunk) + 1) > budget):
            yield chunk
            chunk = []
        chunk.append(it)
    if chunk:
        yield chunk


def split_on_oom(fn: Callable[[list[Item]], None], chunk: list[Item], stats: RunStats,
                 device: torch.device) -> None:
    """``fn(chunk)``; out of memory, the cache is released and each half is tried in
    turn, down to one item, which then fails alone. Sticky errors: DeviceLostError."""
    try:
        fn(chunk)
    except Exception as exc:  # classified below
        if is_sticky(exc):
            raise DeviceLostError(f"device error, restart needed: {exc}") from exc
        if not is_oom(exc):
            raise
        release_memory(device)
        if len(chunk) == 1:
            chunk[0].error = "out of GPU memory even alone"
            return
        stats.oom_splits += 1
        half = len(chunk) // 2
        split_on_oom(fn, chunk[:half], stats, device)
        split_on_oom(fn, chunk[half:], stats, device)


class TextHalf:
    """Steps 1-3 of a batch for one voice's lines (``plan_voice``)."""

    def __init__(self, options: EngineOptions, tuning: Tuning, device: torch.device,
                 precision: Precision) -> None:
        self.options, self.tuning = options, tuning
        self.device, self.precision = device, precision

    def plan_voice(self, lv: LoadedVoice, prepared: list[Prepared], stats: RunStats
                   ) -> tuple[list[Item], dict[int, str]]:
        """The items of ``prepared`` with their durations, and the lines that fail."""
        sr, hop = lv.info.sample_rate, lv.model.hop
        items = [Item(li, si, ids, line_seed(p.request.seed, *p.noise_key(si)))
                 for li, p in enumerate(prepared) for si, ids in enumerate(p.sentences)]
        stats.items += len(items)
        # 1-2: text half, longest first: every call queued, then one copy of all their
        # frame counts to the host (one wait for the device per batch, not one per call).
        items.sort(key=lambda it: -len(it.ids))
        t0 = time.perf_counter()
        launched: list[tuple[list[Item], tuple[torch.Tensor, ...]]] = []
        for chunk in chunks(items, lambda it: len(it.ids), self.tuning.token_budget,
                            self.tuning.max_batch):
            split_on_oom(lambda c: launched.append((c, self._call(lv, prepared, c, stats))),
                         chunk, stats, self.device)
        if launched:
            text = self._join(launched)
            frames = torch.cat([out[3] for _c, out in launched]).tolist()
            durs = ([round(d) for d in text.dur.tolist()]
                    if text is not None and self.options.timings else None)
            at = 0
            for chunk, _out in launched:
                for it, f in zip(chunk, frames[at:at + len(chunk)]):
                    if text is None:
                        it.error = "out of GPU memory (the text half's outputs)"
                    it.text, it.frames = text, int(f)
                    if durs is not None:
                        it.durs = durs[it.tok:it.tok + len(it.ids)]
                at += len(chunk)
        stats.text_ms += (time.perf_counter() - t0) * 1000
        # 3: runaway guard per line.
        frames_of_line = [0] * len(prepared)
        for it in items:
            frames_of_line[it.line] += it.frames
        line_error: dict[int, str] = {}
        for li, p in enumerate(prepared):
            seconds = frames_of_line[li] * hop / sr
            cap = 2.0 + self.options.max_audio_s_per_char * len(p.request.text)
            if seconds > cap:
                line_error[li] = (f"runaway length: {seconds:.1f} s of audio predicted for "
                                  f"{len(p.request.text)} characters (cap {cap:.1f} s)")
        for it in items:
            if it.error and it.line not in line_error:
                line_error[it.line] = it.error
        return items, line_error

    @torch.inference_mode()
    def capture_graphs(self, lv: LoadedVoice, stream: torch.cuda.Stream,
                       shapes: list[tuple[int, int]] | None = None) -> tuple[int, float]:
        """Capture the CUDA graph of ``shapes`` (default: every bucket shape, logged) of
        ``lv``'s text half on ``stream`` (the one ``plan`` runs on); returns (graphs,
        seconds)."""
        assert lv.graphs is not None
        t0 = time.perf_counter()
        with device_errors(), torch.cuda.stream(stream), self.precision.strict():
            for shape in shapes or lv.graphs.shapes():
                if not lv.graphs.capture(*shape):
                    break
        seconds = time.perf_counter() - t0
        if shapes is None:
            log.info("engine.text_graphs", voice=lv.info.name, graphs=len(lv.graphs.graphs),
                     seconds=round(seconds, 2), off=lv.graphs.off)
        return len(lv.graphs.graphs), seconds

    def _call(self, lv: LoadedVoice, prepared: list[Prepared], chunk: list[Item],
              stats: RunStats) -> tuple[torch.Tensor, ...]:
        """Queue the text half of ``chunk``: (m_p, logs_p, durations, frames), on the
        device, not waited for (``plan_voice`` reads every call's frames at once)."""
        b = len(chunk)
        lens = [len(it.ids) for it in chunk]
        tmax = bucket(max(lens), 16)
        ids_np = np.zeros((b, tmax), dtype=np.int64)   # numpy: a torch op per row held
        for i, it in enumerate(chunk):                  # the GIL for ~10 µs each
            ids_np[i, :lens[i]] = it.ids
        ids = torch.from_numpy(ids_np)
        lengths = torch.tensor(lens)
        reqs = [prepared[it.line].request for it in chunk]
        sid = torch.tensor([r.speaker_id for r in reqs])
        seeds = torch.tensor([it.seed for it in chunk])
        noise_w = torch.tensor([r.noise_w for r in reqs], dtype=torch.float32)
        scale = torch.tensor([r.length_scale / prepared[it.line].rate(it.sentence)
                              for r, it in zip(reqs, chunk)], dtype=torch.float32)
        inputs = (ids, lengths, sid, seeds, noise_w, scale)
        with self.precision.strict():
            out = lv.graphs.run(inputs) if lv.graphs is not None and self.tuning.cuda_graphs \
                else None
            if out is None:
                args = [to_device(x, self.device) for x in inputs]
                out = (call_half(lv, "text_frames", args) if self.tuning.compile_text
                       and b > MAX_ROWS else lv.model.text_frames(*args))
            else:
                stats.text_graphed += 1
        stats.text_calls += 1
        stats.token_slots += b * tmax
        stats.tokens += int(lengths.sum())
        return out

    def _join(self, launched: list[tuple[list[Item], tuple[torch.Tensor, ...]]]
              ) -> Tokens | None:
        """Every text call's tokens as rows of one tensor each (``Tokens``; a copy per
        call, queued before the frame counts' copy, so they are done when it is), and
        each item's first row (``tok``). The copies briefly hold the outputs about three
        times over: out of memory, the cache is released and they are tried once more;
        None if that fails too (the batch's lines fail, the engine goes on)."""
        for attempt in (1, 2):
            try:
                ms, logss, durs, base = [], [], [], 0
                for chunk, (m, logs, dur, _f) in launched:
                    b, c, t = m.shape
                    ms.append(m.transpose(1, 2).reshape(b * t, c))
                    logss.append(logs.transpose(1, 2).reshape(b * t, c))
                    durs.append(dur.reshape(b * t))
                    for i, it in enumerate(chunk):
                        it.tok = base + i * t
                    base += b * t
                return Tokens(torch.cat(ms), torch.cat(logss), torch.cat(durs))
            except Exception as exc:  # out of memory: released, once more
                if is_sticky(exc) or not is_oom(exc):
                    raise   # sticky: DeviceLostError from ``device_errors``, around ``plan``
                ms = logss = durs = []   # the partial copies go before the release
                release_memory(self.device)
                if attempt == 2:
                    log.error("engine.text_tokens_oom", items=sum(len(c) for c, _o in launched),
                              error=str(exc)[:200])
        return None
