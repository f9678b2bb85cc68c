"""The engine at run time: voices loaded on a device, warm-up, batched synthesis, OOM
split, memory (the device, dtype and float32 flags: ``device``; the requests and
results it takes and gives: ``records``).

``Engine.prepare`` turns requests into phoneme ids (CPU, thread-safe);
``Engine.run`` synthesizes prepared requests in padded batches on the device, in two
stages, ``plan`` (on a high-priority side stream on a GPU) then ``finish``. A caller may
run them in two threads, one batch's text half beside the previous batch's audio half,
as the daemon does on a GPU (``engine.overlap_halves``, ttsd/engine/PERFORMANCE.md):

1. every sentence of every request becomes one item, sorted by phoneme count;
2. text half (encoder + duration predictor) in strict float32 → durations;
3. lines whose predicted audio exceeds their cap fail alone (runaway guard);
4. audio half (flows float32, decoder in the chosen dtype) on items re-sorted by
   frame count, in sub-batches bounded by a frame budget, each queued before the
   previous one is collected; samples land in each line's final array (int16 PCM with
   ``pcm16``);
5. an out-of-memory error halves the sub-batch and retries, down to one item;
   non-finite audio from a half-precision decoder is retried once in float32.

Steps 1-3 are ``plan``, steps 4-5 and assembly ``finish``. At most one thread plans
and one finishes at a time.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ttsd.engine import faults
from ttsd.engine.device import (
    Precision,
    is_compile_error,
    is_sticky,
    pcm16,
    pick_device,
    pick_dtype,
)
from ttsd.engine.graphs import MAX_ROWS, AudioGraphs, SharedPool, TextGraphs, is_oom
from ttsd.engine.packing import (
    FRAME_STEP,
    TAIL_FRAMES,
    bucket,
    full_call_shapes,
    pack,
    padded_rows,
)
from ttsd.engine.phonemes import Phonemizer, PhonemizerProcesses, ProcessesUnavailable
from ttsd.engine.records import Prepared, Request, Result, RunStats, Stream
from ttsd.engine.vits import Generator, Vits
from ttsd.engine.voice import VoiceInfo, load_model
from ttsd.errors import DeviceLostError, VoiceError
from ttsd.log import get_logger

log = get_logger(__name__)

GPU_BATCH = 128
"""Lines per batch on a GPU when not configured (H100: 3,160x at 128, 2,661x at 64)."""

ENGINE_VERSION = "ttsd-vits-1"
"""Part of every cache key: bump when the audio for the same inputs would change."""




@dataclass
class _Tokens:
    """A batch's text half, token by token: ``m`` and ``logs`` [tokens, channels],
    ``dur`` [tokens] (each call's rows, padding included, one after another), so that an
    audio call gathers its items' tokens with one index instead of a view per item."""
    m: torch.Tensor
    logs: torch.Tensor
    dur: torch.Tensor


@dataclass
class _Item:
    line: int          # index into the prepared list
    sentence: int
    ids: list[int]
    seed: int
    text: _Tokens | None = None
    """Its batch's text half, every token in one row of flat tensors (``_Tokens``)."""
    tok: int = 0
    """Its first token's row in ``text`` (its ``len(ids)`` tokens follow)."""
    frames: int = 0
    out: np.ndarray | None = None
    """Where its samples go: a view into its line's audio (``Engine._line_buffers``)."""
    ok: bool = False
    """Its audio is in ``out``, finite."""
    error: str | None = None


@dataclass
class _Launched:
    """An audio-half call in flight: its samples on their way to pinned host memory."""
    chunk: list[_Item]
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


@dataclass
class LoadedVoice:
    info: VoiceInfo
    model: Vits
    digest: str
    phonemizer: Phonemizer
    dec32: Generator | None = None
    """A float32 copy of the decoder, kept when the decoder runs in half precision."""
    audio_half: Any = None
    """``model.audio_half``, compiled when the engine compiles; eager otherwise."""
    text_frames: Any = None
    """``model.text_frames``, compiled when the engine compiles the text half (used
    for calls bigger than its CUDA graphs take); eager otherwise."""
    graphs: TextGraphs | None = None
    """The text half's CUDA graphs (``Engine.cuda_graphs``)."""
    audio_graphs: AudioGraphs | None = None
    """The audio half's CUDA graphs (``Engine.audio_graphs``)."""
    extra: dict = field(default_factory=dict)


@dataclass
class Plan:
    """A batch after its text half (durations known), waiting for its audio half."""
    prepared: list[Prepared]
    stats: RunStats
    results: list[Result | None]
    voices: list[tuple[LoadedVoice, list[int], list[_Item], dict[int, str]]]
    """Per voice: the loaded voice, indices into ``prepared``, its items, line errors."""


def line_seed(seed: int, text: str, sentence: int) -> int:
    """The noise seed of one sentence: depends on (seed, text, index) only."""
    h = hashlib.blake2b(f"{seed}\x00{sentence}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


class Engine:
    """Loaded voices on one device. Not thread-safe for ``run``; ``prepare`` is."""

    def __init__(self, voices: dict[str, VoiceInfo], *, device: str = "auto",
                 dtype: str = "auto", memory_fraction: float = 0.9,
                 cudnn_benchmark: bool = False, max_audio_s_per_char: float = 0.5,
                 sentence_silence_s: float = 0.2, normalize: bool = True,
                 cache_dir=None, max_batch: int = 0, frame_budget: int = 0,
                 token_budget: int = 80000, compile: str = "auto",
                 compile_text: str = "auto", cuda_graphs: str = "auto",
                 audio_graphs: str = "auto",
                 pack_calls: bool = False, warmup_frames: int = 2048, row_step: int = 0,
                 phonemizer_processes: int = 0,
                 pcm16: bool = False) -> None:
        self.voices = voices
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.cache_dir = cache_dir
        self.max_audio_s_per_char = max_audio_s_per_char
        self.sentence_silence_s = sentence_silence_s
        self.normalize = normalize
        self.pcm16 = pcm16
        """Results as int16 PCM, converted on the device (libsndfile's rule, exactly):
        half the bytes to copy to the host, and the WAV writers only add a header."""
        self.max_batch = max_batch or (GPU_BATCH if self.device.type == "cuda" else 1)
        self.token_budget = token_budget
        self.frame_budget = frame_budget or self.default_frame_budget()
        self.faults = faults.from_env()
        self.compile = compile == "on" or (compile == "auto" and self.device.type == "cuda")
        self.compile_text = compile_text == "on" or (compile_text == "auto" and self.compile)
        """Calls of more than ``graphs.MAX_ROWS`` sentences run the compiled text half,
        in strict float32 still: it is called inside ``Precision.strict`` like the eager
        one (cuDNN reads its TF32 flag at each launch; the matmul flag is also in
        Dynamo's guards). Read at each call, so the bench can switch it off for its
        eager rows."""
        self.cuda_graphs = self.device.type == "cuda" and cuda_graphs != "off"
        """Replay the text half from CUDA graphs (``graphs.TextGraphs``); GPU only."""
        self.audio_graphs = self.device.type == "cuda" and audio_graphs != "off"
        """Replay the audio half from a CUDA graph per call shape (``graphs.AudioGraphs``);
        GPU only."""
        self.pack_calls = pack_calls
        """Audio-half calls cut by ``packing.pack`` (else every ``max_batch`` sentences)."""
        self.warmup_frames = warmup_frames
        """GPU warm-up: the audio half's full-call shape of every frames bucket up to
        this (``warm_audio_shapes``)."""
        self.row_step = row_step if self.device.type == "cuda" else 0
        """Audio-half calls' rows padded to multiples of this (``packing.padded_rows``),
        so that partial calls have warmed shapes; GPU only (0: off)."""
        self.phonemizers = (PhonemizerProcesses(phonemizer_processes)
                            if phonemizer_processes > 0 else None)
        self._loaded: dict[str, LoadedVoice] = {}
        self._voice_lock = threading.Lock()
        self._text_stream = None
        self._staging: list[torch.Tensor | None] = [None, None]
        """Two pinned host buffers, reused: one audio-half call copies into one while the
        host copies the previous call's samples out of the other."""
        self._audio_pool = SharedPool()
        """The memory pool of every voice's audio graphs (``graphs.AudioGraphs``)."""
        self._warmed: set[tuple[str, int, int]] = set()
        """(voice, rows, frames) the audio half has run once (``warm_audio_shapes``)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cudnn_benchmark
            torch.cuda.set_per_process_memory_fraction(memory_fraction, self.device)
            # High priority: the text half's many small kernels go first when the audio
            # half's big ones fill the GPU (at equal priority they queue behind them).
            self._text_stream = torch.cuda.Stream(self.device, priority=-1)
        self.precision = Precision(self.device)

    # ------------------------------------------------------------------ voices

    def default_frame_budget(self) -> int:
        """Padded frames one audio-half call may hold, from the device's free memory now
        (``frame_budget`` when none is given; the bench warms its shapes with it)."""
        if self.device.type != "cuda":
            return 4000
        free, _total = torch.cuda.mem_get_info(self.device)
        # ≈ 0.35 MB of decoder activations per frame in float32, half that in 16 bits.
        per_frame = 350_000 if self.dtype == torch.float32 else 200_000
        return int(max(2000, min(120_000, 0.5 * free / per_frame)))

    def voice(self, name: str) -> LoadedVoice:
        """Load (once) and return a voice, on the device, in the engine's dtype."""
        if name in self._loaded:
            return self._loaded[name]
        with self._voice_lock:   # prepare and plan may ask from two threads
            if name in self._loaded:
                return self._loaded[name]
            return self._load(name)

    def _load(self, name: str) -> LoadedVoice:
        if name not in self.voices:
            known = ", ".join(sorted(self.voices)) or "none"
            raise VoiceError(f"unknown voice {name!r} (known: {known})")
        info = self.voices[name]
        model, digest = load_model(info, self.cache_dir)
        model = model.to(self.device)
        model.dec.optimize()
        dec32 = None
        if self.dtype != torch.float32:
            if self.device.type == "cuda":
                import copy
                dec32 = copy.deepcopy(model.dec)
            model.dec.to(self.dtype)
        audio_half, text_frames = model.audio_half, model.text_frames
        if self.compile:
            # One dynamic-shape graph for every (batch, frames) bucket; Inductor fuses the
            # masks, activations and noise around cuDNN's convolutions.
            audio_half = torch.compile(model.audio_half, dynamic=True)
        if self.compile_text:
            # The same for the text half's LayerNorm transposes, attention pads and spline
            # flows (on an H200 at batch 128: 21.6 → 15.6 ms a call, durations identical).
            text_frames = torch.compile(model.text_frames, dynamic=True)
        lv = LoadedVoice(info, model, digest, Phonemizer(info.config), dec32, audio_half,
                         text_frames)
        if self.device.type == "cuda":
            lv.graphs = TextGraphs(model.text_frames, self.device, self.max_batch)
        if self.audio_graphs:   # one memory pool for every voice's graphs
            lv.audio_graphs = AudioGraphs(audio_half, self.device, model.args.inter,
                                          model.args.hop, self.max_batch, self.frame_budget,
                                          pool=self._audio_pool)
        self._loaded[name] = lv
        return lv

    def warmup(self, name: str, sizes: Sequence[int] | None = None) -> float:
        """Run typical shapes once so kernels are chosen (and compiled) and memory is
        reserved; by default batches of 1, 8 and 32 on a GPU (and 64, which compiles the
        text half of bigger calls), then the audio half's full-call shapes
        (``warmup_frames``); one line on the CPU."""
        if sizes is None:
            sizes = (1, 8, 32) if self.device.type == "cuda" else (1,)
            if self.compile_text and self.max_batch > MAX_ROWS:
                sizes += (min(2 * MAX_ROWS, self.max_batch),)
        lv = self.voice(name)
        t0 = time.perf_counter()
        if self.phonemizers is not None:
            try:
                self.phonemizers.start(lv.digest, lv.info.config)
            except ProcessesUnavailable as exc:
                self._phonemize_here(exc)
        text = "This is a warm-up sentence for the voice, with a comma and a number: 42."
        ids = lv.phonemizer.sentences(text)
        sizes = [s for s in sizes if s <= self.max_batch] or [1]
        self.capture_graphs(name)
        for size in sizes:
            prepared = [Prepared(Request(-i - 1, text, name, seed=i), ids) for i in range(size)]
            self.run(prepared)
        if self.device.type == "cuda" and self.warmup_frames > 0:
            self.warm_audio_shapes(name, self.call_shapes(self.max_batch, self.frame_budget))
            self.reserve_staging(self.frame_budget * lv.model.args.hop)
        return time.perf_counter() - t0

    def call_shapes(self, max_rows: int, budget: int) -> list[tuple[int, int]]:
        """The audio-half call shapes the warm-up runs (``packing.full_call_shapes``):
        with ``pack_calls``, every bucket's multiples of ``row_step`` rows."""
        return full_call_shapes(max_rows, budget, self.warmup_frames, row_step=self.row_step,
                                tail_frames=self.warmup_frames if self.pack_calls else TAIL_FRAMES)

    def reserve_staging(self, samples: int) -> None:
        """Allocate both pinned staging buffers (``_to_host``) for calls of up to
        ``samples`` padded samples now, instead of at the first big calls: pinning host
        memory is slow, and the warm-up's short calls leave the buffers small."""
        dtype = torch.int16 if self.pcm16 else torch.float32
        for slot, buf in enumerate(self._staging):
            if buf is None or buf.numel() < samples or buf.dtype != dtype:
                self._staging[slot] = torch.empty(samples, dtype=dtype, pin_memory=True)

    @torch.inference_mode()
    def warm_audio_shapes(self, name: str, shapes: Sequence[tuple[int, int]]) -> int:
        """Run the audio half once at each (rows, frames) shape not run yet, on
        stand-in inputs; returns how many it ran.

        The first call of a new shape costs 20-45 ms more than the next (measured on an
        H200 at 128 × 320-448 frames: cuDNN builds its plans for each new shape), and a
        fresh daemon's first batches are made of new shapes. A shape warmed once stays
        warm (the bench asks again before each of its rows)."""
        lv, dev = self.voice(name), self.device
        inter, t = lv.model.args.inter, 16
        todo = [s for s in shapes if (name, *s) not in self._warmed]
        if lv.audio_graphs is not None:
            # Biggest first: the graphs' shared pool then reuses the first captures' blocks
            # (in rising sizes each capture reserved new ones: 116 GiB for 76 shapes).
            todo.sort(key=lambda s: -s[0] * s[1])
        t0 = time.perf_counter()
        with self._on_device():
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
                args = (torch.zeros(rows, inter, t, device=dev),
                        torch.zeros(rows, inter, t, device=dev), dur, dur.sum(1), frames,
                        torch.zeros(rows, dtype=torch.long, device=dev),
                        torch.arange(rows, device=dev),
                        torch.full((rows,), 0.667, device=dev))
                try:
                    with self.precision.audio():
                        self._compiled(lv, "audio_half", args)
                except Exception as exc:  # out of memory: the real calls split
                    if is_sticky(exc) or not is_oom(exc):
                        raise
                    self.release_memory()
                    log.warning("engine.audio_shapes_oom", rows=rows, frames=frames)
                    continue
                self._warmed.add((name, rows, frames))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                if lv.audio_graphs is not None and lv.audio_graphs.graphs:
                    torch.cuda.empty_cache()   # the eager runs' blocks: graphs replay now
        if todo:
            graphs = lv.audio_graphs
            log.info("engine.audio_shapes", voice=name, shapes=len(todo),
                     graphs=len(graphs.graphs) if graphs else 0,
                     seconds=round(time.perf_counter() - t0, 2))
        return len(todo)

    @torch.inference_mode()
    def capture_graphs(self, name: str) -> tuple[int, float]:
        """Capture the text half's CUDA graph for every bucket shape of a voice (else
        each shape is captured when first used); returns (graphs, seconds)."""
        lv = self.voice(name)
        if lv.graphs is None or not self.cuda_graphs:
            return 0, 0.0
        t0 = time.perf_counter()
        with self._on_device(), torch.cuda.stream(self._text_stream), self.precision.strict():
            for shape in lv.graphs.shapes():
                if not lv.graphs.capture(*shape):
                    break
        seconds = time.perf_counter() - t0
        log.info("engine.text_graphs", voice=name, graphs=len(lv.graphs.graphs),
                 seconds=round(seconds, 2), off=lv.graphs.off)
        return len(lv.graphs.graphs), seconds

    # ------------------------------------------------------------------ prepare

    def prepare(self, requests: Sequence[Request]) -> list[Prepared]:
        """Phoneme ids per sentence for each request (in this process, or in the
        phonemizer processes when the engine has them)."""
        texts, faults_of, errors = [], [], {}
        for i, r in enumerate(requests):
            text, fault = self.faults.strip(r.text) if self.faults else (r.text, None)
            texts.append(text)
            faults_of.append(fault)
            try:
                self.voice(r.voice)
            except VoiceError as exc:
                errors[i] = str(exc)
        ids: list[list[list[int]] | str | None] = [None] * len(requests)
        by_voice: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            if i not in errors:
                by_voice.setdefault(r.voice, []).append(i)
        for name, idxs in by_voice.items():
            lv = self._loaded[name]
            got = None
            if self.phonemizers is not None:
                try:
                    got = self.phonemizers.sentences_many(lv.digest, lv.info.config,
                                                          [texts[i] for i in idxs])
                except ProcessesUnavailable as exc:
                    self._phonemize_here(exc)
            if got is None:
                got = [lv.phonemizer.sentences(texts[i]) for i in idxs]
            for i, g in zip(idxs, got):
                ids[i] = g
        out = []
        for i, r in enumerate(requests):
            got = errors.get(i, ids[i])
            if isinstance(got, str):
                out.append(Prepared(r, [], got, faults_of[i]))
                continue
            sentences = [s for s in got if len(s) > 2]
            error = None if sentences else "nothing to speak (no phonemes in the text)"
            out.append(Prepared(r, sentences, error, faults_of[i]))
        return out

    def _phonemize_here(self, exc: ProcessesUnavailable) -> None:
        """The phonemizer processes cannot run here: phonemize in this process from
        now on."""
        log.warning("engine.phonemizer_processes_unavailable", error=str(exc))
        self.phonemizers.close()
        self.phonemizers = None

    # ------------------------------------------------------------------ run

    def run(self, prepared: Sequence[Prepared], stream: Stream | None = None
            ) -> tuple[list[Result], RunStats]:
        """Synthesize ``prepared``: ``finish(plan(prepared), stream)``."""
        return self.finish(self.plan(prepared), stream)

    @torch.inference_mode()
    def plan(self, prepared: Sequence[Prepared]) -> Plan:
        """Steps 1-3: the text half of every sentence (on a side stream on a GPU, so it
        can overlap another batch's ``finish``), durations, the runaway guard."""
        prepared = list(prepared)
        plan = Plan(prepared, RunStats(), [None] * len(prepared), [])
        by_voice: dict[str, list[int]] = {}
        for i, p in enumerate(prepared):
            if p.error:
                plan.results[i] = self._fail(p, p.error)
            else:
                by_voice.setdefault(p.request.voice, []).append(i)
        with self._on_device(), torch.cuda.stream(self._text_stream) \
                if self._text_stream is not None else contextlib.nullcontext():
            for name, idxs in by_voice.items():
                lv = self.voice(name)
                items, line_error = self._plan_voice(lv, [prepared[i] for i in idxs], plan.stats)
                plan.voices.append((lv, idxs, items, line_error))
        return plan

    @torch.inference_mode()
    def finish(self, plan: Plan, stream: Stream | None = None
               ) -> tuple[list[Result], RunStats]:
        """Steps 4-5: the audio half of a planned batch, then one result per line.

        ``stream``: called (on this thread) with the results of the lines whose last
        sentence the audio call just finished, as soon as it has, so that they can be
        written while the batch's other calls run; those lines are not in the returned
        list, which holds the rest (failures included)."""
        results = plan.results
        sent: set[int] = set()
        with self._on_device():
            if self.faults:
                self.faults.before_run(plan.prepared)   # exit / hang / slow / sticky
            for lv, idxs, items, line_error in plan.voices:
                sub = [plan.prepared[i] for i in idxs]
                emit = None
                if stream is not None:
                    def emit(done: list[tuple[int, Result]], idxs: list[int] = idxs) -> None:
                        sent.update(idxs[li] for li, _r in done)
                        stream([r for _li, r in done])
                done = self._finish_voice(lv, sub, items, line_error, plan.stats, emit)
                for i, res in zip(idxs, done):
                    results[i] = res
        return [r for i, r in enumerate(results) if r is not None and i not in sent], plan.stats

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Sticky device errors (the context is broken) become DeviceLostError."""
        try:
            yield
        except DeviceLostError:
            raise
        except Exception as exc:  # only sticky device errors are converted
            if is_sticky(exc):
                raise DeviceLostError(f"device error, restart needed: {exc}") from exc
            raise

    def _fail(self, p: Prepared, error: str, sr: int = 0) -> Result:
        return Result(p.request.key, None, sr, error, p.phonemes)

    def _plan_voice(self, lv: LoadedVoice, prepared: list[Prepared],
                    stats: RunStats) -> tuple[list[_Item], dict[int, str]]:
        sr, hop = lv.info.sample_rate, lv.model.args.hop
        if self.faults and self.faults.fast:
            return [], {}
        items = [_Item(li, si, ids, line_seed(p.request.seed, p.request.text, si))
                 for li, p in enumerate(prepared) for si, ids in enumerate(p.sentences)]
        stats.items += len(items)
        # 1-2: text half, longest first: every call queued, then one copy of all their
        # frame counts to the host (one wait for the device per batch, not one per call).
        items.sort(key=lambda it: -len(it.ids))
        t0 = time.perf_counter()
        launched: list[tuple[list[_Item], tuple[torch.Tensor, ...]]] = []
        for chunk in self._chunks(items, lambda it: len(it.ids), self.token_budget):
            self._split_on_oom(
                lambda c: launched.append((c, self._text_half(lv, prepared, c, stats))),
                chunk, stats)
        if launched:
            text = self._join_tokens(prepared, launched)
            frames = torch.cat([out[3] for _c, out in launched]).tolist()
            at = 0
            for chunk, _out in launched:
                for it, f in zip(chunk, frames[at:at + len(chunk)]):
                    if text is None:
                        it.error = "out of GPU memory (the text half's outputs)"
                    it.text, it.frames = text, int(f)
                at += len(chunk)
        stats.text_ms += (time.perf_counter() - t0) * 1000
        # 3: runaway guard per line.
        frames_of_line = [0] * len(prepared)
        for it in items:
            frames_of_line[it.line] += it.frames
        line_error: dict[int, str] = {}
        for li, p in enumerate(prepared):
            seconds = frames_of_line[li] * hop / sr
            cap = 2.0 + self.max_audio_s_per_char * len(p.request.text)
            if p.fault == "long":
                seconds = 60.0 + cap
            if seconds > cap:
                line_error[li] = (f"runaway length: {seconds:.1f} s of audio predicted for "
                                  f"{len(p.request.text)} characters (cap {cap:.1f} s)")
        for it in items:
            if it.error and it.line not in line_error:
                line_error[it.line] = it.error
        return items, line_error

    def _finish_voice(self, lv: LoadedVoice, prepared: list[Prepared], items: list[_Item],
                      line_error: dict[int, str], stats: RunStats,
                      emit: Callable[[list[tuple[int, Result]]], None] | None = None
                      ) -> list[Result]:
        """The audio half of one voice's lines; ``emit`` (see ``finish``) gets (line,
        result) pairs as lines complete."""
        sr = lv.info.sample_rate
        if self.faults and self.faults.fast:
            out = [Result(p.request.key, self._samples(faults.stand_in_audio(p.request.text, sr)),
                          sr, None, p.phonemes) for p in prepared]
            if emit is not None:   # like the real audio half: a call's worth at a time
                step = max(64, self.max_batch)
                for at in range(0, len(out) - 1, step):
                    emit(list(enumerate(out))[at:min(at + step, len(out) - 1)])
            return out
        todo = [it for it in items if it.line not in line_error]
        lines = self._line_buffers(lv, prepared, todo)
        parts = self._parts(prepared, items)
        left = collections.Counter(it.line for it in todo)   # items not collected yet

        def collect(job: _Launched) -> None:
            self._collect_audio(lv, prepared, job, stats)
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
        pending: list[_Launched] = []
        for k, chunk in enumerate(self._audio_calls(todo)):
            try:   # staging buffer k % 2: the call before this one still fills the other
                pending.append(self._launch_audio(lv, prepared, chunk, k % 2))
            except Exception as exc:  # out of memory: drain, then split
                if is_sticky(exc) or not is_oom(exc):
                    raise
                while pending:
                    collect(pending.pop(0))
                self._split_on_oom(lambda c: collect(self._launch_audio(lv, prepared, c, 0)),
                                   chunk, stats)
                continue
            if len(pending) == 2:
                collect(pending.pop(0))
        while pending:
            collect(pending.pop(0))
        return [self._fail(p, line_error[li], sr) if li in line_error else
                self._line_result(lv, p, parts[li], lines.get(li))
                for li, p in enumerate(prepared)]

    def _line_buffers(self, lv: LoadedVoice, prepared: list[Prepared],
                      items: list[_Item]) -> dict[int, np.ndarray]:
        """One zeroed array per line (float32, or int16 with ``pcm16``), its final length
        known from the durations:
        its sentences in order, ``sentence_silence_s`` of silence between them. Each item
        gets ``out``, its span in that array, so the audio half writes samples where they
        end up and no line is concatenated afterwards."""
        sr, hop = lv.info.sample_rate, lv.model.args.hop
        gap = round(self.sentence_silence_s * sr)
        by_line: dict[int, list[_Item]] = {}
        for it in items:
            by_line.setdefault(it.line, []).append(it)
        lines = {}
        for li, its in by_line.items():
            its.sort(key=lambda x: x.sentence)
            total = sum(it.frames for it in its) * hop + gap * (len(its) - 1)
            buf = lines[li] = np.zeros(total, dtype=np.int16 if self.pcm16 else np.float32)
            at = 0
            for it in its:
                n = it.frames * hop
                it.out = buf[at:at + n]
                at += n + gap
        return lines

    def _audio_calls(self, items: list[_Item]) -> Iterator[list[_Item]]:
        """Sorted items (most frames first) → audio-half calls: cut where padding costs
        least (``packing.pack``, ``engine.pack_calls``) or every ``max_batch`` items;
        either way rows × padded frames stay within ``frame_budget``, so full calls have
        the shapes ``packing.full_call_shapes`` warms."""
        if not self.pack_calls:
            yield from self._chunks(items, lambda it: bucket(it.frames, FRAME_STEP),
                                    self.frame_budget)
            return
        for i, j in pack([it.frames for it in items], self.max_batch, self.frame_budget):
            yield items[i:j]

    def _chunks(self, items: list[_Item], cost, budget: int) -> Iterator[list[_Item]]:
        """Sorted items (longest first) → sub-batches within max_batch and a padded budget."""
        chunk: list[_Item] = []
        for it in items:
            longest = cost(chunk[0]) if chunk else cost(it)
            if chunk and (len(chunk) >= self.max_batch or longest * (len(chunk) + 1) > budget):
                yield chunk
                chunk = []
            chunk.append(it)
        if chunk:
            yield chunk

    def _join_tokens(self, prepared: list[Prepared],
                     launched: list[tuple[list[_Item], tuple[torch.Tensor, ...]]]
                     ) -> _Tokens | None:
        """Every text call's tokens as rows of one tensor each (``_Tokens``; a copy per
        call, queued before the frame counts' copy, so they are done when it is), and
        each item's first row (``tok``). The copies briefly hold the outputs about three
        times over: out of memory, the cache is released and they are tried once more;
        None if that fails too (the batch's lines fail, the engine goes on)."""
        for attempt in (1, 2):
            try:
                if self.faults:
                    self.faults.check(prepared, [it for c, _o in launched for it in c],
                                      "tokens")
                ms, logss, durs, base = [], [], [], 0
                for chunk, (m, logs, dur, _f) in launched:
                    b, c, t = m.shape
                    ms.append(m.transpose(1, 2).reshape(b * t, c))
                    logss.append(logs.transpose(1, 2).reshape(b * t, c))
                    durs.append(dur.reshape(b * t))
                    for i, it in enumerate(chunk):
                        it.tok = base + i * t
                    base += b * t
                return _Tokens(torch.cat(ms), torch.cat(logss), torch.cat(durs))
            except Exception as exc:  # out of memory: released, once more
                if is_sticky(exc) or not is_oom(exc):
                    raise   # sticky: DeviceLostError from ``_on_device``, around ``plan``
                ms = logss = durs = []   # the partial copies go before the release
                self.release_memory()
                if attempt == 2:
                    log.error("engine.text_tokens_oom", items=sum(len(c) for c, _o in launched),
                              error=str(exc)[:200])
        return None

    def _split_on_oom(self, fn, chunk: list[_Item], stats: RunStats) -> None:
        try:
            fn(chunk)
        except Exception as exc:  # classified below
            if is_sticky(exc):
                raise DeviceLostError(f"device error, restart needed: {exc}") from exc
            if not is_oom(exc):
                raise
            self.release_memory()
            if len(chunk) == 1:
                chunk[0].error = "out of GPU memory even alone"
                return
            stats.oom_splits += 1
            half = len(chunk) // 2
            self._split_on_oom(fn, chunk[:half], stats)
            self._split_on_oom(fn, chunk[half:], stats)

    def _text_half(self, lv: LoadedVoice, prepared: list[Prepared], chunk: list[_Item],
                   stats: RunStats) -> tuple[torch.Tensor, ...]:
        """Queue the text half of ``chunk``: (m_p, logs_p, durations, frames), on the
        device, not waited for (``_plan_voice`` reads every call's frames at once)."""
        if self.faults:
            self.faults.check(prepared, chunk, "text")
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
        scale = torch.tensor([r.length_scale for r in reqs], dtype=torch.float32)
        inputs = (ids, lengths, sid, seeds, noise_w, scale)
        with self.precision.strict():
            out = lv.graphs.run(inputs) if lv.graphs is not None and self.cuda_graphs else None
            if out is None:
                args = [self._to_device(x) for x in inputs]
                out = (self._compiled(lv, "text_frames", args) if self.compile_text
                       and b > MAX_ROWS else lv.model.text_frames(*args))
            else:
                stats.text_graphed += 1
        stats.text_calls += 1
        stats.token_slots += b * tmax
        stats.tokens += int(lengths.sum())
        return out

    def _launch_audio(self, lv: LoadedVoice, prepared: list[Prepared], chunk: list[_Item],
                      slot: int) -> _Launched:
        """Queue the audio half of ``chunk`` and its copy to staging buffer ``slot``."""
        if self.faults:
            self.faults.check(prepared, chunk, "audio")
        t0 = time.perf_counter()
        began = None
        if self.device.type == "cuda":
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        out, samples, graphed = self._decode(lv, prepared, chunk, None)
        audio, finite, done = self._to_host(out, samples, slot)
        return _Launched(chunk, audio, finite, done, t0,
                         (time.perf_counter() - t0) * 1000, began, graphed)

    def _collect_audio(self, lv: LoadedVoice, prepared: list[Prepared], job: _Launched,
                       stats: RunStats) -> None:
        """Wait for a launched call, copy each item's samples into its line's buffer; a
        non-finite item is decoded again alone in float32 (half-precision decoders)."""
        if job.done is not None:
            job.done.synchronize()
        chunk, hop = job.chunk, lv.model.args.hop
        finite = job.finite.numpy() if isinstance(job.finite, torch.Tensor) else job.finite
        for i, it in enumerate(chunk):
            n = it.frames * hop
            ok = bool(finite[i]) and not (self.faults and prepared[it.line].fault == "nan")
            if ok:
                it.out[:] = job.audio[i, :n]
            elif lv.dec32 is not None:
                again, fin = self._to_host(*self._decode(lv, prepared, [it], lv.dec32)[:2])[:2]
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

    def _decode(self, lv: LoadedVoice, prepared: list[Prepared], chunk: list[_Item],
                dec: Generator | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The audio half on ``chunk``: the engine's (maybe compiled) decoder when
        ``dec`` is None, else ``dec`` eagerly (the float32 retry). Returns the audio
        [B, S] and the samples of each item, on the device (``_to_host`` next), and
        whether a CUDA graph ran it."""
        dev, b = self.device, len(chunk)
        fmax = bucket(max(it.frames for it in chunk), FRAME_STEP)
        ns = np.array([len(it.ids) for it in chunk])
        tmax = int(ns.max())
        text = chunk[0].text   # one batch's text half: every item of a call shares it
        inter = text.m.size(1)
        # Rows past b (``row_step``): no frames, so masked to silence, and dropped below.
        n_rows = b if dec is not None else \
            padded_rows(b, fmax, self.max_batch, self.frame_budget, self.row_step)
        reqs = [prepared[it.line].request for it in chunk]
        pad = [0] * (n_rows - b)
        per_row = ([it.frames for it in chunk] + pad, [r.speaker_id for r in reqs] + pad,
                   [it.seed for it in chunk] + pad)
        noise_l = [r.noise_scale for r in reqs] + pad
        graphs = lv.audio_graphs if dec is None and tmax <= fmax else None
        if graphs is not None:
            with self.precision.audio():   # a capture launches audio-half kernels
                if not graphs.ready(n_rows, fmax):
                    graphs = None
        if graphs is not None:   # the graph's own input buffers (tokens padded to fmax)
            m, logs, dur, frames, sid, seeds, noise = graphs.inputs(n_rows, fmax)
            for x in (m, logs, dur):
                x.zero_()
            rows3 = self._to_device(torch.tensor(per_row))
            for x, v in zip((frames, sid, seeds), rows3):
                x.copy_(v)
            noise.copy_(self._to_device(torch.tensor(noise_l, dtype=torch.float32)))
        else:
            m = torch.zeros(n_rows, inter, tmax, device=dev)
            logs = torch.zeros(n_rows, inter, tmax, device=dev)
            dur = torch.zeros(n_rows, tmax, dtype=torch.long, device=dev)
            # Separate tensors: Dynamo treats views of one storage as aliased inputs.
            frames, sid, seeds = (self._to_device(torch.tensor(v)) for v in per_row)
            noise = self._to_device(torch.tensor(noise_l, dtype=torch.float32))
        # Padded with one gather and one scatter per tensor, from one copy of the indices:
        # a copy per item was 3 × 128 small kernels per call, launched from Python.
        cols = np.arange(int(ns.sum())) - np.repeat(np.cumsum(ns) - ns, ns)
        index = self._to_device(torch.from_numpy(np.stack([
            np.repeat(np.arange(b), ns), cols,
            np.repeat(np.array([it.tok for it in chunk]), ns) + cols])))
        rows, cols_d, src = index
        m[rows, :, cols_d] = text.m[src]
        logs[rows, :, cols_d] = text.logs[src]
        dur[rows, cols_d] = text.dur[src]
        args = (m, logs, dur, frames, fmax, sid, seeds, noise)
        if dec is not None:
            with self.precision.audio():
                out = lv.model.audio_half(*args, dec)
            return out, frames * lv.model.args.hop, False
        with self.precision.audio():
            out = graphs.replay(n_rows, fmax) if graphs is not None else \
                self._compiled(lv, "audio_half", args)
        return out[:b], frames[:b] * lv.model.args.hop, graphs is not None

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the engine's device, copied in stream order without waiting.
        A plain ``.to(device)`` waits for the stream's queued work before it returns:
        each audio call then waited for the one before it, and each text-half call for
        the one before it, so the host could not queue ahead of the GPU. From pinned
        memory the copy is queued and the pinned block is reused only after it ran
        (PyTorch's host allocator records the stream)."""
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _compiled(self, lv: LoadedVoice, half: str, args: Sequence[Any]) -> Any:
        """``lv.<half>(*args)``, where ``half`` (``audio_half`` or ``text_frames``) may be
        compiled. A compiler failure (no C compiler, no Triton) is logged and that half
        runs eagerly (``lv.model.<half>``) from then on."""
        fn, eager = getattr(lv, half), getattr(lv.model, half)
        try:
            return fn(*args)
        except Exception as exc:  # a compiler failure: run eagerly from now on
            if fn == eager or not is_compile_error(exc):
                raise
            log.warning("engine.compile_failed", half=half, error=str(exc).splitlines()[0][:300])
            setattr(lv, half, eager)
            return eager(*args)

    def _to_host(self, out: torch.Tensor, samples: torch.Tensor, slot: int | None = None
                 ) -> tuple[np.ndarray, Any, Any]:
        """Mask, check, normalize and clip on the device, then one copy to the host:
        (audio [B, S], finite [B], CUDA event or None). ``slot``: copy asynchronously into
        that reusable pinned buffer and return the event to wait for (allocating pinned
        memory per call cost ≈ 0.4 s of a 4.6 s daemon run on an H200); None: copy now."""
        valid = torch.arange(out.size(1), device=out.device) < samples.unsqueeze(1)
        out = torch.where(valid, out, 0.0)
        finite = torch.isfinite(out).all(1)
        if self.normalize:
            peak = out.abs().amax(1, keepdim=True)
            out = torch.where(peak > 1e-8, out / peak, 0.0)
        out = out.clamp(-1.0, 1.0)
        if self.pcm16:
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
        done = torch.cuda.Event(enable_timing=True)   # also times the call (_Launched)
        done.record()
        return host.numpy(), fin, done

    def _samples(self, audio: np.ndarray) -> np.ndarray:
        """Float samples from the host as the engine returns samples: int16 with
        ``pcm16`` (the fast stand-in model's tone, so every path keeps that contract)."""
        return pcm16(torch.from_numpy(audio).clamp(-1.0, 1.0)).numpy() if self.pcm16 else audio

    @staticmethod
    def _parts(prepared: list[Prepared], items: list[_Item]) -> list[list[_Item]]:
        parts: list[list[_Item]] = [[] for _ in prepared]
        for it in items:
            parts[it.line].append(it)
        return parts

    def _line_result(self, lv: LoadedVoice, p: Prepared, parts: list[_Item],
                     audio: np.ndarray | None) -> Result:
        """A line whose sentences have all been through the audio half: its audio
        (sentences already joined by ``sentence_silence_s`` of silence, normalized and
        clipped on the device), or why it failed."""
        sr = lv.info.sample_rate
        failed = next((it.error for it in parts if it.error), None)
        if failed:   # the audio half failed for it (out of memory even alone)
            return self._fail(p, failed, sr)
        if not all(it.ok for it in parts):
            return self._fail(p, "the model produced non-finite audio (NaN/Inf)", sr)
        if audio is None:
            audio = np.zeros(0, np.int16 if self.pcm16 else np.float32)
        return Result(p.request.key, audio, sr, None, p.phonemes)

    # ------------------------------------------------------------------ memory

    def synthesize(self, requests: Sequence[Request]) -> list[Result]:
        return self.run(self.prepare(requests))[0]

    def close(self) -> None:
        """Stop the phonemizer processes and drop the audio half's CUDA graphs (their
        pool is given back at the next ``release_memory``)."""
        if self.phonemizers is not None:
            self.phonemizers.close()
        for lv in self._loaded.values():
            if lv.audio_graphs is not None:
                lv.audio_graphs.close()

    def release_memory(self) -> int:
        """Empty the allocator's cache; returns the bytes given back to the driver. The
        CUDA graphs' pools stay: they are the warm state, like the weights (a dropped
        graph would be captured again mid-run, on its shape's second use)."""
        if self.device.type != "cuda":
            return 0
        before = torch.cuda.memory_reserved(self.device)
        torch.cuda.empty_cache()
        return max(0, before - torch.cuda.memory_reserved(self.device))

    def memory(self) -> dict[str, int]:
        if self.device.type != "cuda":
            return {"allocated": 0, "reserved": 0, "peak": 0}
        return {"allocated": torch.cuda.memory_allocated(self.device),
                "reserved": torch.cuda.memory_reserved(self.device),
                "peak": torch.cuda.max_memory_allocated(self.device)}

    def device_info(self) -> dict[str, object]:
        info: dict[str, object] = {"device": str(self.device), "dtype": str(self.dtype).split(".")[-1]}
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            info.update(name=p.name, total_memory=p.total_memory,
                        capability=f"{p.major}.{p.minor}")
        else:
            import platform
            info.update(name=platform.processor() or platform.machine(),
                        threads=torch.get_num_threads())
        return info


def frames_to_seconds(frames: int, hop: int, sr: int) -> float:
    return frames * hop / sr if sr else math.nan
