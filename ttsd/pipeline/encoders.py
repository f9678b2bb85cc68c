"""Where a line's audio is rendered and encoded: on the writer thread that asks, for a
16-bit WAV at the voice's own rate and levels (a header before the samples), else in a
pool of processes, one per core.

Encoders hold the GIL for part of their work (libsndfile's LAME calls back into Python
for every block it writes through a memory file; PyAV's Opus frames are Python
objects), so writer threads stop scaling long before a GPU host's cores are used:
on one H100 with 16 cores, MP3 ran at 584x and Opus at 249x end to end on threads,
while one core alone encodes MP3 at ~134x and Opus at ~100x. Processes scale with the
cores. The pool starts with the sink; its processes are spawned
(a daemon holding a CUDA context must not fork) and import no torch.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ttsd.children import helper_setup
from ttsd.log import get_logger
from ttsd.output.render import LineAudio

if TYPE_CHECKING:
    from collections.abc import Buffer  # Python 3.12

log = get_logger(__name__)


@dataclass(frozen=True)
class Encoded:
    """A line's file, ready to write: its bytes in parts, and what the manifest and the
    cache record of it."""

    parts: list[Buffer]
    sample_rate: int
    seconds: float
    lufs: float | None


def encode_line(audio: LineAudio, samples: np.ndarray, sample_rate: int) -> Encoded:
    """``audio.encode`` without the rendered samples (in a pool process, only the file's
    bytes travel back). ValueError on NaN/Inf samples."""
    parts, r = audio.encode(samples, sample_rate)
    return Encoded(parts, r.sample_rate, r.seconds, r.lufs)


def _inline(audio: LineAudio) -> bool:
    return audio.format.name == "wav" and audio.format.subtype == "PCM_16" \
        and audio.levels.plain


def pool_processes() -> int:
    """One process per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Encoders:
    """Renders and encodes lines for the writer threads (``encode`` blocks its thread
    until the file's bytes are ready)."""

    def __init__(self, audio: LineAudio, processes: int | None = None) -> None:
        self.audio = audio
        self.inline = _inline(audio)
        """A 16-bit WAV as the voice gives it: a header and the samples, on the thread."""
        self.processes = processes or pool_processes()
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the pool's processes now, beside the voice's warm-up, rather than
        under the first batch (without waiting for them)."""
        if not self.inline and self.processes > 1:
            pool = self._started()
            for _ in range(self.processes):
                pool.submit(os.getpid)

    def encode(self, samples: np.ndarray, sample_rate: int, audio: LineAudio | None = None
               ) -> Encoded:
        """The line's file (as ``audio`` asks, else as ``self.audio``). ValueError on
        samples that cannot be encoded (NaN/Inf). A pool process that dies (killed, out of memory) takes no line with it: the pool is
        started again, and the line is encoded on this thread instead."""
        audio = audio or self.audio
        if self.processes <= 1 or _inline(audio):
            return encode_line(audio, samples, sample_rate)
        pool = self._started()
        try:
            return pool.submit(encode_line, audio, samples, sample_rate).result()
        except BrokenProcessPool:
            self._restart(pool)
            return encode_line(audio, samples, sample_rate)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn"),
                    initializer=helper_setup, initargs=(os.getpid(),))
            return self._pool

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        log.warning("encoders.restarted", reason="a pool process died")
        broken.shutdown(wait=False, cancel_futures=True)
