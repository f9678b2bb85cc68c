"""What an engine is made of: one frozen record, built once from the config.

``EngineOptions.from_config`` is the one place where the engine's settings are read
from the config; the daemon, its worker processes, ``ttsd say`` and the bench build
their engines from its record. The tuning fields at the end are not in the config:
they hold the values the measurements chose (docs/performance.md), and the bench
and the tests set them here to compare.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttsd.markup.ssml import MarkupOptions

if TYPE_CHECKING:
    import torch

    from ttsd.config import Config

GPU_BATCH = 128
"""Lines per batch on a GPU when not configured (H100: 3,160x at 128, 2,661x at 64)."""

ENGINE_VERSION = "ttsd-vits-1"
"""Part of every cache key: bump when the audio for the same inputs would change."""

MODEL_ENV = "TTSD_MODEL"
"""``from_config`` takes ``model`` from this environment variable when it is set
(``TTSD_MODEL=tone``: the load bench's daemon, which it starts as a subprocess)."""

FACTORY_ENV = "TTSD_ENGINE_FACTORY"
"""``FILE.py`` or ``FILE.py:FUNCTION``: ``runtime.open_engine`` builds the engine with
that function (default ``engine``) of that file instead of ``Engine``. The tests name
their fault-injecting engine here (tests/faults.py) for the daemons they start; worker
processes inherit it, Ray actors get it with their runtime environment."""


@dataclass(frozen=True)
class EngineOptions:
    """An engine's settings. Picklable: worker processes get the same record."""

    voices_dir: Path | None = None
    """Extra voices (``NAME.onnx`` + ``NAME.onnx.json``); the packaged voice is always
    there."""
    cache_dir: Path | None = None
    """Where converted voices are kept (``ttsd.engine.voice.load_model``); None: none."""
    model: str = "vits"
    """The voice architecture (``ttsd.engine.model.MODELS``): "vits", the voices' own
    network, or "tone", a tone as long as the text (no network: load tests)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cuda, cuda:N or cpu."""
    dtype: str = "auto"
    """The decoder's dtype: auto (bfloat16 on a GPU, else float32), float32, float16 or
    bfloat16 (the text half and the flows stay float32)."""
    memory_fraction: float = 0.9
    """Share of the GPU's memory this process may use (``device.configure_process``)."""
    max_batch: int = 0
    """Sentences per model call; 0: ``GPU_BATCH`` on a GPU, 1 on the CPU."""
    token_budget: int = 80000
    """Padded phonemes (longest × sentences) of one text-half call."""
    max_audio_s_per_char: float = 0.5
    """A line may yield at most 2 s + this × its characters of audio (runaway guard)."""
    sentence_silence_s: float = 0.2
    """Silence between the sentences of one line."""
    pcm16: bool = False
    """Results as int16 PCM, converted on the device (libsndfile's rule, exactly): half
    the bytes to copy to the host, and the WAV writers only add a header."""
    timings: bool = False
    """Keep each line's phoneme durations in its result (``Result.timing``) for
    ``output.timestamps``: one more copy of the text half's durations to the host."""
    phonemizer_processes: int = 0
    """espeak-ng in this many worker processes (``phonemes.PhonemizerProcesses``); 0:
    in this process."""
    compile: str = "auto"
    """torch.compile the audio half: "auto" (on a GPU), "on" or "off"; or "ahead":
    both halves compiled once per machine into packages (``aot``) that every later
    process loads instead of tracing the model again (on an H100 a warm restart traced
    and compiled for 44 s before its first batch)."""

    fused: str = "off"
    """"on": the decoder's residual blocks as fused Triton kernels where they run (a GPU;
    under Triton's interpreter any device, for the tests), unless ``compile`` is
    "ahead"; "off": torch's ops."""

    # ------------------------------------------------------------------ tuning
    compile_text: str = "auto"
    """torch.compile the text half too (strict float32 still), for calls of more than
    ``graphs.MAX_ROWS`` sentences, which its CUDA graphs do not take: "auto" (when
    ``compile`` is on), "on" or "off". On an H200 at batch 128: 21.6 → 15.6 ms a call,
    every duration the same."""
    cuda_graphs: str = "auto"
    """Replay the text half of small calls from CUDA graphs (``graphs.TextGraphs``):
    "auto"/"on" (on a GPU) or "off". One line at a time went 247x → 603x on an H200."""
    audio_graphs: str = "auto"
    """Replay the audio half from a CUDA graph per call shape (``graphs.AudioGraphs``):
    "auto"/"on" (on a GPU) or "off". End to end on an H200: 5,189 and 5,036x vs 4,479x
    off."""
    pack_calls: bool = True
    """Cut each batch's sentences into audio-half calls where padding costs least
    (``packing.pack``) instead of every ``max_batch`` sentences: padding 0.84 → 0.90,
    end to end 5,640 and 5,613x vs 5,059 and 5,310x (H200, audio graphs on)."""
    warmup_frames: int = 2048
    """GPU warm-up: run the audio half once at the full-call shape of every frames bucket
    up to this many frames (``packing.full_call_shapes``), so that the first batches do
    not pay for new shapes (20-45 ms each on an H200). 0: off."""
    row_step: int = 16
    """GPU: an audio-half call of at least this many sentences runs with its rows padded
    up to a multiple of this (``packing.padded_rows``), a shape the warm-up ran. 0: off."""
    cudnn_benchmark: bool = False
    """Let cuDNN time its kernels for each new shape (GPU only): with varied batch shapes
    the search itself dominated (batch latency p95 1.6-5 s on an H100)."""
    overlap_halves: str = "auto"
    """The daemon runs the next batch's text half in its feeder thread, beside this
    batch's audio half (``Engine.overlaps``): "auto"/"on" (on a GPU) or "off". End to
    end on an H200 it won four runs out of four (+2 % to +23 %); on the CPU the halves
    would fight over the same cores."""

    markup: MarkupOptions = field(default_factory=MarkupOptions)
    """How SSML lines are read (``Request.markup``)."""

    def overlaps(self, gpu: bool) -> bool:
        """``overlap_halves`` resolved for an engine on a GPU or not."""
        return self.overlap_halves == "on" or (self.overlap_halves == "auto" and gpu)

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> EngineOptions:
        """The options the config describes (and ``$TTSD_MODEL``), then ``overrides``
        (field names: ``device="cpu"``, ``phonemizer_processes=0``, ...)."""
        e = cfg.engine
        options = cls(
            voices_dir=e.voices_dir, cache_dir=cfg.paths.voices_cache,
            model=os.environ.get(MODEL_ENV) or cls.model,
            device=e.device, dtype=e.dtype, memory_fraction=e.memory_fraction,
            max_batch=cfg.batching.max_batch_size, token_budget=cfg.batching.max_phonemes,
            max_audio_s_per_char=e.max_audio_s_per_char,
            sentence_silence_s=e.sentence_silence_s, pcm16=cfg.output.pcm16,
            timings=cfg.output.timestamps,
            phonemizer_processes=e.phonemizer_processes or default_phonemizers(),
            compile=e.compile, fused=e.fused,
            markup=MarkupOptions.from_config(cfg))
        return dataclasses.replace(options, **overrides)


def fuses(fused: str, compile: str) -> bool:
    """Whether ``engine.fused`` asks for the fused decoder kernels under ``compile``
    (packages built "ahead" keep torch's ops). The engine and the cache key read it."""
    return fused == "on" and compile != "ahead"


def auto_dtype(gpu: bool) -> str:
    """``engine.dtype = "auto"``: the decoder's dtype. On a GPU bfloat16 (the fastest
    under 2 % STFT error on an H100, README). On a CPU with bfloat16 arithmetic of its
    own (AVX-512 BF16 or AMX, x86 only) bfloat16 too: the one-line-at-a-time path ran
    23.4x vs 17.2x in float32 on a 2-core AMD EPYC, STFT error 0.77 % mean, 1.24 % max,
    every length kept (2026-12-07); else float32 (emulated bfloat16 is slower)."""
    return "bfloat16" if gpu or cpu_has_bf16() else "float32"


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (its flags in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def default_phonemizers() -> int:
    """``engine.phonemizer_processes = 0`` (auto): a quarter of the cores, 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


@dataclass
class Tuning:
    """The options as they apply on the engine's device ("auto" resolved, GPU-only
    switches off on the CPU). Read at each call: the bench and the tests change them
    between runs (an eager row, the other cut of the calls)."""

    max_batch: int
    """Sentences per model call."""
    token_budget: int
    frame_budget: int
    """Padded frames one audio-half call may hold (``device.default_frame_budget``)."""
    compile: bool
    compile_text: bool
    compile_ahead: bool
    fused: bool
    """Ask the voice model for its fused kernels (``VoiceModel.fuse``)."""
    cuda_graphs: bool
    audio_graphs: bool
    pack_calls: bool
    warmup_frames: int
    row_step: int

    @classmethod
    def resolve(cls, options: EngineOptions, device: torch.device, frame_budget: int
                ) -> Tuning:
        gpu = device.type == "cuda"
        compile = options.compile in ("on", "ahead") or (options.compile == "auto" and gpu)
        return cls(
            max_batch=options.max_batch or (GPU_BATCH if gpu else 1),
            token_budget=options.token_budget, frame_budget=frame_budget, compile=compile,
            compile_text=options.compile_text == "on" or (options.compile_text == "auto"
                                                          and compile),
            compile_ahead=options.compile == "ahead",
            fused=fuses(options.fused, options.compile),
            cuda_graphs=gpu and options.cuda_graphs != "off",
            audio_graphs=gpu and options.audio_graphs != "off",
            pack_calls=options.pack_calls, warmup_frames=options.warmup_frames,
            row_step=options.row_step if gpu else 0)
