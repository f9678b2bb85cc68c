"""``ttsd bench``: x-realtime on this machine, all measured in one run.

(a) one line at a time with a warm model (the usual way), (b) ttsd batched at several
batch sizes and dtypes, (c) Piper's own onnxruntime engine on the same lines (one
session with every thread, and one single-thread process per core), and optionally
(d) the whole daemon end to end (inbox → WAVs) and the cost of a cache hit.
x-realtime = seconds of audio ÷ wall seconds. GPU work is timed after a warm-up and
read back to the host (which synchronizes) before the clock stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ttsd.bench.corpus import bench_lines
from ttsd.bench.e2e import bench_end_to_end
from ttsd.bench.numerics import quality, roofline
from ttsd.bench.piper import bench_piper, bench_piper_one_session
from ttsd.config import Config
from ttsd.engine.graphs import MAX_ROWS
from ttsd.engine.options import EngineOptions
from ttsd.engine.records import Prepared, Request
from ttsd.engine.runtime import Engine, start_engine
from ttsd.jobs import resolve, voice_facts


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values), q))


def _engine(cfg: Config, dtype: str, max_batch: int, compile: str | None = None) -> Engine:
    """The configured engine with no phoneme budget (the bench sizes batches itself)."""
    options = EngineOptions.from_config(cfg, dtype=dtype, max_batch=max_batch,
                                        token_budget=10**9, phonemizer_processes=0)
    if compile:
        options = dataclasses.replace(options, compile=compile)
    return start_engine(options)


def _requests(cfg: Config, engine: Engine, lines: list[str]) -> list[Request]:
    """The bench's lines said as the daemon would say them under this config."""
    job = resolve(cfg.engine, {cfg.engine.voice: voice_facts(engine, cfg.engine.voice)})
    return [job.request(i, t) for i, t in enumerate(lines)]


def _timed_batches(engine: Engine, prepared: list[Prepared], size: int,
                   overlap: bool = False) -> dict[str, Any]:
    """Run ``prepared`` in batches of ``size`` (sorted by length, as the daemon does),
    both halves of a batch one after the other; ``overlap``: batch i+1's text half
    (``Engine.plan``, another thread) beside batch i's audio half (``Engine.finish``),
    as the daemon runs them on a GPU (``Engine.overlaps``). Latency = plan +
    finish of a batch."""
    order = sorted(prepared, key=lambda p: -p.phonemes) if size > 1 else prepared
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    for b in {id(batches[0]): batches[0], id(batches[-1]): batches[-1]}.values():
        engine.run(b)  # warm (and compile) the largest and the smallest shapes
    if engine.device.type == "cuda" and engine.tuning.warmup_frames:   # as the daemon's
        engine.warm_audio_shapes(prepared[0].request.voice, engine.call_shapes(  # warm-up,
            size, engine.default_frame_budget()))                     # within memory
    lat, audio, frames, slots, text_ms, audio_ms, graphed = [], 0.0, 0, 0, 0.0, 0.0, 0

    def plan(b: list[Prepared]) -> tuple[Any, float]:
        t = time.perf_counter()
        return engine.plan(b), (time.perf_counter() - t) * 1000

    t0 = time.perf_counter()
    # Without overlap both halves run on this thread, as the daemon's model thread runs
    # them: a second thread's CPU ops would keep a second OpenMP team alive, which slows
    # both (``ttsd.engine.device.off_this_thread``).
    with ThreadPoolExecutor(1, thread_name_prefix="ttsd-bench-plan") as pool:
        ahead = pool.submit(plan, batches[0]) if overlap else None
        for i in range(len(batches)):
            planned, plan_ms = ahead.result() if ahead is not None else plan(batches[i])
            if ahead is not None and i + 1 < len(batches):
                ahead = pool.submit(plan, batches[i + 1])
            t = time.perf_counter()
            results, stats = engine.finish(planned)
            lat.append(plan_ms + (time.perf_counter() - t) * 1000)
            audio += sum(r.seconds for r in results)
            frames, slots = frames + stats.frames, slots + stats.frame_slots
            text_ms, audio_ms = text_ms + stats.text_ms, audio_ms + stats.audio_ms
            graphed += stats.text_graphed
    wall = time.perf_counter() - t0
    return {"batch": size, "lines": len(prepared), "audio_s": round(audio, 2),
            "wall_s": round(wall, 3), "x_realtime": round(audio / wall, 1),
            "latency_ms_p50": round(_pct(lat, 50), 1), "latency_ms_p95": round(_pct(lat, 95), 1),
            "padding_efficiency": round(frames / slots, 3) if slots else 1.0,
            "text_half_ms": round(text_ms, 1), "audio_half_ms": round(audio_ms, 1),
            "compiled": engine.tuning.compile, "text_calls_graphed": graphed, "overlap": overlap}


_OTHER_WAY = {True: "x_realtime_halves_one_after_other", False: "x_realtime_halves_overlapped"}
"""A row's A/B column: the halves run the other way than the row's own ``overlap``."""


# ---------------------------------------------------------------------- piper


# ---------------------------------------------------------------------- end to end


def _eager_text(engine: Engine, prepared: list[Prepared], size: int) -> float:
    """x-realtime of ``_timed_batches`` with the text half eager (no graphs, not
    compiled)."""
    saved = engine.tuning.cuda_graphs, engine.tuning.compile_text
    engine.tuning.cuda_graphs = engine.tuning.compile_text = False
    try:
        return _timed_batches(engine, prepared, size)["x_realtime"]
    finally:
        engine.tuning.cuda_graphs, engine.tuning.compile_text = saved


# ---------------------------------------------------------------------- roofline


# ---------------------------------------------------------------------- driver


def run(cfg: Config, ns: argparse.Namespace) -> dict[str, Any]:
    import torch

    gpu = cfg.engine.device != "cpu" and torch.cuda.is_available()
    n = ns.lines or (2000 if gpu else 64)
    sizes = [int(s) for s in ns.batch_sizes.split(",") if s] or \
        ([1, 8, 32, 64, 128] if gpu else [1, 4])
    dtypes = [d for d in ns.dtypes.split(",") if d] or \
        (["float32", "float16", "bfloat16"] if gpu else ["float32"])
    lines = bench_lines(n)
    report: dict[str, Any] = {"lines": n, "date": time.strftime("%Y-%m-%d"),
                              "torch": torch.__version__, "cpus": os.cpu_count()}
    out = getattr(ns, "out", "") or ""

    def save() -> None:   # partial results survive a run cut short
        if out:
            Path(out).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")

    # The float32 reference: eager, for quality and phonemes only.
    base = _engine(cfg, "float32", 64, compile="off")
    overlap = base.overlaps
    report["device"] = base.device_info()
    reqs = _requests(cfg, base, lines)
    t0 = time.perf_counter()
    prepared = base.prepare(reqs)
    phon_s = time.perf_counter() - t0
    report["phonemize"] = {"lines_per_s": round(n / phon_s, 1),
                           "ms_per_line": round(1000 * phon_s / n, 3)}
    ref = base.run(prepared[:64])[0]
    save()
    single_n = min(n, 100 if gpu else 24)
    report["batched"] = []
    report["one_at_a_time"] = []
    report["quality_vs_float32"] = {}
    for dtype in dtypes:
        eng = _engine(cfg, dtype, max(sizes))
        graphs, capture_s = eng.capture_graphs(cfg.engine.voice)
        report.setdefault("text_graphs", {})[dtype] = {"graphs": graphs,
                                                       "capture_s": round(capture_s, 2)}
        t0 = time.perf_counter()
        eng.tuning.max_batch = max(sizes)
        mine = eng.run(prepared[:64])[0]   # also compiles (engine.compile) the big shapes
        report.setdefault("first_call_s", {})[dtype] = round(time.perf_counter() - t0, 1)
        report["quality_vs_float32"][dtype] = quality(ref, mine)
        eng.tuning.max_batch = 1
        alone = [eng.run([p])[0][0] for p in prepared[:64]]
        report.setdefault("batched_vs_alone", {})[dtype] = quality(alone, mine)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        # One line at a time: both ways of running the halves, the better one is the
        # baseline (an honest one: line i+1's text half may run beside line i's audio).
        one = _timed_batches(eng, prepared[:single_n], 1)
        other = _timed_batches(eng, prepared[:single_n], 1, overlap=True)
        if other["x_realtime"] > one["x_realtime"]:
            one, other = other, one
        one["dtype"] = dtype
        one[_OTHER_WAY[one["overlap"]]] = other["x_realtime"]
        if graphs:   # the same without the text half's CUDA graphs
            one["x_realtime_text_eager"] = _eager_text(eng, prepared[:single_n], 1)
        report["one_at_a_time"].append(one)
        for size in sizes:
            eng.tuning.max_batch = size
            eng.tuning.frame_budget = 10**9
            # The daemon's way (Engine.overlaps), the other way as an A/B column.
            row = _timed_batches(eng, prepared, size, overlap=overlap and size > 1)
            row["dtype"] = dtype
            if graphs and size <= MAX_ROWS or eng.tuning.compile_text and size > MAX_ROWS:
                # graphed or compiled text halves: the same eagerly
                row["x_realtime_text_eager"] = _eager_text(eng, prepared, size)
            if size == max(sizes) and size > 1:
                row[_OTHER_WAY[row["overlap"]]] = _timed_batches(
                    eng, prepared, size, overlap=not row["overlap"])["x_realtime"]
            if gpu:
                row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
            report["batched"].append(row)
        save()
        eng.close()   # its graphs' memory too: the daemon of the end-to-end rows needs it
        del eng
        if gpu:
            torch.cuda.empty_cache()
    best = max(report["batched"], key=lambda r: r["x_realtime"])
    tokens = sum(len(s) for p in prepared for s in p.sentences)
    lv = base.voice(cfg.engine.voice)
    report["roofline"] = roofline(lv.model, lv.info.sample_rate, tokens / best["audio_s"],
                                  best["dtype"])
    report["roofline"]["fraction_reached_model_only"] = round(
        best["x_realtime"] / report["roofline"]["x_realtime_limit"], 4)
    if not ns.no_piper:
        onnx = lv.info.onnx
        sentences = [s for p in prepared for s in p.sentences]
        procs = ns.piper_procs or os.cpu_count() or 1
        report["piper"] = [bench_piper_one_session(onnx, sentences[:max(8, len(sentences) // 32)],
                                                   os.cpu_count() or 1)]
        save()
        report["piper"].append(bench_piper(onnx, sentences, procs))
        save()
    if ns.end_to_end:   # the whole daemon with the dtype that was fastest above
        # One run first, unmeasured: PyTorch's compile cache is then on disk, as it is
        # for any daemon after its first start, so no measured run pays for compiling
        # (H200: the first start took 62 s, the next ones 34-38 s; after a warm-up on
        # 64 lines the first measured run still started in 48 s). On all the lines: after
        # a warm-up on 600, the first measured run was still the slowest of a run's
        # rows (2,393x, then an A/B row of the old default 2,787x).
        t0 = time.perf_counter()
        bench_end_to_end(cfg, lines, best["dtype"], cache_run=False)
        report["end_to_end_warm_up_s"] = round(time.perf_counter() - t0, 1)
        report["end_to_end"] = bench_end_to_end(cfg, lines, best["dtype"])
        report["end_to_end"]["dtype"] = best["dtype"]
        e2e = report["end_to_end"]["synthesize"].get("x_realtime_claim_to_last_wav") or 0
        report["roofline"]["fraction_reached_end_to_end"] = round(
            e2e / report["roofline"]["x_realtime_limit"], 4)
        save()
        formats = [f.strip() for f in (getattr(ns, "e2e_formats", "") or "").split(",")
                   if f.strip()]
        for compare in [*(getattr(ns, "e2e_compare", None) or []),   # A/B: other config values
                        *(f'output.format="{f}"' for f in formats)]:
            row = bench_end_to_end(cfg, lines, best["dtype"], cache_run=False,
                                   compare=compare)
            row["config"] = compare
            report.setdefault("end_to_end_compare", []).append(row)
            save()
    one_same = next(r for r in report["one_at_a_time"] if r["dtype"] == best["dtype"])
    summary = {"best_batched": best,
               "batched_vs_one_at_a_time": round(best["x_realtime"] / one_same["x_realtime"], 2)}
    pbest = max(report.get("piper", []), key=lambda r: r["x_realtime"], default=None)
    if pbest:
        summary["batched_vs_piper_best"] = round(best["x_realtime"] / pbest["x_realtime"], 2)
    if "end_to_end" in report:
        e2e = report["end_to_end"]["synthesize"].get("x_realtime_claim_to_last_wav") or 0
        summary["end_to_end_x_realtime"] = e2e
        summary["end_to_end_vs_one_at_a_time"] = round(e2e / one_same["x_realtime"], 2)
        if pbest:
            summary["end_to_end_vs_piper_best"] = round(e2e / pbest["x_realtime"], 2)
        summary["cache_hit_cost_ratio"] = report["end_to_end"].get("cache_hit_cost_ratio")
    report["summary"] = summary
    save()
    return report


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "timeline"}


def _timeline(run: dict[str, Any]) -> str:
    """A run's batches: [s after the claim, lines, prepare, model, write ms] each."""
    return "  batches (committed s, lines, prepare/model/write ms): " + "; ".join(
        f"{b[0]} {b[1]} {b[2]:.0f}/{b[3]:.0f}/{b[4]:.0f}" for b in run.get("timeline", []))


def render(r: dict[str, Any]) -> str:
    dev = r["device"]
    out = [(f"ttsd bench — {r['lines']} lines on {dev.get('name')} ({dev.get('device')}), "
            f"torch {r['torch']}, {r['date']}"),
           f"phonemize: {r['phonemize']['ms_per_line']} ms/line",
           "", (f"{'mode':22} {'dtype':9} {'batch':>5} {'x-realtime':>11} {'p50 ms':>8} "
                f"{'p95 ms':>8} {'pad eff':>8} {'peak GiB':>9}")]
    ab = (("x_realtime_halves_overlapped", "  halves overlapped"),
          ("x_realtime_halves_one_after_other", "  halves one by one"))
    for row in r["one_at_a_time"]:
        out.append(f"{'one line at a time':22} {row['dtype']:9} {1:>5} {row['x_realtime']:>11} "
                   f"{row['latency_ms_p50']:>8} {row['latency_ms_p95']:>8} {'':>8} {'':>9}")
        out.extend(f"{label:22} {row['dtype']:9} {1:>5} {row[key]:>11}"
                   for key, label in ab if key in row)
        if "x_realtime_text_eager" in row:
            out.append(f"{'  text half eager':22} {row['dtype']:9} {1:>5} "
                       f"{row['x_realtime_text_eager']:>11}")
    for row in r["batched"]:
        out.append(f"{'batched':22} {row['dtype']:9} {row['batch']:>5} {row['x_realtime']:>11} "
                   f"{row['latency_ms_p50']:>8} {row['latency_ms_p95']:>8} "
                   f"{row['padding_efficiency']:>8} {row.get('peak_gpu_gib', ''):>9}")
        out.extend(f"{label:22} {row['dtype']:9} {row['batch']:>5} {row[key]:>11}"
                   for key, label in ab if key in row)
        if "x_realtime_text_eager" in row:
            out.append(f"{'  text half eager':22} {row['dtype']:9} {row['batch']:>5} "
                       f"{row['x_realtime_text_eager']:>11}")
    for row in r.get("piper", []):
        out.append(f"{'piper onnxruntime':22} {'float32':9} {'1':>5} {row['x_realtime']:>11} "
                   f"   ({row['processes']} proc × {row['threads_each']} threads)")
    for d, q in r.get("quality_vs_float32", {}).items():
        out.append(f"{d} vs float32: same length {q['same_length']}/{q['lines']}, STFT rel. "
                   f"error mean {q['stft_rel_error_mean']} max {q['stft_rel_error_max']}")
    if "end_to_end" in r:
        e = r["end_to_end"]
        out.append(f"end to end: {_brief(e['synthesize'])} (padding efficiency "
                   f"{e.get('padding_efficiency')})")
        out.append(_timeline(e["synthesize"]))
        for f in r.get("end_to_end_compare", []):
            out.append(f"end to end, {f['config']}: {_brief(f['synthesize'])} (padding efficiency "
                       f"{f.get('padding_efficiency')})")
            out.append(_timeline(f["synthesize"]))
        out.append(f"cache hits: {_brief(e['cache_hits'])} (hit cost ratio {e.get('cache_hit_cost_ratio')})")
        out.append(_timeline(e["cache_hits"]))
    if "roofline" in r:
        rf = r["roofline"]
        out.append(f"roofline ({rf['peak']['name']}): {rf['gflop_per_audio_s']['total']} GFLOP "
                   f"and {rf['activation_mb_per_audio_s']} MB of activations per audio second "
                   f"→ limit {rf['x_realtime_limit']}× (compute {rf['x_realtime_limit_compute']}×,"
                   f" memory {rf['x_realtime_limit_memory']}×); reached "
                   f"{rf.get('fraction_reached_model_only')} model-only")
    out.append(f"summary: {r['summary']}")
    return "\n".join(out)
