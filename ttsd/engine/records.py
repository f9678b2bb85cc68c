"""What the engine takes and gives: requests, their phonemes, results, run statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    key: int
    text: str
    voice: str
    speaker_id: int = 0
    length_scale: float = 1.0
    noise_scale: float = 0.667
    noise_w: float = 0.8
    seed: int = 0
    markup: bool = False
    """``text`` is SSML (``ttsd.markup.ssml``): said segment by segment."""
    tail_s: float = 0.0
    """Silence after the line's last sentence (the CSV ``pause_after``)."""


@dataclass
class Prepared:
    request: Request
    sentences: list[list[int]]
    error: str | None = None
    rates: list[float] | None = None
    """Per sentence, its speed factor (markup); None: all 1."""
    pauses: list[float | None] | None = None
    """Per sentence, the seconds of silence after it, None for the engine's sentence
    silence (markup); None: the engine's silence between sentences."""
    lead_s: float = 0.0
    """Silence before the first sentence (a break opening the markup)."""
    noise_keys: list[tuple[str, int]] | None = None
    """Per sentence, what its noise seed is drawn from besides the line's seed (markup:
    its segment's text and its place there, so that changing one segment leaves the
    others' audio as it was); None: the line's text and the sentence's index."""

    def noise_key(self, sentence: int) -> tuple[str, int]:
        return self.noise_keys[sentence] if self.noise_keys is not None \
            else (self.request.text, sentence)

    @property
    def phonemes(self) -> int:
        return sum(len(s) for s in self.sentences)

    def rate(self, sentence: int) -> float:
        return self.rates[sentence] if self.rates is not None else 1.0

    def gaps(self, silence_s: float, sample_rate: int) -> tuple[int, list[int]]:
        """Samples of silence before the first sentence, and after each sentence
        (after the last: the line's tail), ``silence_s`` between sentences unless the
        markup asks for other."""
        n = len(self.sentences)
        pauses = self.pauses or [None] * n
        after = [silence_s if p is None else p for p in pauses[:n - 1]]
        tail = (pauses[n - 1] or 0.0) if n and self.pauses else 0.0
        seconds = after + [tail + self.request.tail_s] if n else []
        return (round(self.lead_s * sample_rate),
                [round(s * sample_rate) for s in seconds])


@dataclass(frozen=True)
class Timing:
    """Where a line's phonemes fall in its audio: per sentence (in order) each token's
    symbol (Piper's: ``^`` BOS, ``_`` pad, ``$`` EOS, `` `` between words) and its frames
    as the decoder used them; ``hop`` samples a frame, ``lead`` samples of silence
    before the first sentence and ``gaps`` after each one."""

    hop: int
    lead: int
    gaps: list[int]
    sentences: list[tuple[list[str], list[int]]]


@dataclass
class Result:
    key: int
    audio: np.ndarray | None
    """Mono samples: float32 in [-1, 1], or int16 PCM from an engine made with
    ``pcm16=True`` (k stands for k / 32768; ``ttsd.output.wav`` writes it as it is)."""
    sample_rate: int
    error: str | None = None
    phonemes: int = 0
    timing: Timing | None = None
    """With ``EngineOptions.timings``: the line's phoneme durations."""

    @property
    def seconds(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / self.sample_rate


@dataclass
class RunStats:
    items: int = 0
    text_calls: int = 0
    text_graphed: int = 0
    """Text-half calls replayed from a CUDA graph."""
    audio_calls: int = 0
    audio_graphed: int = 0
    """Audio-half calls replayed from a CUDA graph (the rest: compiled launches)."""
    token_slots: int = 0
    tokens: int = 0
    frame_slots: int = 0
    frames: int = 0
    oom_splits: int = 0
    text_ms: float = 0.0
    audio_ms: float = 0.0
    audio_gpu_ms: float = 0.0
    """The audio calls' time on the GPU (CUDA events around each call and its copy;
    includes any wait for the host to launch its kernels)."""
    audio_launch_ms: float = 0.0
    """Host time spent launching the audio calls (padding, kernels, copy)."""


def failure(p: Prepared, error: str, sample_rate: int = 0) -> Result:
    """The result of a line that failed: no audio, ``error`` says why."""
    return Result(p.request.key, None, sample_rate, error, p.phonemes)


Stream = Callable[[list[Result]], None]
"""``Engine.finish``'s ``stream``: the results of lines complete before the batch is."""
