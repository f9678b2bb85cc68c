"""The tone model: a voice architecture with no neural network, for load tests.

Every phoneme id lasts ``FRAMES_PER_TOKEN`` frames (times the line's length scale) and
the audio is a 220 Hz sine, so a line's audio is as long as its text and costs almost
nothing to make. ``ttsd bench --load`` runs its daemon with it (``TTSD_MODEL=tone``),
so that the numbers measure the pipeline (watch, claim, parse, store, batch, write)
rather than the voice; many tests run their daemons with it for the same reason. The
voice's own front end still turns the text into phonemes.

``ToneModel`` is the architecture (``model.VoiceModel``): any engine runs it, batched
and padded like a network. ``ToneEngine`` (what ``runtime.open_engine`` builds for it)
makes the same samples without the padded audio half: each sentence's tone at its own
length on the host, a few operations a line. Through the padded calls and their
post-processing on the CPU, the tone made the load bench's daemon model-bound (≈ 100
lines/s instead of ≈ 600 on a 2-core machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ttsd.engine.decode import AudioHalf, Launched
from ttsd.engine.device import pcm16
from ttsd.engine.loaded import LoadedVoice
from ttsd.engine.model import Loader
from ttsd.engine.options import EngineOptions
from ttsd.engine.plan import Item
from ttsd.engine.records import Prepared
from ttsd.engine.runtime import Engine

HOP = 64
"""Samples per frame: 2.9 ms at 22,050 Hz."""

FRAMES_PER_TOKEN = 5
"""Frames per phoneme id (14.5 ms). Piper puts a pad id between phonemes, and numbers
and symbols are spoken as words: the load bench's lines come out ≈ 2.7 s long, 55 ms a
character."""

FREQUENCY = 220.0

DIGEST = hashlib.sha256(b"ttsd tone model 1").hexdigest()
"""Names the model in cache keys in place of a voice's weights: its audio is never
taken for the voice's own."""


class ToneModel:
    """``model.VoiceModel`` with no weights: a sine as long as the phonemes."""

    hop = HOP
    channels = 1

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    def place(self, device: torch.device, dtype: torch.dtype, keep_float32: bool) -> Any:
        return None   # nothing to move: every tensor is made where its inputs are

    def fuse(self) -> bool:
        return False   # no network, nothing to fuse

    def text_frames(self, ids: torch.Tensor, lengths: torch.Tensor, sid: torch.Tensor,
                    seeds: torch.Tensor, noise_w: torch.Tensor, length_scale: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        mask = torch.arange(t, device=ids.device) < lengths.unsqueeze(1)
        per_token = torch.ceil(FRAMES_PER_TOKEN * length_scale).long().clamp_min(1)
        dur = per_token.unsqueeze(1) * mask
        m = torch.zeros(b, self.channels, t, device=ids.device)
        return m, torch.zeros_like(m), dur, dur.sum(1).clamp_min(1)

    def audio_half(self, m: torch.Tensor, logs: torch.Tensor, durations: torch.Tensor,
                   frames: torch.Tensor, max_frames: int, sid: torch.Tensor,
                   seeds: torch.Tensor, noise_scale: torch.Tensor, fallback: Any = None
                   ) -> torch.Tensor:
        wave = torch.from_numpy(self.tone(max_frames * self.hop))
        return wave.to(m.device).expand(m.size(0), -1)

    def tone(self, samples: int) -> np.ndarray:
        """The first ``samples`` samples of the sine (every row's are the same), made
        with numpy on the host: one thread, where torch's operations on long tensors
        would wake its thread pool beside the daemon's writers."""
        t = np.arange(samples, dtype=np.float32) / np.float32(self.sample_rate)
        return np.sin(np.float32(2 * math.pi * FREQUENCY) * t)


HOST_CALL = 64
"""``ToneAudio``'s lines per call (or the engine's ``max_batch``, if more): a call's
lines are handed over together (``Engine.finish``'s ``stream``)."""


class ToneAudio(AudioHalf):
    """The tone's audio half on the host. Every sentence's samples are a prefix of one
    sine, so a call makes the sine once, at its longest sentence's length, and what
    ``AudioHalf`` does to a call's samples (normalized by the sentence's own peak,
    clipped, int16 with ``pcm16``) once per distinct peak: the lines are those of the
    padded calls, sample for sample, at a few operations a call."""

    def _calls(self, items: list[Item]) -> Iterator[list[Item]]:
        step = max(HOST_CALL, self.tuning.max_batch)
        for at in range(0, len(items), step):
            yield items[at:at + step]

    def _launch(self, lv: LoadedVoice, prepared: list[Prepared], chunk: list[Item],
                slot: int) -> Launched:
        t0 = time.perf_counter()
        lengths = [it.frames * lv.model.hop for it in chunk]
        wave = lv.model.tone(max(lengths))
        peaks = np.maximum.accumulate(np.abs(wave))   # the peak of every prefix
        made: dict[float, np.ndarray] = {}            # peak → samples normalized by it
        rows = []
        for n in lengths:   # longest first: a peak's first sentence is its longest
            peak = peaks[n - 1]
            done = made.get(float(peak))
            if done is None or len(done) < n:
                x = np.clip(wave[:n] / peak, -1.0, 1.0) if peak > 1e-8 else \
                    np.zeros(n, np.float32)
                done = made[float(peak)] = pcm16(torch.from_numpy(x)).numpy() \
                    if self.options.pcm16 else x
            rows.append(done[:n])
        return Launched(chunk, _Rows(rows), np.ones(len(chunk), bool), None, t0,
                        (time.perf_counter() - t0) * 1000)


class _Rows:
    """A call's samples as rows of their own lengths, read as ``audio[i, :n]`` (what
    ``AudioHalf._collect`` reads of a padded call's array)."""

    def __init__(self, rows: list[np.ndarray]) -> None:
        self.rows = rows

    def __getitem__(self, key: tuple[int, slice]) -> np.ndarray:
        i, cols = key
        return self.rows[i][cols]


class ToneEngine(Engine):
    """The engine of the tone model, its audio half on the host (``ToneAudio``): nothing
    of the model's padded audio half to compile, capture or warm up."""

    def __init__(self, options: EngineOptions, *, models: Loader | None = None) -> None:
        super().__init__(dataclasses.replace(options, compile="off", audio_graphs="off",
                                             warmup_frames=0), models=models)
        self._audio = ToneAudio(self.options, self.tuning, self.device, self.precision)
