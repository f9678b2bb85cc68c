"""The audio half of a planned batch (``Engine.finish``): items re-sorted by frame
count, cut into calls within the frame budget (``packing``), each call queued before
the previous one is collected; samples land in each line's final array. Out of memory
halves a call down to one item; non-finite samples from a half-precision decoder are
decoded again alone in float32."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ttsd.engine.device import (
    Precision,
    device_errors,
    is_oom,
    is_sticky,
    pcm16,
    release_memory,
    to_device,
)
from ttsd.engine.loaded import LoadedVoice, call_half
from ttsd.engine.options import EngineOptions, Tuning
from ttsd.engine.packing import FRAME_STEP, bucket, pack, padded_rows
from ttsd.engine.plan import Item, chunks, split_on_oom
from ttsd.engine.records import Prepared, Result, RunStats, Timing, failure
from ttsd.log import get_logger

log = get_logger(__name__)

Emit = Callable[[list[tuple[int, Result]]], None]
"""Gets (line, result) pairs as lines complete, before the batch does."""


@dataclass
class Launched:
    """An audio-half call in flight: its samples on their way to pinned host memory."""
    chunk: list[Item]
    audio: np.ndarray
    finite: Any
    done: Any = None
    """The CUDA event after the copies (None: already on the host); a timing event."""
    t0: float = 0.0
    launch_ms: float = 0.0
    began: Any = None
    """The timing CUDA event before the call (``done`` - ``began``: its GPU time)."""
    graphed: bool = False
    """Replayed from a CUDA graph."""


class AudioHalf:
    """Steps 4-5 of a batch for one voice's lines (``finish_voice``)."""

    def __init__(self, options: EngineOptions, tuning: Tuning, device: torch.device,
                 precision: Precision) -> None:
        self.options, self.tuning = options, tuning
        self.device, self.precision = device, precision
        self._staging: list[torch.Tensor | None] = [None, None]
        """Two pinned host buffers, reused: one call copies into one while the host
        copies the previous call's samples out of the other."""
        self._warmed: set[tuple[str, int, int]] = set()
        """(voice, rows, frames) the audio half has run once (``warm_shapes``)."""

    def reserve_staging(self, samples: int) -> None:
        """Allocate both pinned staging buffers (``_to_host``) for calls of up to
        ``samples`` padded samples now, instead of at the first big calls: pinning host
        memory is slow, and the warm-up's short calls leave the buffers small."""
        dtype = torch.int16 if self.options.pcm16 else torch.float32
        for slot, buf in enumerate(self._staging):
            if buf is None or buf.numel() < samples or buf.dtype != dtype:
                self._staging[slot] = torch.empty(samples, dtype=dtype, pin_memory=True)

    def warm_order(self, lv: LoadedVoice, shapes: Sequence[tuple[int, int]]
                   ) -> list[tuple[int, int]]:
        """The shapes not run yet, in the order ``warm_shapes`` runs them: with audio
        graphs, biggest first (the graphs' shared pool then reuses the first captures'
        blocks; in rising sizes each capture reserved new ones: 116 GiB for 76 shapes)."""
        todo = [s for s in shapes if (lv.info.name, *s) not in self._warmed]
        if lv.audio_graphs is not None:
            todo.sort(key=lambda s: -s[0] * s[1])
        return todo

    @torch.inference_mode()
    def warm_shapes(self, lv: LoadedVoice, shapes: Sequence[tuple[int, int]],
                    quiet: bool = False) -> int:
        """Run the audio half once at each (rows, frames) shape not run yet, on
        stand-in inputs; returns how many it ran.

        The first call of a new shape costs 20-45 ms more than the next (measured on an
        H200 at 128 × 320-448 frames: cuDNN builds its plans for each new shape), and a
        fresh daemon's first batches are made of new shapes. A shape warmed once stays
        warm (the bench asks again before each of its rows)."""
        dev, name = self.device, lv.info.name
        channels, t = lv.model.channels, 16
        todo = self.warm_order(lv, shapes)
        t0 = time.perf_counter()
        with device_errors():
            for rows, frames in todo:
                if lv.audio_graphs is not None:   # run once, then captured (if it fits)
                    with self.precision.audio():
                        if lv.audio_graphs.capture(rows, frames):
                            self._warmed.add((name, rows, frames))
                            continue
                dur = torch.full((rows, t), frames // t, dtype=torch.long, device=dev)
                dur[:, 0] += frames - (frames // t) * t
                # Two tensors, not one passed twice: Dynamo guards that inputs do not
                # alias, and one that did would compile a second graph for the warm-up.
                args = (torch.zeros(rows, channels, t, device=dev),
                        torch.zeros(rows, channels, t, device=dev), dur, dur.sum(1), frames,
                        torch.zeros(rows, dtype=torch.long, device=dev),
                        torch.arange(rows, device=dev),
                        torch.full((rows,), 0.667, device=dev))
                try:
                    with self.precision.audio():
                        call_half(lv, "audio_half", args)
                except Exception as exc:  # out of memory: the real calls split
                    if is_sticky(exc) or not is_oom(exc):
                        raise
                    release_memory(dev)
                    log.warning("engine.audio_shapes_oom", rows=rows, frames=frames)
                    continue
                self._warmed.add((name, rows, frames))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                if lv.audio_graphs is not None and lv.audio_graphs.graphs:
                    torch.cuda.empty_cache()   # the eager runs' blocks: graphs replay now
        if todo and not quiet:
            graphs = lv.audio_graphs
            log.info("engine.audio_shapes", voice=name, shapes=len(todo),
                     graphs=len(graphs.graphs) if graphs else 0,
                     seconds=round(time.perf_counter() - t0, 2))
        return len(todo)

    def finish_voice(self, lv: LoadedVoice, prepared: list[Prepared], items: list[Item],
                     line_error: dict[int, str], stats: RunStats, emit: Emit | None = None
                     ) -> list[Result]:
        """The audio half of one voice's lines, one result per line; ``emit`` (see
        ``Engine.finish``) gets (line, result) pairs as lines complete."""
        sr = lv.info.sample_rate
        todo = [it for it in items if it.line not in line_error]
        lines = self._line_buffers(lv, prepared, todo)
        parts: list[list[Item]] = [[] for _ in prepared]
        for it in items:
            parts[it.line].append(it)
        left = collections.Counter(it.line for it in todo)   # items not collected yet

        def collect(job: Launched) -> None:
            self._collect(lv, prepared, job, stats)
            if emit is None:
                return
            ready = []
            for it in job.chunk:
                left[it.line] -= 1
                if left[it.line] == 0:
                    ready.append(it.line)
            if ready:
                emit([(li, self._line_result(lv, prepared[li], parts[li], lines.get(li)))
                      for li in ready])

        # 4-5: audio half by frame count. Each call is launched before the previous one is
        # collected, so the GPU works on call k+1 while the host copies call k's samples
        # into the lines' buffers (no pinned allocation and no concatenation per call).
        todo.sort(key=lambda it: -it.frames)
        pending: list[Launched] = []
        for k, chunk in enumerate(self._calls(todo)):
            try:   # staging buffer k % 2: the call before this one still fills the other
                pending.append(self._launch(lv, prepared, chunk, k % 2))
            except Exception as exc:  # out of memory: drain, then split
                if is_sticky(exc) or not is_oom(exc):
                    raise
                while pending:
                    collect(pending.pop(0))
                split_on_oom(lambda c: collect(self._launch(lv, prepared, c, 0)),
                             chunk, stats, self.device)
                continue
            if len(pending) == 2:
                collect(pending.pop(0))
        while pending:
            collect(pending.pop(0))
        return [failure(p, line_error[li], sr) if li in line_error else
                self._line_result(lv, p, parts[li], lines.get(li))
                for li, p in enumerate(prepared)]

    def _line_buffers(self, lv: LoadedVoice, prepared: list[Prepared], items: list[Item]
                      ) -> dict[int, np.ndarray]:
        """One zeroed array per line (float32, or int16 with ``pcm16``), its final length
        known from the durations: its sentences in order, ``sentence_silence_s`` of
        silence between them (or what its markup asks for: ``Prepared.gaps``). Each
        item gets ``out``, its span in that array, so the audio half writes samples
        where they end up and no line is concatenated afterwards."""
        sr, hop = lv.info.sample_rate, lv.model.hop
        by_line: dict[int, list[Item]] = {}
        for it in items:
            by_line.setdefault(it.line, []).append(it)
        lines = {}
        for li, its in by_line.items():
            its.sort(key=lambda x: x.sentence)
            lead, gaps = prepared[li].gaps(self.options.sentence_silence_s, sr)
            total = lead + sum(it.frames for it in its) * hop + sum(gaps)
            buf = lines[li] = np.zeros(total, dtype=np.int16 if self.options.pcm16
                                       else np.float32)
            at = lead
            for it in its:
                n = it.frames * hop
                it.out = buf[at:at + n]
                at += n + gaps[it.sentence]
        return lines

    def _calls(self, items: list[Item]) -> Iterator[list[Item]]:
        """Sorted items (most frames first) → audio-half calls: cut where padding costs
        least (``packing.pack``, ``pack_calls``) or every ``max_batch`` items; either way
        rows × padded frames stay within ``frame_budget``, so full calls have the shapes
        ``packing.full_call_shapes`` warms."""
        t = self.tuning
        if not t.pack_calls:
            yield from chunks(items, lambda it: bucket(it.frames, FRAME_STEP),
                              t.frame_budget, t.max_batch)
            return
        for i, j in pack([it.frames for it in items], t.max_batch, t.frame_budget):
            yield items[i:j]

    def _launch(self, lv: LoadedVoice, prepared: list[Prepared], chunk: list[Item],
                slot: int) -> Launched:
        """Queue the audio half of ``chunk`` and its copy to staging buffer ``slot``."""
        t0 = time.perf_counter()
        began = None
        if self.device.type == "cuda":
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        out, samples, graphed = self._decode(lv, prepared, chunk, None)
        audio, finite, done = self._to_host(out, samples, slot)
        return Launched(chunk, audio, finite, done, t0,
                        (time.perf_counter() - t0) * 1000, began, graphed)

    def _collect(self, lv: LoadedVoice, prepared: list[Prepared], job: Launched,
                 stats: RunStats) -> None:
        """Wait for a launched call, copy each item's samples into its line's buffer; a
        non-finite item is decoded again alone in float32 (half-precision decoders)."""
        if job.done is not None:
            job.done.synchronize()
        chunk, hop = job.chunk, lv.model.hop
        finite = job.finite.numpy() if isinstance(job.finite, torch.Tensor) else job.finite
        for i, it in enumerate(chunk):
            n = it.frames * hop
            ok = bool(finite[i])
            if ok:
                it.out[:] = job.audio[i, :n]
            elif lv.fallback is not None:
                again, fin = self._to_host(*self._decode(lv, prepared, [it], lv.fallback)[:2])[:2]
                ok = bool(fin[0])
                if ok:
                    it.out[:] = again[0, :n]
            it.ok = ok
        stats.audio_calls += 1
        stats.audio_graphed += job.graphed
        stats.frame_slots += len(chunk) * chunk[0].frames
        stats.frames += sum(it.frames for it in chunk)
        stats.audio_ms += (time.perf_counter() - job.t0) * 1000
        stats.audio_launch_ms += job.launch_ms
        if job.began is not None and job.done is not None:   # done: waited for above
            stats.audio_gpu_ms += job.began.elapsed_time(job.done)

    def _decode(self, lv: LoadedVoice, prepared: list[Prepared], chunk: list[Item],
                fallback: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The audio half on ``chunk``: the engine's (maybe compiled) one when
        ``fallback`` is None, else the model's eagerly with ``fallback`` (the float32
        retry). Returns the audio [B, S] and the samples of each item, on the device
        (``_to_host`` next), and whether a CUDA graph ran it."""
        dev, b, t = self.device, len(chunk), self.tuning
        fmax = bucket(max(it.frames for it in chunk), FRAME_STEP)
        ns = np.array([len(it.ids) for it in chunk])
        tmax = int(ns.max())
        text = chunk[0].text   # one batch's text half: every item of a call shares it
        channels = text.m.size(1)
        # Rows past b (``row_step``): no frames, so masked to silence, and dropped below.
        n_rows = b if fallback is not None else \
            padded_rows(b, fmax, t.max_batch, t.frame_budget, t.row_step)
        reqs = [prepared[it.line].request for it in chunk]
        pad = [0] * (n_rows - b)
        per_row = ([it.frames for it in chunk] + pad, [r.speaker_id for r in reqs] + pad,
                   [it.seed for it in chunk] + pad)
        noise_l = [r.noise_scale for r in reqs] + pad
        graphs = lv.audio_graphs if fallback is None and tmax <= fmax else None
        if graphs is not None:
            with self.precision.audio():   # a capture launches audio-half kernels
                if not graphs.ready(n_rows, fmax):
                    graphs = None
        if graphs is not None:   # the graph's own input buffers (tokens padded to fmax)
            m, logs, dur, frames, sid, seeds, noise = graphs.inputs(n_rows, fmax)
            for x in (m, logs, dur):
                x.zero_()
            rows3 = to_device(torch.tensor(per_row), dev)
            for x, v in zip((frames, sid, seeds), rows3):
                x.copy_(v)
            noise.copy_(to_device(torch.tensor(noise_l, dtype=torch.float32), dev))
        else:
            m = torch.zeros(n_rows, channels, tmax, device=dev)
            logs = torch.zeros(n_rows, channels, tmax, device=dev)
            dur = torch.zeros(n_rows, tmax, dtype=torch.long, device=dev)
            # Separate tensors: Dynamo treats views of one storage as aliased inputs.
            frames, sid, seeds = (to_device(torch.tensor(v), dev) for v in per_row)
            noise = to_device(torch.tensor(noise_l, dtype=torch.float32), dev)
        # Padded with one gather and one scatter per tensor, from one copy of the indices:
        # a copy per item was 3 × 128 small kernels per call, launched from Python.
        cols = np.arange(int(ns.sum())) - np.repeat(np.cumsum(ns) - ns, ns)
        index = to_device(torch.from_numpy(np.stack([
            np.repeat(np.arange(b), ns), cols,
            np.repeat(np.array([it.tok for it in chunk]), ns) + cols])), dev)
        rows, cols_d, src = index
        m[rows, :, cols_d] = text.m[src]
        logs[rows, :, cols_d] = text.logs[src]
        dur[rows, cols_d] = text.dur[src]
        args = (m, logs, dur, frames, fmax, sid, seeds, noise)
        if fallback is not None:
            with self.precision.audio():
                out = lv.model.audio_half(*args, fallback)
            return out, frames * lv.model.hop, False
        with self.precision.audio():
            out = graphs.replay(n_rows, fmax) if graphs is not None else \
                call_half(lv, "audio_half", args)
        return out[:b], frames[:b] * lv.model.hop, graphs is not None

    def _to_host(self, out: torch.Tensor, samples: torch.Tensor, slot: int | None = None
                 ) -> tuple[np.ndarray, Any, Any]:
        """Mask, check, normalize and clip on the device, then one copy to the host:
        (audio [B, S], finite [B], CUDA event or None). ``slot``: copy asynchronously into
        that reusable pinned buffer and return the event to wait for (allocating pinned
        memory per call cost ≈ 0.4 s of a 4.6 s daemon run on an H200); None: copy now."""
        valid = torch.arange(out.size(1), device=out.device) < samples.unsqueeze(1)
        out = torch.where(valid, out, 0.0)
        finite = torch.isfinite(out).all(1)
        peak = out.abs().amax(1, keepdim=True)
        out = torch.where(peak > 1e-8, out / peak, 0.0)
        out = out.clamp(-1.0, 1.0)
        if self.options.pcm16:
            out = pcm16(out)
        if out.device.type != "cuda":
            return out.numpy(), finite.numpy(), None
        if slot is None:
            return out.cpu().numpy(), finite.cpu().numpy(), None
        buf = self._staging[slot]
        if buf is None or buf.numel() < out.numel() or buf.dtype != out.dtype:
            buf = self._staging[slot] = torch.empty(
                int(out.numel() * 1.25), dtype=out.dtype, pin_memory=True)
        host = buf[:out.numel()].view(out.shape)
        host.copy_(out, non_blocking=True)
        fin = finite.to("cpu", non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)   # also times the call (Launched)
        done.record()
        return host.numpy(), fin, done

    def _line_result(self, lv: LoadedVoice, p: Prepared, parts: list[Item],
                     audio: np.ndarray | None) -> Result:
        """A line whose sentences have all been through the audio half: its audio
        (sentences already joined by ``sentence_silence_s`` of silence, normalized and
        clipped on the device), or why it failed."""
        sr = lv.info.sample_rate
        failed = next((it.error for it in parts if it.error), None)
        if failed:   # the audio half failed for it (out of memory even alone)
            return failure(p, failed, sr)
        if not all(it.ok for it in parts):
            return failure(p, "the model produced non-finite audio (NaN/Inf)", sr)
        if audio is None:
            audio = np.zeros(0, np.int16 if self.options.pcm16 else np.float32)
        timing = None
        if self.options.timings:
            symbols = lv.phonemizer.symbols
            lead, gaps = p.gaps(self.options.sentence_silence_s, sr)
            timing = Timing(lv.model.hop, lead, gaps, [
                ([symbols.get(i, "?") for i in it.ids], list(it.durs or [0] * len(it.ids)))
                for it in sorted(parts, key=lambda x: x.sentence)])
        return Result(p.request.key, audio, sr, None, p.phonemes, timing)
