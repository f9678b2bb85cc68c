"""The engine: voices loaded on a device, warm-up, batched synthesis.

``Engine.prepare`` turns requests into phoneme ids (CPU, thread-safe);
``Engine.run`` synthesizes prepared requests in padded batches on the device, in two
stages, ``plan`` (on a high-priority side stream on a GPU) then ``finish``. A caller may
run them in two threads, one batch's text half beside the previous batch's audio half,
as the daemon does on a GPU (``Engine.overlaps``, docs/performance.md):

1. every sentence of every request becomes one item, sorted by phoneme count;
2. text half (encoder + duration predictor) in strict float32 → durations;
3. lines whose predicted audio exceeds their cap fail alone (runaway guard);
4. audio half (flows float32, decoder in the chosen dtype) on items re-sorted by
   frame count, in sub-batches bounded by a frame budget, each queued before the
   previous one is collected; samples land in each line's final array (int16 PCM with
   ``pcm16``);
5. an out-of-memory error halves the sub-batch and retries, down to one item;
   non-finite audio from a half-precision decoder is retried once in float32.

Steps 1-3 are ``plan`` (``ttsd.engine.plan``), steps 4-5 and assembly ``finish``
(``ttsd.engine.decode``). At most one thread plans and one finishes at a time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import time
from collections.abc import Sequence

import torch

from ttsd.engine.decode import AudioHalf
from ttsd.engine.device import (
    Precision,
    configure_process,
    default_frame_budget,
    describe,
    device_errors,
    memory,
    pick_device,
    pick_dtype,
    release_memory,
)
from ttsd.engine.graphs import MAX_ROWS, SharedPool
from ttsd.engine.loaded import LoadedVoice, make_ready
from ttsd.engine.model import Loader, load_voice_model
from ttsd.engine.options import ENGINE_VERSION, FACTORY_ENV, GPU_BATCH, EngineOptions, Tuning
from ttsd.engine.packing import TAIL_FRAMES, full_call_shapes
from ttsd.engine.phonemes import PhonemizerProcesses, ProcessesUnavailable
from ttsd.engine.plan import Plan, TextHalf, VoicePlan
from ttsd.engine.records import Prepared, Request, Result, RunStats, Stream, failure
from ttsd.engine.voice import discover
from ttsd.engine.warmup import Warmup
from ttsd.errors import VoiceError
from ttsd.log import get_logger
from ttsd.markup.ssml import Marked, MarkupError
from ttsd.markup.ssml import parse as parse_markup

__all__ = ["ENGINE_VERSION", "GPU_BATCH", "Engine", "Plan", "open_engine", "start_engine"]

log = get_logger(__name__)


def open_engine(options: EngineOptions) -> Engine:
    """The engine ``options`` describe: ``Engine(options)`` (``tone.ToneEngine`` for the
    tone model), or what the factory named by ``$TTSD_ENGINE_FACTORY`` makes of them."""
    spec = os.environ.get(FACTORY_ENV)
    if not spec:
        if options.model == "tone":
            from ttsd.engine.tone import ToneEngine
            return ToneEngine(options)
        return Engine(options)
    path, _, name = spec.partition(":")
    found = importlib.util.spec_from_file_location("ttsd_engine_factory", path)
    if found is None or found.loader is None:
        raise VoiceError(f"${FACTORY_ENV}: {path} is not a Python file")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return getattr(module, name or "engine")(options)


def start_engine(options: EngineOptions) -> Engine:
    """The engine of a process that runs one (the daemon, a worker process, ``say``,
    the bench): the process-wide settings for its device first
    (``device.configure_process``), then ``open_engine``."""
    configure_process(options)
    return open_engine(options)


class Engine:
    """Loaded voices on one device. Not thread-safe for ``run``; ``prepare`` is.

    ``models``: how a voice becomes a model (default: ``model.load_voice_model``, the
    architecture ``options.model`` names)."""

    def __init__(self, options: EngineOptions, *, models: Loader | None = None) -> None:
        self.options = options
        self.voices = discover(options.voices_dir)
        self.device = pick_device(options.device)
        self.dtype = pick_dtype(options.dtype, self.device)
        self.tuning = Tuning.resolve(options, self.device,
                                     default_frame_budget(self.device, self.dtype))
        self.precision = Precision(self.device)
        self.phonemizers = (PhonemizerProcesses(options.phonemizer_processes)
                            if options.phonemizer_processes > 0 else None)
        self._models = models or load_voice_model
        self._loaded: dict[str, LoadedVoice] = {}
        self._voice_lock = threading.Lock()
        self._text_stream = None
        if self.device.type == "cuda":
            # High priority: the text half's many small kernels go first when the audio
            # half's big ones fill the GPU (at equal priority they queue behind them).
            self._text_stream = torch.cuda.Stream(self.device, priority=-1)
        self._text = TextHalf(options, self.tuning, self.device, self.precision)
        self.pending_warmup: Warmup | None = None
        self._audio = AudioHalf(options, self.tuning, self.device, self.precision)
        self._audio_pool = SharedPool()
        """The memory pool of every voice's audio graphs (``graphs.AudioGraphs``)."""

    @property
    def overlaps(self) -> bool:
        """Whether the daemon runs the next batch's text half beside this batch's audio
        half (``EngineOptions.overlap_halves``: "auto" = on a GPU)."""
        return self.options.overlaps(self.device.type == "cuda")

    # ------------------------------------------------------------------ voices

    def voice(self, name: str) -> LoadedVoice:
        """Load (once) and return a voice, on the device, in the engine's dtype."""
        if name in self._loaded:
            return self._loaded[name]
        with self._voice_lock:   # prepare and plan may ask from two threads
            if name in self._loaded:
                return self._loaded[name]
            if name not in self.voices:
                known = ", ".join(sorted(self.voices)) or "none"
                raise VoiceError(f"unknown voice {name!r} (known: {known})")
            info = self.voices[name]
            model, digest = self._models(info, self.options)
            compiled = self.options.cache_dir / "compiled" if self.options.cache_dir else None
            lv = self._loaded[name] = make_ready(info, model, digest, self.device, self.dtype,
                                                 self.tuning, self._audio_pool, compiled)
            return lv

    def default_frame_budget(self) -> int:
        """Padded frames one audio-half call may hold, from the device's free memory now
        (the engine's ``tuning.frame_budget``; the bench warms its shapes with it)."""
        return default_frame_budget(self.device, self.dtype)

    def warmup(self, name: str, sizes: Sequence[int] | None = None, defer: bool = False
               ) -> float:
        """Run typical shapes once so kernels are chosen (and compiled) and memory is
        reserved; by default batches of 1, 8 and 32 on a GPU (and 64, which compiles the
        text half of bigger calls), then the audio half's full-call shapes
        (``warmup_frames``); one line on the CPU. With ``defer``, only the first size
        runs now and the rest waits in ``pending_warmup`` for ``warm_step``."""
        t = self.tuning
        if sizes is None:
            sizes = (1, 8, 32) if self.device.type == "cuda" else (1,)
            if t.compile_text and t.max_batch > MAX_ROWS:
                sizes += (min(2 * MAX_ROWS, t.max_batch),)
        lv = self.voice(name)
        t0 = time.perf_counter()
        if self.phonemizers is not None:
            try:
                self.phonemizers.start(lv.digest, lv.info.config)
            except ProcessesUnavailable as exc:
                self._phonemize_here(exc)
        text = "This is a warm-up sentence for the voice, with a comma and a number: 42."
        ids = lv.phonemizer.sentences(text)
        sizes = [s for s in sizes if s <= t.max_batch] or [1]
        steps = Warmup(name)

        def run(size: int) -> None:
            self.run([Prepared(Request(-i - 1, text, name, seed=i), ids) for i in range(size)])
        if lv.graphs is not None and t.cuda_graphs:
            for shape in lv.graphs.shapes():
                steps.add(f"text graph {shape}",
                          lambda s=shape: self._text.capture_graphs(lv, self._text_stream, [s]))
        for size in sizes[1:] if defer else sizes:
            steps.add(f"batch {size}", lambda s=size: run(s))
        if self.device.type == "cuda" and t.warmup_frames > 0:
            shapes = self.call_shapes(t.max_batch, t.frame_budget)
            if defer:   # a shape a step (0.05-0.14 s each on an H100)
                for shape in self._audio.warm_order(lv, shapes):
                    steps.add(f"audio shape {shape}", lambda s=shape: self._audio.warm_shapes(
                        lv, [s], quiet=True))
            else:
                steps.add("audio shapes", lambda: self._audio.warm_shapes(lv, shapes))
            steps.add("staging", lambda: self.reserve_staging(t.frame_budget * lv.model.hop))
        if defer:
            run(sizes[0])
            self.pending_warmup = steps if len(steps) else None
        else:
            while steps.step(budget_s=60.0):
                pass
        return time.perf_counter() - t0

    @property
    def warms_up_later(self) -> bool:
        """Whether most of the warm-up may wait for idle time (``warmup(defer=True)``):
        nothing is compiled just in time, which a first batch would then pay for."""
        return not self.tuning.compile or self.tuning.compile_ahead

    def warm_step(self) -> bool:
        """One step of a deferred warm-up (``warmup(defer=True)``), about 0.1 s; whether
        any are left."""
        if self.pending_warmup is None:
            return False
        if not self.pending_warmup.step():
            self.pending_warmup = None
        return self.pending_warmup is not None

    def call_shapes(self, max_rows: int, budget: int) -> list[tuple[int, int]]:
        """The audio-half call shapes the warm-up runs (``packing.full_call_shapes``):
        with ``pack_calls``, every bucket's multiples of ``row_step`` rows."""
        t = self.tuning
        return full_call_shapes(max_rows, budget, t.warmup_frames, row_step=t.row_step,
                                tail_frames=t.warmup_frames if t.pack_calls else TAIL_FRAMES)

    def reserve_staging(self, samples: int) -> None:
        """Pin the host buffers of audio calls of up to ``samples`` padded samples now
        (``decode.AudioHalf.reserve_staging``)."""
        self._audio.reserve_staging(samples)

    def warm_audio_shapes(self, name: str, shapes: Sequence[tuple[int, int]]) -> int:
        """Run the audio half of a voice once at each (rows, frames) shape not run yet
        (``decode.AudioHalf.warm_shapes``); returns how many it ran."""
        return self._audio.warm_shapes(self.voice(name), shapes)

    def capture_graphs(self, name: str) -> tuple[int, float]:
        """Capture the text half's CUDA graph for every bucket shape of a voice (else
        each shape is captured when first used); returns (graphs, seconds)."""
        lv = self.voice(name)
        if lv.graphs is None or not self.tuning.cuda_graphs:
            return 0, 0.0
        return self._text.capture_graphs(lv, self._text_stream)

    # ------------------------------------------------------------------ prepare

    def prepare(self, requests: Sequence[Request]) -> list[Prepared]:
        """Phoneme ids per sentence for each request (in this process, or in the
        phonemizer processes when the engine has them)."""
        errors: dict[int, str] = {}
        for i, r in enumerate(requests):
            try:
                self.voice(r.voice)
            except VoiceError as exc:
                errors[i] = str(exc)
        # Each text to phonemize: a line's, or each segment's of a marked-up line.
        marked: dict[int, Marked] = {}
        for i, r in enumerate(requests):
            if r.markup and i not in errors:
                try:
                    marked[i] = parse_markup(r.text, self.options.markup)
                except MarkupError as exc:
                    errors[i] = f"markup: {exc}"
        ids: list[list[list[list[int]] | str]] = [[] for _ in requests]
        by_voice: dict[str, list[tuple[int, str]]] = {}
        for i, r in enumerate(requests):
            if i in errors:
                continue
            texts = [s.text for s in marked[i].segments] if i in marked else [r.text]
            by_voice.setdefault(r.voice, []).extend((i, t) for t in texts)
        for name, texts in by_voice.items():
            lv = self._loaded[name]
            got = None
            if self.phonemizers is not None:
                try:
                    got = self.phonemizers.sentences_many(lv.digest, lv.info.config,
                                                          [t for _i, t in texts])
                except ProcessesUnavailable as exc:
                    self._phonemize_here(exc)
            if got is None:
                got = [lv.phonemizer.sentences(t) for _i, t in texts]
            for (i, _t), g in zip(texts, got):
                ids[i].append(g)
        return [Prepared(r, [], errors[i]) if i in errors else _prepared(r, ids[i], marked.get(i))
                for i, r in enumerate(requests)]

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
        plan = Plan(prepared, RunStats(), [None] * len(prepared))
        by_voice: dict[str, list[int]] = {}
        for i, p in enumerate(prepared):
            if p.error:
                plan.results[i] = failure(p, p.error)
            else:
                by_voice.setdefault(p.request.voice, []).append(i)
        with device_errors(), torch.cuda.stream(self._text_stream) \
                if self._text_stream is not None else contextlib.nullcontext():
            for name, idxs in by_voice.items():
                lv = self.voice(name)
                items, line_error = self._text.plan_voice(lv, [prepared[i] for i in idxs],
                                                          plan.stats)
                plan.voices.append(VoicePlan(lv, idxs, items, line_error))
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
        with device_errors():
            for vp in plan.voices:
                emit = None
                if stream is not None:
                    def emit(done: list[tuple[int, Result]], idxs: list[int] = vp.lines) -> None:
                        sent.update(idxs[li] for li, _r in done)
                        stream([r for _li, r in done])
                done = self._audio.finish_voice(vp.voice, [plan.prepared[i] for i in vp.lines],
                                                vp.items, vp.line_error, plan.stats, emit)
                for i, res in zip(vp.lines, done):
                    results[i] = res
        return [r for i, r in enumerate(results) if r is not None and i not in sent], plan.stats

    def synthesize(self, requests: Sequence[Request]) -> list[Result]:
        return self.run(self.prepare(requests))[0]

    # ------------------------------------------------------------------ memory

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
        return release_memory(self.device)

    def memory(self) -> dict[str, int]:
        return memory(self.device)

    def device_info(self) -> dict[str, object]:
        return describe(self.device, self.dtype)


def _prepared(r: Request, got: list[list[list[int]] | str], marked: Marked | None
              ) -> Prepared:
    """A line's sentences from its texts' phonemes (one text, or one per segment of a
    marked-up line: each sentence then takes its segment's speed, and the segment's
    last sentence its pause)."""
    failed = next((g for g in got if isinstance(g, str)), None)
    if failed is not None:
        return Prepared(r, [], failed)
    sentences: list[list[int]] = []
    rates: list[float] = []
    pauses: list[float | None] = []
    keys: list[tuple[str, int]] = []
    for k, part in enumerate(got):
        said = [s for s in part if len(s) > 2]
        rate, pause = (marked.segments[k].rate, marked.segments[k].pause_s) if marked \
            else (1.0, 0.0)
        if not said:   # punctuation alone: its pause joins the one before
            if pauses:
                pauses[-1] = (pauses[-1] or 0.0) + pause
            continue
        sentences += said
        keys += [(marked.segments[k].text, j) for j in range(len(said))] if marked else []
        rates += [rate] * len(said)
        pauses += [None] * (len(said) - 1) + [pause]
    if not sentences:
        return Prepared(r, [], "nothing to speak (no phonemes in the text)")
    if marked is None:
        return Prepared(r, sentences)
    return Prepared(r, sentences, rates=rates, pauses=pauses, lead_s=marked.lead_s,
                    noise_keys=keys)
