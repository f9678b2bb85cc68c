"""Piper's own onnxruntime engine on the same phonemes: the reference to beat.

One session with every thread, and one single-thread process per core."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def _piper_worker(args: tuple[str, list[list[int]], int]) -> float:
    onnx, id_lists, threads = args
    import onnxruntime
    from piper.config import SynthesisConfig
    from piper.voice import PiperVoice

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    voice = PiperVoice.load(onnx)
    voice.session = onnxruntime.InferenceSession(onnx, sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
    syn = SynthesisConfig()
    voice.phoneme_ids_to_audio(id_lists[0], syn)  # warm-up
    samples = 0
    for ids in id_lists:
        samples += len(voice.phoneme_ids_to_audio(ids, syn))
    return samples / voice.config.sample_rate


def bench_piper(onnx: Path, sentences: list[list[int]], procs: int) -> dict[str, Any]:
    """Piper onnxruntime: ``procs`` single-thread processes, sentences dealt round-robin."""
    import multiprocessing as mp

    shards = [sentences[i::procs] for i in range(procs)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        pool.map(_piper_worker, [(str(onnx), s[:1], 1) for s in shards])  # start + load
        t0 = time.perf_counter()
        audio = sum(pool.map(_piper_worker, [(str(onnx), s, 1) for s in shards if s]))
        wall = time.perf_counter() - t0
    return {"processes": procs, "threads_each": 1, "audio_s": round(audio, 2),
            "wall_s": round(wall, 3), "x_realtime": round(audio / wall, 1),
            "note": "wall includes each process loading its session once"}


def bench_piper_one_session(onnx: Path, sentences: list[list[int]], threads: int) -> dict:
    t0 = time.perf_counter()
    audio = _piper_worker((str(onnx), sentences, threads))
    wall = time.perf_counter() - t0
    return {"processes": 1, "threads_each": threads, "audio_s": round(audio, 2),
            "wall_s": round(wall, 3), "x_realtime": round(audio / wall, 1),
            "note": "wall includes loading the session once"}
