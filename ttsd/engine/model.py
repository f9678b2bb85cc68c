"""What the engine needs from a voice architecture, and the architectures it has.

The engine batches, pads, splits on out-of-memory, compiles, captures CUDA graphs and
assembles lines; a voice architecture only maps padded batches to tensors, in two
halves with one data-dependent step between them (the engine reads the frame counts):

- ``text_frames``: phoneme ids → per-token features and durations (in frames);
- ``audio_half``: features expanded by the durations → samples (``hop`` per frame).

Each row of a padded batch must give what the row gives alone, and its noise must
depend on its seed only, never on its batch-mates: a line's audio is then the same in
any batch, on any device. A second architecture is one module with a class that has
these members, and an entry in ``MODELS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ttsd.errors import VoiceError

if TYPE_CHECKING:
    from ttsd.engine.options import EngineOptions
    from ttsd.engine.voice import VoiceInfo


class VoiceModel(Protocol):
    """One voice, ready to run. Shapes: B rows, T tokens, F frames (padded)."""

    @property
    def hop(self) -> int:
        """Samples per frame."""

    @property
    def channels(self) -> int:
        """Channels of the per-token features ``m`` and ``logs``."""

    def place(self, device: torch.device, dtype: torch.dtype, keep_float32: bool) -> Any:
        """Move to ``device``, the part of the audio half that may run in half precision
        (a decoder) in ``dtype``; returns a float32 copy of that part when
        ``keep_float32`` and ``dtype`` is not float32 (else None), which the engine
        passes as ``fallback`` to retry a row whose samples were not finite."""

    def fuse(self) -> bool:
        """After ``place``: run what the architecture has fused kernels for on them
        (``engine.fused``), where they run; returns whether it does. The audio changes
        within rounding."""

    def text_frames(self, ids: torch.Tensor, lengths: torch.Tensor, sid: torch.Tensor,
                    seeds: torch.Tensor, noise_w: torch.Tensor, length_scale: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, T] (0 past each row's ``lengths``), sid/seeds [B] int64,
        noise_w/length_scale [B] float32 → m, logs [B, channels, T], durations [B, T]
        int64 (0 past the row's length), frames [B] (the durations' sum, at least 1).
        Strict float32; no host synchronisation (CUDA graphs capture it)."""

    def audio_half(self, m: torch.Tensor, logs: torch.Tensor, durations: torch.Tensor,
                   frames: torch.Tensor, max_frames: int, sid: torch.Tensor,
                   seeds: torch.Tensor, noise_scale: torch.Tensor, fallback: Any = None
                   ) -> torch.Tensor:
        """The text half's outputs (tokens may be padded further, with no frames),
        ``max_frames`` ≥ every row's frames → float32 samples [B, max_frames × hop];
        what lies past a row's ``frames × hop`` is ignored. ``fallback``: run with what
        ``place`` returned instead of the half-precision part."""


Loader = Callable[["VoiceInfo", "EngineOptions"], tuple[VoiceModel, str]]
"""A voice and the engine's options → its model (float32, on the CPU) and a digest that
names its weights (part of every cache key)."""


def _vits(info: VoiceInfo, options: EngineOptions) -> tuple[VoiceModel, str]:
    from ttsd.engine.voice import load_model

    return load_model(info, options.cache_dir)


def _tone(info: VoiceInfo, options: EngineOptions) -> tuple[VoiceModel, str]:
    from ttsd.engine.tone import DIGEST, ToneModel

    return ToneModel(info.sample_rate), DIGEST


MODELS: dict[str, Loader] = {"vits": _vits, "tone": _tone}
"""``EngineOptions.model`` → its loader."""


def load_voice_model(info: VoiceInfo, options: EngineOptions) -> tuple[VoiceModel, str]:
    """The model ``options.model`` names, for ``info`` (``MODELS``)."""
    loader = MODELS.get(options.model)
    if loader is None:
        known = ", ".join(sorted(MODELS))
        raise VoiceError(f"unknown model {options.model!r} (known: {known})")
    return loader(info, options)
