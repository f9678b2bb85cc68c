"""Text → phoneme ids, exactly as Piper does it (its espeak-ng bridge and id map).

Piper's own ``PiperVoice.phonemize`` and ``phonemes_to_ids`` are called, so ttsd and
Piper see the same ids for the same text. espeak-ng keeps global state and is not
thread-safe: every call goes through one process-wide lock. For more throughput the
daemon runs phonemizers in worker processes, each with its own espeak-ng.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ttsd.errors import VoiceError

_LOCK = threading.Lock()


class Phonemizer:
    """Sentences of phoneme ids for one voice config (the parsed ``.onnx.json``)."""

    def __init__(self, voice_config: Mapping[str, Any]) -> None:
        from piper.config import PiperConfig
        from piper.voice import PiperVoice

        try:
            cfg = PiperConfig.from_dict(dict(voice_config))
        except (KeyError, TypeError, ValueError) as exc:
            raise VoiceError(f"voice config is missing or has a bad field: {exc}") from None
        # A PiperVoice without an ONNX session: only its text front end is used.
        self._piper = PiperVoice(session=None, config=cfg)  # type: ignore[arg-type]
        self.id_map = cfg.phoneme_id_map

    def phonemes(self, text: str) -> list[list[str]]:
        """Phonemes grouped by sentence (Piper's sentence split)."""
        with _LOCK:
            return [s for s in self._piper.phonemize(text) if s]

    def ids(self, phonemes: list[str]) -> list[int]:
        return self._piper.phonemes_to_ids(phonemes)

    def sentences(self, text: str) -> list[list[int]]:
        """Phoneme ids per sentence: BOS, PAD between phonemes, EOS (Piper's rules)."""
        return [self.ids(p) for p in self.phonemes(text)]
