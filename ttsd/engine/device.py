"""Device, dtype and float32 math flags of an engine; errors that leave a GPU unusable;
float samples to int16 PCM on the device."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from ttsd.errors import VoiceError


def pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VoiceError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.index is None:  # memory and stats calls need an explicit index
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # the fastest decoder dtype under 2% STFT error on an H100 (README)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[dtype]



STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure",
           "CUDA error: misaligned", "uncorrectable ECC", "device not ready", "CUDA-capable device")


class Precision:
    """The float32 math flags (TF32 in cuBLAS and cuDNN) are global to the process, but
    the text half must run in strict float32 (durations must not depend on the batch)
    while the audio half, in another thread, keeps the flags it was compiled with (TF32
    convolutions: ≈ 25 % faster on an H100). The flags are read when a kernel is
    launched, so each stage takes a lock, sets its flags and launches its kernels, and
    waits for them outside the lock. cuDNN stays deterministic throughout."""

    _lock = threading.Lock()   # one for the process, like the flags

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        with self._lock:   # never read inside another engine's strict section
            if self.cuda:
                torch.backends.cudnn.deterministic = True
            self._audio = (torch.backends.cuda.matmul.allow_tf32,
                           torch.backends.cudnn.allow_tf32)

    @contextlib.contextmanager
    def strict(self) -> Iterator[None]:
        """Launch text-half kernels: no TF32."""
        with self._flags((False, False)):
            yield

    @contextlib.contextmanager
    def audio(self) -> Iterator[None]:
        """Launch audio-half kernels: the flags the process started with."""
        with self._flags(self._audio):
            yield

    @contextlib.contextmanager
    def _flags(self, flags: tuple[bool, bool]) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        with self._lock:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = \
                    self._audio


def is_compile_error(exc: BaseException) -> bool:
    mod = type(exc).__module__
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "CompilationError" in \
        type(exc).__name__ or "InductorError" in type(exc).__name__


def is_sticky(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in STICKY)


def pcm16(clipped: torch.Tensor) -> torch.Tensor:
    """int16 of float32 samples already in [-1, 1], exactly as ``ttsd.output.fsio.pcm16``
    (libsndfile's lrintf(x × 2³¹) >> 16, 1.0 saturating at 32767): every step is exact
    in float32 and ``torch.round`` rounds half to even like ``rint``."""
    y = torch.round(clipped.float() * 2.0**31)
    return torch.floor(y * 2.0**-16).clamp_(max=32767.0).to(torch.int16)
