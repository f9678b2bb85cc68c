"""A voice made ready to run: its model on the device in the engine's dtype, its halves
compiled and their CUDA graphs set up, its phonemizer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ttsd.engine.aot import compiled_half
from ttsd.engine.device import is_compile_error
from ttsd.engine.graphs import MAX_ROWS, AudioGraphs, SharedPool, TextGraphs
from ttsd.engine.model import VoiceModel
from ttsd.engine.options import Tuning
from ttsd.engine.phonemes import Phonemizer
from ttsd.engine.voice import VoiceInfo
from ttsd.log import get_logger

log = get_logger(__name__)


@dataclass
class LoadedVoice:
    info: VoiceInfo
    model: VoiceModel
    digest: str
    phonemizer: Phonemizer
    fallback: Any = None
    """What ``model.place`` kept in float32 (a decoder) while the model runs it in half
    precision: the retry of a row whose samples were not finite."""
    audio_half: Any = None
    """``model.audio_half``, compiled when the engine compiles; eager otherwise."""
    text_frames: Any = None
    """``model.text_frames``, compiled when the engine compiles the text half (used
    for calls bigger than its CUDA graphs take); eager otherwise."""
    graphs: TextGraphs | None = None
    """The text half's CUDA graphs (``Tuning.cuda_graphs``)."""
    audio_graphs: AudioGraphs | None = None
    """The audio half's CUDA graphs (``Tuning.audio_graphs``)."""


def make_ready(info: VoiceInfo, model: VoiceModel, digest: str, device: torch.device,
               dtype: torch.dtype, tuning: Tuning, pool: SharedPool,
               compiled_dir: Path | None = None) -> LoadedVoice:
    """``model`` (float32, on the CPU) placed on ``device``, its halves compiled as
    ``tuning`` says (ahead of time, with packages kept in ``compiled_dir``, or just in
    time); the audio graphs capture into ``pool``, shared by every voice."""
    fallback = model.place(device, dtype, keep_float32=device.type == "cuda")
    if tuning.fused:   # the float32 fallback keeps torch's ops
        if model.fuse():
            log.info("engine.fused", voice=info.name)
        else:
            log.warning("engine.fused_unavailable", voice=info.name, device=str(device),
                        dtype=str(dtype).split(".")[-1],
                        reason="fused kernels need Triton and a 16-bit decoder on a GPU")
    audio_half, text_frames = model.audio_half, model.text_frames
    ahead = tuning.compile_ahead and compiled_dir is not None
    if tuning.compile:
        # One dynamic-shape graph for every (batch, frames) bucket; Inductor fuses the
        # masks, activations and noise around cuDNN's convolutions.
        audio_half = (ahead and compiled_half("audio", model, digest, device, dtype,
                                              compiled_dir)) \
            or torch.compile(model.audio_half, dynamic=True)
    if tuning.compile_text and tuning.max_batch > MAX_ROWS:   # only bigger calls use it
        # The same for the text half's LayerNorm transposes, attention pads and spline
        # flows (on an H200 at batch 128: 21.6 → 15.6 ms a call, durations identical).
        text_frames = (ahead and compiled_half("text", model, digest, device, dtype,
                                               compiled_dir)) \
            or torch.compile(model.text_frames, dynamic=True)
    lv = LoadedVoice(info, model, digest, Phonemizer(info.config), fallback, audio_half,
                     text_frames)
    if device.type == "cuda":
        lv.graphs = TextGraphs(model.text_frames, device, tuning.max_batch)
    if tuning.audio_graphs:
        lv.audio_graphs = AudioGraphs(audio_half, device, model.channels, model.hop,
                                      tuning.max_batch, tuning.frame_budget, pool=pool)
    return lv


def call_half(lv: LoadedVoice, half: str, args: Sequence[Any]) -> Any:
    """``lv.<half>(*args)``, where ``half`` (``audio_half`` or ``text_frames``) may be
    compiled. A compiler failure (no C compiler, no Triton) is logged and that half runs
    eagerly (``lv.model.<half>``) from then on."""
    fn, eager = getattr(lv, half), getattr(lv.model, half)
    try:
        return fn(*args)
    except Exception as exc:  # a compiler failure: run eagerly from now on
        if fn == eager or not is_compile_error(exc):
            raise
        log.warning("engine.compile_failed", half=half, error=str(exc).splitlines()[0][:300])
        setattr(lv, half, eager)
        return eager(*args)
