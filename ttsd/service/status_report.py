"""What ``ttsd status`` reports, as records: ``StatusReport`` and its sections.

Field order is the order of ``ttsd status --json`` (``StatusReport.to_json``); scripts
read it, so a field is added at the end of its section, never renamed. Units: seconds,
bytes, ms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ttsd.store.records import GpuReleases
from ttsd.store.report import GPU_DEVICE_PREFIX


@dataclass
class StoreFacts:
    path: str
    exists: bool = False


@dataclass
class DaemonFacts:
    state: str = "down"
    """up | stale (pid alive, heartbeat old) | starting | down"""
    reason: str | None = None
    """Why it is not up, in words."""
    pid: Any = None
    started_at: Any = None
    uptime_s: float | None = None
    heartbeat_at: Any = None
    heartbeat_age_s: float | None = None
    heartbeat_state: str | None = None
    status: str | None = None
    """The daemon's own one-line status text."""
    version: str | None = None
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    """% of one core, sampled now."""


@dataclass
class DeviceFacts:
    device: str | None = None
    dtype: str | None = None
    gpu_name: str | None = None
    gpu_allocated: float | int | None = None
    gpu_reserved: float | int | None = None
    gpu_peak: float | int | None = None


@dataclass
class FileCounts:
    done: int = 0
    failed: int = 0
    in_progress: int = 0


@dataclass
class LineCounts:
    done: int = 0
    failed: int = 0
    pending: int = 0
    running: int = 0
    cached: int = 0


@dataclass
class AudioTotal:
    seconds: float = 0.0
    hours: float = 0.0


@dataclass
class CacheFacts:
    """Hits: done lines answered from the cache; misses: done lines that were not
    (synthesized); hit_rate = hits / (hits + misses)."""

    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    hit_rate: float | None = None


@dataclass
class SpeedFacts:
    batches: int = 0
    ms_per_line: float | None = None
    """Sum model_ms / sum lines, all batches."""
    latency_batches: int = 0
    """Batches behind p50/p95 (the last LATENCY_WINDOW)."""
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    x_realtime_working_last_hour: float | None = None
    """Audio s / working s (``Store.throughput``): batches committed in the last hour."""
    x_realtime_working_overall: float | None = None
    working_s_last_hour: float = 0.0
    """The union of the batches' working intervals."""
    working_s_overall: float = 0.0
    audio_s_last_hour: float = 0.0
    """Audio of the batches committed in the last hour."""
    model_x_realtime: float | None = None
    """Audio s / model s, all batches."""
    padding_efficiency: float | None = None
    """Used / padded frames."""


@dataclass
class WorkerFacts:
    """One worker slot (several devices, or Ray)."""

    slot: int
    device: str
    backend: str | None
    host: str | None
    pid: int | None
    state: str
    batches: int
    lines: int
    audio_s: float
    x_realtime: float | None
    restarts: int
    failures: int
    last_error: str | None
    gpu_name: str | None
    gpu_total: int | None
    gpu_allocated: int | None
    gpu_reserved: int | None
    gpu_peak: int | None
    releases: int
    released_bytes: int
    last_release_at: float | None


@dataclass
class StatusReport:
    """Everything ``ttsd status`` shows."""

    now: float
    store: StoreFacts
    daemon: DaemonFacts = field(default_factory=DaemonFacts)
    device: DeviceFacts = field(default_factory=DeviceFacts)
    queue_depth: int = 0
    """Lines pending + running."""
    files: FileCounts = field(default_factory=FileCounts)
    lines: LineCounts = field(default_factory=LineCounts)
    audio: AudioTotal = field(default_factory=AudioTotal)
    cache: CacheFacts = field(default_factory=CacheFacts)
    speed: SpeedFacts = field(default_factory=SpeedFacts)
    memory_releases: GpuReleases = field(default_factory=GpuReleases)
    """Releases of GPU memory (rows whose device is a GPU)."""
    workers: list[WorkerFacts] = field(default_factory=list)
    blocked: list[dict[str, Any]] = field(default_factory=list)
    """Places the daemon cannot write now, as its lock file's note has them: place
    (outbox, state, done, failed, inbox), path, error, since (epoch s), retries,
    retry_in_s."""

    def to_json(self) -> dict[str, Any]:
        """The report as ``ttsd status --json`` prints it."""
        return dataclasses.asdict(self)


def on_gpu(device: str | None) -> bool:
    """Whether a device name (``cuda:0``, ``cpu``, …) is a GPU's."""
    return device is not None and device.lower().startswith(GPU_DEVICE_PREFIX)


def finite(x: Any) -> bool:
    """A real number that is not infinite or NaN (a bool is not a number here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
