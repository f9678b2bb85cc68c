"""An engine's device: picking it and the decoder's dtype, the process-wide settings
(``configure_process``), the float32 math flags of each stage, memory, copies to the
device, errors that leave a GPU unusable, float samples to int16 PCM on the device."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import torch

from ttsd.engine.options import auto_dtype
from ttsd.errors import DeviceLostError, VoiceError

if TYPE_CHECKING:
    from ttsd.engine.options import EngineOptions


T = TypeVar("T")


def off_this_thread(device: torch.device, fn: Callable[[], T]) -> T:
    """``fn()`` (loading a voice, warming it up) on a thread that ends with it, when the
    engine runs on the CPU; on a GPU, here. Its exception is raised here.

    Torch's CPU ops run on OpenMP, whose worker threads belong to the thread that first
    ran parallel work and live as long as that thread. When the daemon's main thread
    loaded the voice and its model thread then ran it, two such teams were alive; libgomp
    then counts more threads than cores and stops spinning between parallel regions, and
    the model ran at 16-19x realtime instead of 22-28x (2 cores, one line at a time,
    bfloat16). A thread that ends takes its team with it."""
    if device.type != "cpu":
        return fn()
    with ThreadPoolExecutor(1, thread_name_prefix="ttsd-load") as one:   # joined on exit
        return one.submit(fn).result()


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
    if dtype == "auto":
        dtype = auto_dtype(device.type == "cuda")
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[dtype]


def configure_process(options: EngineOptions) -> None:
    """The process-wide torch settings of an engine on ``options.device``: cuDNN
    deterministic (a line's audio must not depend on its batch), cuDNN's benchmark mode
    (``options.cudnn_benchmark``) and the share of the GPU's memory this process may
    use. Called once at start, before the engine is built (the daemon, a worker
    process, ``say``, the bench); nothing on the CPU."""
    device = pick_device(options.device)
    if device.type != "cuda":
        return
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = options.cudnn_benchmark
    torch.cuda.set_per_process_memory_fraction(options.memory_fraction, device)


def default_frame_budget(device: torch.device, dtype: torch.dtype) -> int:
    """Padded frames one audio-half call may hold, from the device's free memory now."""
    if device.type != "cuda":
        return 4000
    free, _total = torch.cuda.mem_get_info(device)
    # ≈ 0.35 MB of decoder activations per frame in float32, half that in 16 bits.
    per_frame = 350_000 if dtype == torch.float32 else 200_000
    return int(max(2000, min(120_000, 0.5 * free / per_frame)))


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``, copied in stream order without waiting. A plain
    ``.to(device)`` waits for the stream's queued work before it returns: each audio
    call then waited for the one before it, and each text-half call for the one before
    it, so the host could not queue ahead of the GPU. From pinned memory the copy is
    queued and the pinned block is reused only after it ran (PyTorch's host allocator
    records the stream)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def release_memory(device: torch.device) -> int:
    """Empty the allocator's cache; returns the bytes given back to the driver."""
    if device.type != "cuda":
        return 0
    before = torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    return max(0, before - torch.cuda.memory_reserved(device))


def memory(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {"allocated": 0, "reserved": 0, "peak": 0}
    return {"allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
            "peak": torch.cuda.max_memory_allocated(device)}


def describe(device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    info: dict[str, object] = {"device": str(device), "dtype": str(dtype).split(".")[-1]}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, total_memory=p.total_memory,
                    capability=f"{p.major}.{p.minor}")
    else:
        import platform
        info.update(name=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads())
    return info


STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure",
           "CUDA error: misaligned", "uncorrectable ECC", "device not ready", "CUDA-capable device")


class Precision:
    """The float32 math flags (TF32 in cuBLAS and cuDNN) are global to the process, but
    the text half must run in strict float32 (durations must not depend on the batch)
    while the audio half, in another thread, keeps the flags it was compiled with (TF32
    convolutions: ≈ 25 % faster on an H100). The flags are read when a kernel is
    launched, so each stage takes a lock, sets its flags and launches its kernels, and
    waits for them outside the lock. cuDNN stays deterministic throughout
    (``configure_process``)."""

    _lock = threading.Lock()   # one for the process, like the flags

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        with self._lock:   # never read inside another engine's strict section
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


def is_oom(exc: BaseException) -> bool:
    """The device ran out of memory (a caught error, not a broken context)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@contextlib.contextmanager
def device_errors() -> Iterator[None]:
    """Sticky device errors (the context is broken) become DeviceLostError."""
    try:
        yield
    except DeviceLostError:
        raise
    except Exception as exc:  # only sticky device errors are converted
        if is_sticky(exc):
            raise DeviceLostError(f"device error, restart needed: {exc}") from exc
        raise


def pcm16(clipped: torch.Tensor) -> torch.Tensor:
    """int16 of float32 samples already in [-1, 1], exactly as ``ttsd.output.wav.pcm16``
    (libsndfile's lrintf(x × 2³¹) >> 16, 1.0 saturating at 32767): every step is exact
    in float32 and ``torch.round`` rounds half to even like ``rint``."""
    y = torch.round(clipped.float() * 2.0**31)
    return torch.floor(y * 2.0**-16).clamp_(max=32767.0).to(torch.int16)
