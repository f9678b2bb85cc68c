"""``ttsd bench --devices all``: the scaling table over 1..N devices, and the host limits.

For k = 1..N it starts k real worker processes (ttsd/service/workers.py, the daemon's own
workers: each phonemizes its lines and returns int16 audio), deals the same bench
lines to them in batches, one batch queued ahead on each (as the daemon does), and
measures x-realtime = seconds of audio ÷ wall seconds from the first batch sent to the
last result back (worker start-up and warm-up are not counted). On the CPU, k workers
share the cores (cores // k torch threads each).

Host side, on this process: phonemizing (lines/s on one core) and WAV encoding +
atomic writing (with batching.writer_threads threads) are each turned into the
x-realtime they could sustain, i.e. where the host becomes the limit.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ttsd.config import Config
from ttsd.service.workers import ProcessHandle, WorkerDied, cpu_threads, spec_for


def devices_for(spec: str) -> list[str]:
    """"all": every visible GPU, else one CPU worker per core; or a comma list."""
    if spec in ("all", "auto"):
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"] * max(1, os.cpu_count() or 1)
    return [d.strip() for d in spec.split(",") if d.strip()]


def run(cfg: Config, devices: str = "all", lines: int = 0, batch: int = 0,
        end_to_end: bool = False) -> dict[str, Any]:
    from ttsd.bench.corpus import bench_lines
    from ttsd.engine.options import EngineOptions
    from ttsd.engine.runtime import GPU_BATCH, open_engine
    from ttsd.jobs import resolve, voice_facts

    devs = devices_for(devices)
    gpu = any(d.startswith("cuda") for d in devs)
    n_lines = lines or (512 if gpu else 24)
    size = batch or cfg.batching.max_batch_size or (GPU_BATCH if gpu else 1)
    texts = bench_lines(n_lines)
    e = cfg.engine
    facts = open_engine(EngineOptions.from_config(cfg, device="cpu", phonemizer_processes=0))
    job = resolve(e, {e.voice: voice_facts(facts, e.voice)})
    reqs = [job.request(i, t) for i, t in enumerate(texts)]
    batches = [reqs[i:i + size] for i in range(0, len(reqs), size)]
    rows = []
    audio_by_key: dict[int, Any] = {}
    for k in range(1, len(devs) + 1):
        row = _scale_row(cfg, devs[:k], batches, audio_by_key)
        rows.append(row)
    base = rows[0]["x_realtime"] if rows else 0.0
    for r in rows:
        r["speedup"] = r["x_realtime"] / base if base else None
        r["efficiency"] = r["speedup"] / r["devices"] if base else None
    host = _host_limits(cfg, facts, reqs, audio_by_key, texts)
    report = {"devices": devs, "lines": n_lines, "batch": size, "rows": rows, "host": host,
              "audio_s": sum(len(a) / facts.voice(e.voice).info.sample_rate for a in audio_by_key.values())}
    if end_to_end:
        report["end_to_end"] = end_to_end_rows(cfg, devs, texts)
    return report


def end_to_end_rows(cfg: Config, devs: list[str], texts: list[str]) -> list[dict[str, Any]]:
    """The whole daemon (`ttsd run --once`: inbox → WAVs fsynced → rows committed) with
    engine.devices = the first k devices, k = 1..N; x-realtime from the file's claim to
    its last WAV. k = 1 runs the model inside the daemon, as a one-GPU install does."""
    from ttsd.bench.e2e import bench_end_to_end

    rows: list[dict[str, Any]] = []
    for k in range(1, len(devs) + 1):
        r = bench_end_to_end(cfg, texts, cfg.engine.dtype, devices=devs[:k], cache_run=False)
        syn = r["synthesize"]
        x = syn.get("x_realtime_claim_to_last_wav") or 0.0
        base = rows[0]["x_realtime"] if rows else x
        rows.append({"devices": k, "names": devs[:k], "x_realtime": x,
                     "wavs": syn["wavs"], "lines": syn["lines"], "rc": syn["rc"],
                     "speedup": x / base if base else None,
                     "efficiency": x / base / k if base else None,
                     "stderr_tail": syn.get("stderr_tail", "")})
    return rows


def _scale_row(cfg: Config, devs: list[str], batches: list[list], audio_by_key: dict) -> dict:
    n_cpu = sum(1 for d in devs if d == "cpu")
    handles = [ProcessHandle(spec_for(cfg, d, cpu_threads(cfg, n_cpu) if d == "cpu" else 1),
                             f"ttsd-bench-{i}") for i, d in enumerate(devs)]
    infos: list[Any] = [None] * len(handles)

    def start(i: int) -> None:
        infos[i] = handles[i].start(cfg.cluster.start_timeout_s)

    starters = [threading.Thread(target=start, args=(i,)) for i in range(len(handles))]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    todo: queue.Queue = queue.Queue()
    for b in batches:
        todo.put(b)
    audio_s = [0.0] * len(handles)
    model_ms = [0.0] * len(handles)
    done = [0] * len(handles)
    errors: list[str] = []

    def drive(i: int) -> None:
        h, out = handles[i], 0
        try:
            while True:
                while out <= cfg.cluster.queue_ahead:
                    try:
                        h.submit(todo.get_nowait())
                        out += 1
                    except queue.Empty:
                        break
                if out == 0:
                    return
                reply = h.poll(cfg.cluster.batch_timeout_s)
                if reply is None:
                    raise WorkerDied("batch timed out")
                out -= 1
                done[i] += 1
                model_ms[i] += reply["model_ms"]
                for key, a, sr, *_rest in reply["results"]:   # + error, phonemes, timing
                    if a is not None:
                        audio_s[i] += len(a) / sr
                        audio_by_key[key] = a
        except WorkerDied as exc:
            errors.append(f"{devs[i]} #{i}: {exc}")

    t0 = time.perf_counter()
    drivers = [threading.Thread(target=drive, args=(i,)) for i in range(len(handles))]
    for t in drivers:
        t.start()
    for t in drivers:
        t.join()
    wall = time.perf_counter() - t0
    for h in handles:
        h.close()
    if errors:
        raise RuntimeError("; ".join(errors))
    total = sum(audio_s)
    return {"devices": len(devs), "names": devs, "wall_s": wall, "audio_s": total,
            "x_realtime": total / wall if wall > 0 else 0.0,
            "per_worker_x": [a / (m / 1000) if m else None for a, m in zip(audio_s, model_ms)],
            "batches": done}


def _host_limits(cfg: Config, engine: Any, reqs: list, audio_by_key: dict,
                 texts: list[str]) -> dict[str, Any]:
    from ttsd.output.fsio import fsync_dir
    from ttsd.output.wav import write_wav

    audio_s = sum(len(a) for a in audio_by_key.values()) / 22050 if audio_by_key else 0.0
    per_line = audio_s / max(1, len(audio_by_key))
    t0 = time.perf_counter()
    engine.prepare(reqs)
    phon = time.perf_counter() - t0
    threads = cfg.batching.writers
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda kv: write_wav(Path(tmp) / f"{kv[0]}.wav", kv[1], 22050,
                                           cfg.output.subtype, sync_dir=False),
                      audio_by_key.items()))
        fsync_dir(Path(tmp))   # as the daemon's Sink: one folder fsync per batch
        wav = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    return {"cores": cores, "audio_s_per_line": per_line,
            "phonemize_ms_per_line": 1000 * phon / max(1, len(reqs)),
            "phonemize_x_per_core": per_line * len(reqs) / phon if phon else None,
            "wav_ms_per_line": 1000 * wav / max(1, len(audio_by_key)),
            "wav_threads": threads,
            "wav_x": audio_s / wav if wav else None}


def render(report: dict[str, Any]) -> str:
    out = [(f"{report['lines']} lines, {report['audio_s']:.0f} s of audio, batch "
            f"{report['batch']}, devices: {', '.join(report['devices'])}"), "",
           "| devices | x-realtime | speed-up | efficiency | per worker (model only) |",
           "|---|---|---|---|---|"]
    for r in report["rows"]:
        per = " / ".join(f"{x:.1f}" for x in r["per_worker_x"] if x)
        out.append(f"| {r['devices']} | {r['x_realtime']:.1f} | {r['speedup']:.2f}× | "
                   f"{100 * r['efficiency']:.0f}% | {per} |")
    if report.get("end_to_end"):
        out += ["", "end to end (the daemon: inbox → WAVs on disk):", "",
                "| devices | x-realtime | speed-up | efficiency | WAVs |", "|---|---|---|---|---|"]
        for r in report["end_to_end"]:
            sp = f"{r['speedup']:.2f}×" if r["speedup"] else "-"
            ef = f"{100 * r['efficiency']:.0f}%" if r["efficiency"] else "-"
            out.append(f"| {r['devices']} | {r['x_realtime']:.1f} | {sp} | {ef} | "
                       f"{r['wavs']}/{r['lines']} |")
    h = report["host"]
    out += ["", (f"host: phonemizing {h['phonemize_ms_per_line']:.2f} ms/line = "
                 f"{h['phonemize_x_per_core']:,.0f}× realtime per core (workers phonemize: "
                 f"one core each); WAV encode+write {h['wav_ms_per_line']:.2f} ms/line = "
                 f"{h['wav_x']:,.0f}× realtime with {h['wav_threads']} writer threads "
                 f"({h['cores']} cores).")]
    top = max((r["x_realtime"] for r in report["rows"]), default=0.0)
    limit = min(h["wav_x"] or float("inf"), (h["phonemize_x_per_core"] or 0) * h["cores"])
    out.append(f"the host becomes the limit near {limit:,.0f}× realtime "
               f"(best measured here: {top:,.1f}×).")
    return "\n".join(out)
