"""The whole daemon end to end: the bench's lines dropped into a fresh site's inbox
and timed from the claim to the last WAV, then once more as cache hits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ttsd.config import Config
from ttsd.output.formats import KIND, AudioFormat


def toml_text(pairs: str, base: dict[str, dict[str, str]] | None = None) -> str:
    """"a.b=1,a.c=x" over ``base`` ({section: {key: TOML value}}) → TOML text (values as
    written; quote strings). A pair overrides the same key of ``base``: a section appears
    once (TOML refuses a second ``[engine]``, which made every --e2e-compare of an
    engine key fail before)."""
    sections = {k: dict(v) for k, v in (base or {}).items()}
    for pair in filter(None, (p.strip() for p in pairs.split(","))):
        key, _, value = pair.partition("=")
        section, _, name = key.strip().partition(".")
        if not name or not value:
            raise ValueError(f"--e2e-compare: expected SECTION.KEY=VALUE, got {pair!r}")
        sections.setdefault(section, {})[name] = value.strip()
    return "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kvs.items())
                   for s, kvs in sections.items())


def bench_end_to_end(cfg: Config, lines: list[str], dtype: str,
                     devices: list[str] | None = None, cache_run: bool = True,
                     compare: str = "") -> dict[str, Any]:
    """The real daemon (`ttsd run --once`) on a temp folder (removed after); then
    (``cache_run``) the same file again, every line a cache hit. The daemon reuses the
    bench's converted voices (``paths.voices_cache``) instead of converting the voice
    into the temp folder. ``devices``: engine.devices for the daemon (one worker process
    per device; one device runs in the daemon as by default); ``compare``:
    "SECTION.KEY=VALUE,..." over the bench's config (``toml_text``)."""
    root = Path(tempfile.mkdtemp(prefix="ttsd-bench-"))
    try:
        conf = root / "config.toml"
        engine = {"device": f'"{cfg.engine.device}"', "dtype": f'"{dtype}"',
                  "voices_dir": json.dumps(str(cfg.engine.voices_dir))}
        if devices:
            engine["devices"] = "[" + ", ".join(f'"{d}"' for d in devices) + "]"
        paths = {"voice_cache": json.dumps(str(cfg.paths.voices_cache.absolute()))}
        conf.write_text(toml_text(compare, {"paths": paths, "engine": engine,
                                        "input": {"settle_s": "0.0"}}), encoding="utf-8")
        out = {}
        runs = ("synthesize", "cache_hits") if cache_run else ("synthesize",)
        for run in runs:
            (root / "inbox").mkdir(exist_ok=True)
            (root / "inbox" / f"{run}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "ttsd.cli", "--config", str(conf),
                                   "--log-level", "warning", "run", "--once", "--no-progress"],
                                  cwd=root, capture_output=True, text=True, timeout=900,
                                  check=False)   # a failed run is reported, not raised
            wall = time.perf_counter() - t0
            wavs = [p for p in (root / "outbox" / run).glob("*") if p.suffix in KIND]
            audio = sum(AudioFormat(KIND[w.suffix]).seconds(w) for w in wavs)
            out[run] = {"lines": len(lines), "wavs": len(wavs), "audio_s": round(audio, 2),
                        "wall_s_including_start": round(wall, 2), "rc": proc.returncode,
                        "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}
        from ttsd.store.journal import Store
        store = Store(root / "state" / "ttsd.db")
        t = store.batch_totals()
        totals = {"m": t.model_ms, "p": t.prepare_ms, "w": t.write_ms, "a": t.audio_s,
                  "n": t.batches, "used": t.used_frames, "padded": t.padded_frames}
        spans = {}
        for run in runs:   # claim of the file → its last WAV done
            got = store.file_span(f"{run}.txt")
            spans[run] = ({"span": got.span, "n": got.lines, "cached": got.cached} if got
                          else {"span": None, "n": 0, "cached": 0})
        # Where each run's span went: per batch, when it was committed (s after the
        # file's claim), its lines, and its prepare / model / write milliseconds (write:
        # its streamed pieces' too, which ran beside the model).
        for run in runs:
            out[run]["timeline"] = [[m.at_s, m.size, m.prepare_ms, m.model_ms, m.write_ms]
                                    for m in store.batch_marks(f"{run}.txt")]
        store.close()
        synth = spans["synthesize"]
        out["synthesize"]["x_realtime_claim_to_last_wav"] = (
            round(out["synthesize"]["audio_s"] / synth["span"], 1) if synth["span"] else None)
        out["synthesize"]["claim_to_last_wav_s"] = \
            round(synth["span"], 3) if synth["span"] else None   # None: the daemon failed
        out["batches"] = totals
        if totals["padded"]:
            out["padding_efficiency"] = round(totals["used"] / totals["padded"], 3)
        if not cache_run:
            return out
        hits = spans["cache_hits"]
        out["cache_hits"]["lines_cached"] = hits["cached"]
        out["cache_hits"]["claim_to_last_wav_s"] = round(hits["span"], 3) if hits["span"] else None
        if synth["span"] and hits["n"]:
            out["cache_hit_cost_ratio"] = round((hits["span"] / hits["n"]) /
                                                (synth["span"] / synth["n"]), 4)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
