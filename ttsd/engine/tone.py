"""The tone model: a voice architecture with no neural network, for load tests.

Every phoneme id lasts ``FRAMES_PER_TOKEN`` frames (times the line's length scale) and
the audio is a 220 Hz sine, so a line's audio is as long as its text and costs almost
nothing to make, while it goes through everything the engine does to a voice's audio:
batches, calls, streaming, assembly, normalization, int16 conversion. ``ttsd bench
--load`` runs its daemon with it (``TTSD_MODEL=tone``), so that the numbers measure the
pipeline (watch, claim, parse, store, batch, write) rather than the voice; many tests
run their daemons with it for the same reason. The voice's own front end still turns
the text into phonemes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

HOP = 256
"""Samples per frame (as Piper's medium voices)."""

FRAMES_PER_TOKEN = 3
"""Frames per phoneme id: Piper puts a pad id between phonemes, so ≈ 70 ms a phoneme
at 22,050 Hz."""

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
        n = max_frames * self.hop
        t = torch.arange(n, device=m.device, dtype=torch.float32) / self.sample_rate
        return torch.sin((2 * math.pi * FREQUENCY) * t).expand(m.size(0), n)
