"""``ttsd status`` for a terminal: a ``StatusReport`` as a compact block of labelled rows."""

from __future__ import annotations

import time

from ttsd.service.status_report import StatusReport, finite, on_gpu
from ttsd.units import human_bytes, human_duration


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f} ms" if x < 100 else f"{x:,.0f} ms")


def _xrt(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}×" if x < 100 else f"{x:,.0f}×")


def _audio(seconds: float) -> str:
    """An amount of audio: hours from 0.1 h up (``0.35 h``), a duration below."""
    return f"{seconds / 3600:,.2f} h" if seconds >= 360 else human_duration(seconds)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def render(report: StatusReport) -> str:
    """A compact, readable block for a terminal."""
    d, dev, sp = report.daemon, report.device, report.speed
    lines, files, cache = report.lines, report.files, report.cache
    rel = report.memory_releases
    now = report.now or time.time()
    out: list[str] = []

    def row(label: str, text: str) -> None:
        out.append(f"{label:<9} {text}")

    if d.state == "up":
        cpu = "-" if d.cpu_percent is None else f"{d.cpu_percent:.0f}%"
        text = (f"up · pid {d.pid} · uptime {human_duration(d.uptime_s)} · "
                f"RSS {human_bytes(d.rss_bytes)} · CPU {cpu}")
        if d.version:
            text += f" · v{d.version}"
    else:
        text = f"{d.state.upper()} · {d.reason or 'unknown'}"
    if d.heartbeat_age_s is not None:
        text += f" · heartbeat {human_duration(d.heartbeat_age_s)} ago"
    row("daemon", text)
    if d.status and d.state != "down":
        row("", d.status)
    for b in report.blocked:
        row("BLOCKED", f"{b.get('place')}: {b.get('path')}: {b.get('error')} (for "
                       f"{human_duration(now - b['since']) if finite(b.get('since')) else '-'}, "
                       f"retry in {human_duration(b.get('retry_in_s'))}; nothing is lost, "
                       "the work waits)")
    if dev.device:
        text = " ".join(x for x in (dev.device, dev.dtype) if x)
        if dev.gpu_name:
            text += f" · {dev.gpu_name}"
        if on_gpu(dev.device) and any(
                x is not None for x in (dev.gpu_allocated, dev.gpu_reserved, dev.gpu_peak)):
            text += (f" · GPU memory {human_bytes(dev.gpu_allocated)} allocated, "
                     f"{human_bytes(dev.gpu_reserved)} reserved, "
                     f"{human_bytes(dev.gpu_peak)} peak")
        row("device", text)
    row("queue", f"{report.queue_depth:,} lines ({lines.pending:,} pending, "
                 f"{lines.running:,} running)")
    row("files", f"{files.done:,} done · {files.failed:,} failed · "
                 f"{files.in_progress:,} in progress")
    row("lines", f"{lines.done:,} done ({lines.cached:,} from the cache) · "
                 f"{lines.failed:,} failed")
    audio = report.audio
    row("audio", f"{audio.hours:,.2f} h" if audio.hours >= 1
        else human_duration(audio.seconds))
    rate = "-" if cache.hit_rate is None else f"{100 * cache.hit_rate:.1f}%"
    row("cache", f"{cache.entries:,} entries · {human_bytes(cache.bytes)} · "
                 f"hit rate {rate} ({_plural(cache.hits, 'line')} from the cache, "
                 f"{cache.misses:,} synthesized)")
    if sp.batches:
        row("speed", f"{_ms(sp.ms_per_line)}/line · batch p50 {_ms(sp.latency_p50_ms)}, "
                     f"p95 {_ms(sp.latency_p95_ms)} (last {sp.latency_batches:,} batches)")
        row("", f"{_xrt(sp.x_realtime_working_last_hour)} realtime while working "
                f"(last hour) · {_xrt(sp.x_realtime_working_overall)} overall · "
                f"{_xrt(sp.model_x_realtime)} model only")
        row("", f"{_audio(sp.audio_s_last_hour)} of audio in the last hour · "
                f"{sp.batches:,} batches")
    else:
        row("speed", "no batches yet")
    if rel.count:
        row("memory", f"last release {human_duration(now - rel.last_at)} ago "
                      f"({human_bytes(rel.last_bytes)}, {rel.last_reason or '-'}) · "
                      f"{_plural(rel.count, 'release')}, "
                      f"{human_bytes(rel.total_bytes)} in all")
    ws = report.workers
    if ws:
        states: dict[str, int] = {}
        for w in ws:
            states[w.state] = states.get(w.state, 0) + 1
        row("workers", f"{len(ws)} · " + ", ".join(f"{n} {st}" for st, n in states.items()))
        for w in ws:
            text = (f"#{w.slot} {w.device} @ {w.host or '-'} pid {w.pid or '-'} "
                    f"{w.state} · {w.batches:,} batches · {_xrt(w.x_realtime)} · "
                    f"restarts {w.restarts}")
            if w.gpu_allocated:
                text += (f" · GPU {human_bytes(w.gpu_allocated)} allocated, "
                         f"{human_bytes(w.gpu_reserved)} reserved, "
                         f"{human_bytes(w.gpu_peak)} peak")
            if w.releases:
                text += (f" · {_plural(w.releases, 'release')} "
                         f"({human_bytes(w.released_bytes)})")
            if w.state in ("out", "restarting") and w.last_error:
                text += f" · {w.last_error[:80]}"
            row("", text)
    out.append(f"{'store':<9} {report.store.path}")
    return "\n".join(out)
