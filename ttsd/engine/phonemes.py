"""Text → phoneme ids, exactly as Piper does it (its espeak-ng bridge and id map).

Piper's own ``PiperVoice.phonemize`` and ``phonemes_to_ids`` are called, so ttsd and
Piper see the same ids for the same text. espeak-ng keeps global state and is not
thread-safe: every call goes through one process-wide lock. For more throughput the
daemon runs phonemizers in worker processes, each with its own espeak-ng.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ttsd.children import helper_setup
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
        self.symbols = {ids[0]: sym for sym, ids in self.id_map.items() if ids}
        """Phoneme id → its symbol (the timestamps' phonemes)."""

    def phonemes(self, text: str) -> list[list[str]]:
        """Phonemes grouped by sentence (Piper's sentence split)."""
        with _LOCK:
            return [s for s in self._piper.phonemize(text) if s]

    def ids(self, phonemes: list[str]) -> list[int]:
        return self._piper.phonemes_to_ids(phonemes)

    def sentences(self, text: str) -> list[list[int]]:
        """Phoneme ids per sentence: BOS, PAD between phonemes, EOS (Piper's rules)."""
        return [self.ids(p) for p in self.phonemes(text)]


# --------------------------------------------------------------------------- processes

FrontEnd = Callable[[Mapping[str, Any]], Phonemizer]
"""Makes a voice's phonemizer from its config in a worker process (``Phonemizer``;
picklable: a module-level class or function)."""

_WORKER_PHONEMIZERS: dict[str, Phonemizer] = {}


def _phonemize_chunk(front_end: FrontEnd, key: str, voice_config: dict[str, Any],
                     texts: list[str]) -> list[list[list[int]] | str]:
    """In a worker process: sentences of ids per text, or the error text."""
    ph = _WORKER_PHONEMIZERS.get(key)
    if ph is None:
        ph = _WORKER_PHONEMIZERS[key] = front_end(voice_config)
    out: list[list[list[int]] | str] = []
    for text in texts:
        try:
            out.append(ph.sentences(text))
        except Exception as exc:  # noqa: BLE001 - reported per line, the others go on
            out.append(f"phonemizer error: {exc}")
    return out


START_TIMEOUT_S = 60.0
"""How long the warm-up waits for all the phonemizer processes to answer."""


class ProcessesUnavailable(RuntimeError):
    """Phonemizer processes cannot be started here."""


def _start_process(parent: int) -> None:
    """A phonemizer process's initializer: ignore Ctrl-C and exit with the daemon
    (``children``), and import Piper's front end now rather than on the process's
    first chunk of text."""
    helper_setup(parent)
    import piper.voice  # noqa: F401 - the import is the point


ROUNDS = 10
"""At most this many rounds of warm-up tasks (``PhonemizerProcesses.start``)."""


def _warm(front_end: FrontEnd, key: str, voice_config: dict[str, Any]) -> int:
    """A warm-up task: the voice's front end loaded and used once in this process; it
    then holds the process a moment, so that the other warm-up tasks go to others."""
    _phonemize_chunk(front_end, key, voice_config, ["Warm up, one two three."])
    time.sleep(0.1)
    return os.getpid()


class PhonemizerProcesses:
    """espeak-ng in worker processes: phonemizing runs beside the GIL-bound threads of
    the daemon, several texts at once, and each process is replaced after
    ``recycle_tasks`` chunks — Piper's espeak-ng bridge keeps ≈ 2 KB per distinct line
    (RSS grew 410 → 717 MB over 100,000 lines in one process), so a long-running
    daemon must not keep one espeak-ng forever. A process that crashes on a text (a
    segfault in espeak-ng) fails that line alone instead of the daemon. ``front_end``
    makes each process's phonemizer (``Phonemizer``)."""

    CHUNK = 16

    def __init__(self, processes: int, recycle_tasks: int = 500,
                 front_end: FrontEnd = Phonemizer) -> None:
        self.processes = max(1, processes)
        self.recycle_tasks = recycle_tasks
        self.front_end = front_end
        self._pool = None
        self._lock = threading.Lock()

    def _executor(self):
        with self._lock:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn"),
                    max_tasks_per_child=self.recycle_tasks,
                    initializer=_start_process, initargs=(os.getpid(),))
            return self._pool

    def start(self, key: str, voice_config: Mapping[str, Any]) -> int:
        """Start the processes and load a voice's front end in each now (the daemon's
        warm-up), not on the first batch: on an H200 the first 512 lines took 632 ms to
        phonemize, the next batches 90-127 ms. Returns how many processes answered."""
        from concurrent.futures import TimeoutError as FuturesTimeout
        from concurrent.futures.process import BrokenProcessPool

        pool = self._executor()
        cfg = dict(voice_config)
        pids: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            # A round of one task per process; each task holds its process 0.1 s, but a
            # process still starting (a loaded machine) can miss a round while another
            # takes two tasks: rounds go on until every process has answered.
            for _round in range(ROUNDS):
                futures = [pool.submit(_warm, self.front_end, key, cfg)
                           for _ in range(self.processes)]
                pids |= {f.result(timeout=max(0.1, deadline - time.monotonic()))
                         for f in futures}
                if len(pids) >= self.processes:
                    break
            return len(pids)
        except BrokenProcessPool:
            self._reset(pool)
            raise ProcessesUnavailable("phonemizer processes die at start") from None
        except FuturesTimeout:
            self._reset(pool)
            raise ProcessesUnavailable(
                f"phonemizer processes not ready in {START_TIMEOUT_S:.0f} s") from None

    def _reset(self, broken) -> None:
        with self._lock:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def sentences_many(self, key: str, voice_config: Mapping[str, Any], texts: list[str]
                       ) -> list[list[list[int]] | str]:
        """Sentences of ids for each text (in order), or an error text for that text."""
        from concurrent.futures.process import BrokenProcessPool

        cfg = dict(voice_config)
        chunks = [texts[i:i + self.CHUNK] for i in range(0, len(texts), self.CHUNK)]
        pool = self._executor()
        futures = [pool.submit(_phonemize_chunk, self.front_end, key, cfg, c) for c in chunks]
        out: list[list[list[int]] | str] = []
        for chunk, fut in zip(chunks, futures):
            try:
                out.extend(fut.result())
            except BrokenProcessPool:
                self._reset(pool)
                out.extend(self._one_by_one(key, cfg, chunk))
                pool = self._executor()
        return out

    def _one_by_one(self, key: str, cfg: dict, texts: list[str]) -> list[list[list[int]] | str]:
        """After a crash: each text alone, so the one that kills espeak-ng fails alone.
        If even a trivial text cannot be phonemized, the processes cannot run here at
        all: ``ProcessesUnavailable`` (the engine then phonemizes in its own process)."""
        from concurrent.futures.process import BrokenProcessPool

        out: list[list[list[int]] | str] = []
        for text in texts:
            pool = self._executor()
            try:
                out.extend(pool.submit(_phonemize_chunk, self.front_end, key, cfg,
                                       [text]).result())
            except BrokenProcessPool:
                self._reset(pool)
                probe = self._executor()
                try:
                    probe.submit(_phonemize_chunk, self.front_end, key, cfg, ["a"]).result()
                except BrokenProcessPool:
                    self._reset(probe)
                    raise ProcessesUnavailable("phonemizer processes die at start") from None
                out.append("the phonemizer (espeak-ng) crashed on this text")
        return out

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
