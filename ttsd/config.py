"""Configuration: frozen dataclasses, defaults, TOML load (tomllib) and dump (tomli-w).

Built once at the edge (``Config.load(path)``); each stage receives its own section.
Relative paths resolve against the folder of the config file (or the current folder
when no file is used).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from ttsd.errors import ConfigError


@dataclass(frozen=True)
class PathsConfig:
    inbox: Path = Path("inbox")
    """Folder watched for .txt and .csv files."""
    outbox: Path = Path("outbox")
    """Folder that receives outbox/<input stem>/<id>.wav and manifest.csv."""
    done: Path = Path("done")
    """Inputs move here once every line is a WAV or a recorded error."""
    failed: Path = Path("failed")
    """Inputs that cannot be read move here with NAME.error.txt beside them."""
    state: Path = Path("state")
    """SQLite store (ttsd.db), the work folder of claimed inputs, and the WAV cache."""
    voice_cache: str = ""
    """Folder of converted voices (``<sha256>-v<N>.pt``, the ONNX voice turned into
    PyTorch weights, ~60 MB each), shared by ``say``, ``bench`` and the daemon; "" = the
    per-user cache folder (see ``voices_cache``). Not one of the ``FOLDERS``: it may be
    shared by several sites, and a folder that cannot be written only means each start
    converts the voice again, in memory."""

    @property
    def db(self) -> Path:
        return self.state / "ttsd.db"

    @property
    def work(self) -> Path:
        return self.state / "work"

    @property
    def cache(self) -> Path:
        return self.state / "cache"

    @property
    def voices_cache(self) -> Path:
        """The folder of converted voices: ``voice_cache`` when set, else
        ``platformdirs.user_cache_dir("ttsd")/voices`` ($XDG_CACHE_HOME/ttsd/voices, else
        ~/.cache/ttsd/voices on Linux). Worked out where it is used, so each process (a
        worker on another node too) finds its own user's cache."""
        if self.voice_cache:
            return Path(self.voice_cache)
        return Path(platformdirs.user_cache_dir("ttsd")) / "voices"


@dataclass(frozen=True)
class InputConfig:
    settle_s: float = 1.0
    """A file is claimed only once its size and mtime have not changed for this long."""
    rescan_s: float = 30.0
    """Full rescan of the inbox every this many seconds (catches lost events)."""
    polling: bool = False
    """Use a polling observer (NFS/CIFS inboxes); also the fallback when inotify fails."""
    max_file_bytes: int = 256 * 1024 * 1024
    """Files larger than this are rejected on stat, before reading."""
    max_lines: int = 1_000_000
    """Files with more lines than this are rejected."""
    max_line_chars: int = 5000
    """A longer line fails alone (row error)."""
    max_pending_lines: int = 500_000
    """Claiming new files pauses while more lines than this wait in the queue."""


@dataclass(frozen=True)
class EngineConfig:
    voice: str = "en_US-joe-medium"
    """Default voice: a name from `ttsd voices`."""
    voices_dir: Path = Path("voices")
    """Extra voices: NAME.onnx + NAME.onnx.json pairs."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cuda, cuda:N or cpu."""
    devices: tuple[str, ...] = ()
    """Several devices, one worker process each: ("auto",) = every visible GPU (else the
    CPU), or a list such as ("cuda:0", "cuda:1"). Empty, or one device: the model runs
    in the daemon's own process on ``device`` (or that one device), as before."""
    dtype: str = "auto"
    """auto, float32, float16 or bfloat16 (half precision applies to the decoder only)."""
    speaker: str = ""
    """Default speaker (name or id) for multi-speaker voices; empty = the voice's default."""
    speed: float = 1.0
    """Speaking speed; length_scale = 1/speed."""
    noise_scale: float = -1.0
    """Generator noise; negative = the voice's own setting."""
    noise_w: float = -1.0
    """Duration noise; negative = the voice's own setting."""
    seed: int = 0
    """Noise seed; a line's audio depends on (seed, text, params) only, never its batch."""
    sentence_silence_s: float = 0.2
    """Silence inserted between the sentences of one line."""
    max_audio_s_per_char: float = 0.5
    """Cap on output length: a line may yield at most 2 s + this × characters of audio."""
    memory_fraction: float = 0.9
    """Share of the GPU's memory this process may use."""
    cudnn_benchmark: bool = False
    """Let cuDNN time its kernels for each new shape (GPU only). Off by default: with
    variable batch shapes the search itself dominated (batch latency p95 1.6-5 s on an H100),
    and for the warmed call shapes it picks the plans the heuristics pick (an H200:
    identical output, 585.7 vs 586.9 ms over ten shapes)."""
    warmup: bool = True
    """Run the model over typical shapes at load so the first batch is fast."""
    phonemizer_processes: int = 0
    """Processes running espeak-ng for the daemon; 0 = auto (a quarter of the cores, 1 to
    4). Each is replaced after 500 chunks of 16 lines: Piper's espeak-ng bridge keeps
    ≈ 2 KB per distinct line, so one process forever would grow without bound."""
    compile: str = "auto"
    """torch.compile the audio half (flows + decoder) with dynamic shapes: "auto" (on a
    GPU), "on" or "off". Fuses the decoder's masks and activations into its convolutions
    (≈ 2× on an H100); costs ≈ 20-40 s at start-up (cached on disk by PyTorch after)."""
    compile_text: str = "auto"
    """torch.compile the text half (encoder + duration predictor, strict float32 still)
    for calls of more than 32 sentences, which the CUDA graphs do not take: "auto"
    (when ``compile`` is on), "on" or "off". On an H200 at batch 128: 21.6 → 15.6 ms a
    call, every duration the same; ≈ 30-50 s more at the first start."""
    pack_calls: bool = True
    """Cut each batch's sentences into audio-half calls where padding costs least
    (``ttsd.engine.packing``; row counts multiples of 16) instead of every
    ``max_batch_size`` sentences: on the bench's lines 0.86 of the padded frames are
    real instead of 0.78 (0.90 vs 0.78 in the bench's model-only row on an H200), for
    39 calls instead of 29. Its row counts make more distinct call shapes, so the
    warm-up runs (and with ``audio_graphs`` captures) every bucket's multiples of
    ``row_step`` rows. End to end on an H200 with audio graphs: 5,640 and 5,613x vs
    5,059 and 5,310x without (alternating runs), padding 0.90 vs 0.84."""
    warmup_frames: int = 2048
    """GPU warm-up: run the audio half once at the full-call shape (``max_batch_size``
    rows, or fewer within the frame budget) of every frames bucket up to this many
    frames (2,048 ≈ 24 s of audio at 22,050 Hz), so that the first batches do not pay
    for new shapes (20-45 ms each on an H200). 0 = off."""
    audio_graphs: str = "auto"
    """Replay the audio half from a CUDA graph per call shape (``graphs.AudioGraphs``):
    auto (on a GPU), on, off. The compiled half launches its kernels from Python, which
    inside the daemon shares the interpreter with the writers and the feeder; a replay is
    one launch. End to end on an H200: 5,189 and 5,036x vs 4,479x off (model only, with
    nothing beside it, even). Costs a capture per shape at warm-up (and per other shape on
    its second use) and a memory pool about one call's activations (kept while idle:
    ``memory.free_memory_every_s``)."""
    row_step: int = 16
    """GPU: an audio-half call of at least this many sentences runs with its rows padded
    up to a multiple of this (at most a full call's rows), and the warm-up runs those
    shapes for frames buckets up to 512: a batch's last, partial call then reuses a
    warmed shape instead of paying 20-45 ms for a new one (on the bench's lines 3 of a
    run's 4 new shapes were such calls). Padded rows cost their share of one small
    call. 0 = off."""
    cuda_graphs: str = "auto"
    """Replay the text half (encoder + duration predictor) of calls of up to 32
    sentences from CUDA graphs, one per (batch, tokens) bucket, captured at warm-up:
    "auto"/"on" (on a GPU) or "off". There the text half is launch-bound (hundreds of
    small kernels; a graph is one launch): one line at a time went 247x → 603x on an
    H200."""
    overlap_halves: str = "auto"
    """Run the text half (encoder + durations) of the next batch in the feeder thread,
    on a side stream, beside the audio half of the batch in the model thread (one
    device in the daemon): "auto"/"on" (on a GPU) or "off". End to end on an H200 it
    won four runs out of four (+2 % to +23 %; ttsd/engine/PERFORMANCE.md); model only
    the A/B is unsettled (the second timing of each pair won). On the CPU both halves
    would fight over the same cores."""

    def overlaps(self, gpu: bool) -> bool:
        """``overlap_halves`` resolved for an engine on a GPU or not."""
        return self.overlap_halves == "on" or self.overlap_halves == "auto" and gpu


LINES_PER_MODEL_BATCH = 4
"""``batching.lines_per_batch = 0`` on a GPU: this many model batches of lines."""

WRITERS_MAX = 32
"""The most writer threads ``batching.writer_threads = 0`` (auto) resolves to."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 0
    """Sentences per model call; 0 = auto (128 on a GPU: 3,160x vs 2,661x at 64 on an
    H100, 12 GiB peak; 1 on the CPU, where batching hurts)."""
    lines_per_batch: int = 0
    """Lines taken (and written, and committed) together; 0 = auto: 4 × max_batch_size
    on a GPU, max_batch_size on the CPU. The engine sorts a batch's sentences by length
    and runs them max_batch_size at a time, so the more lines a batch holds, the less
    each model call pads: on the bench's 2,000 lines 0.63 of the padded frames are audio
    at 128 lines a batch, 0.81 at 256, 0.89 at 512."""

    def lines(self, model_batch: int, gpu: bool) -> int:
        """``lines_per_batch`` resolved for a model batch of ``model_batch``."""
        return self.lines_per_batch or (LINES_PER_MODEL_BATCH * model_batch if gpu
                                        else model_batch)
    max_wait_ms: int = 50
    """A partial batch is sent after waiting this long for more lines."""
    max_phonemes: int = 80000
    """Phoneme budget of one batch (padded length × lines)."""
    prefetch: int = 2
    """Batches prepared ahead of the GPU (and finished batches waiting for the sink)."""
    idle_batch: float = 0.5
    """The share of ``lines_per_batch`` taken when the model is idle (the first batch
    of a burst): its phonemes and its text half are time the GPU only waits, so it is
    smaller; the batches taken while the model works are whole (1.0: always whole)."""
    stream_writes: bool = True
    """Write a batch's lines as each model call completes them, while the model runs
    the batch's other calls, instead of after the whole batch: the last batch's WAVs
    no longer all wait for its last call (the daemon's drain)."""
    writer_threads: int = 0
    """Threads encoding, writing and fsyncing WAV files; 0 = auto (two per core, at
    most 32: see ``writers``)."""

    @property
    def writers(self) -> int:
        """``writer_threads`` resolved; auto = ``min(32, 2 × cores)``.

        A writer thread is I/O-bound: the PCM_16 encoder is numpy (~0.2 ms per 6 s line,
        GIL released in the array loops) and the rest is write + fsync of the file, which
        release the GIL and mostly wait on the disk. Two threads per core keep the cores
        busy while the others wait (on a 2-core VM: 4 threads 0.77 ms/line, 2 threads
        0.91, 8 threads 0.83, 32 threads 1.04); the cap bounds the WAVs in flight (~2 MB
        of buffers each) and the fsyncs queued on one disk."""
        import os
        return self.writer_threads or min(WRITERS_MAX, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class OutputConfig:
    subtype: str = "PCM_16"
    """WAV sample format: PCM_16, PCM_24, PCM_32 or FLOAT."""
    manifest: bool = True
    """Write outbox/<stem>/manifest.csv when a file is finished."""


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    """Reuse the WAV of an identical earlier line (same text, voice and settings)."""
    link: bool = False
    """Hard-link cached WAVs into the outbox instead of copying them (a clone where the
    file system has them: XFS, btrfs). Faster and takes no space, but every outbox WAV
    of a line and the cache then share one file: an edit in place of one changes the
    others, and the cache entry is dropped (its line synthesized again next time)."""


@dataclass(frozen=True)
class MemoryConfig:
    free_memory_every_s: float = 600.0
    """Return cached GPU memory to the driver this often (0 = never). The CUDA graphs'
    memory pools stay (``engine.audio_graphs``: about one audio call's activations):
    they are the warm state, like the weights; turn the graphs off to give that back too
    on a shared GPU."""
    idle_s: float = 30.0
    """Also return it after this long without work."""


@dataclass(frozen=True)
class DaemonConfig:
    log_level: str = "info"
    """debug, info, warning or error."""
    heartbeat_s: float = 2.0
    """How often the daemon records its heartbeat (read by `ttsd status`)."""
    max_attempts: int = 3
    """A line whose synthesis was started this many times without finishing fails."""
    stop_timeout_s: float = 60.0
    """On SIGTERM the batch in flight may finish within this time, else it is requeued."""
    once_blocked_s: float = 300.0
    """``run --once`` gives up (exit 75) when a folder or the journal has stayed
    unwritable (full, read-only, gone) this long; the daemon itself waits for ever."""
    gil_switch_ms: float = 1.0
    """Python's thread switch interval (``sys.setswitchinterval``); 0 = Python's default
    (5 ms). Two threads launch GPU kernels (the feeder the text half, the model thread
    the audio half: ``engine.overlap_halves``) while writer threads run Python too; a
    shorter interval hands a launching thread the interpreter back sooner. H200, 2,000
    lines, halves overlapped: 1 ms 3,276x vs 2,942x at 5 ms, then 3,624x vs 3,487x
    (the 5 ms row ran later, which favours it). With the halves one after the other
    0.5 ms was no clear win (session 4)."""


@dataclass(frozen=True)
class ClusterConfig:
    backend: str = "local"
    """local: worker processes on this host (engine.devices); ray: Ray actors."""
    address: str = "auto"
    """Ray only: "auto" (the cluster this host belongs to), "ray://HOST:10001", or
    "local" (start a private single-host Ray instance inside the daemon)."""
    workers: int = 0
    """Ray only: actors to start; 0 = one per GPU of the cluster, or, with no GPU,
    one per cpus_per_worker CPUs."""
    cpus_per_worker: int = 0
    """CPU workers: torch threads of each (Ray: its num_cpus); 0 = the host's cores
    divided among the CPU workers (Ray: 1)."""
    queue_ahead: int = 1
    """Batches queued on each worker beyond the one it is running."""
    batch_timeout_s: float = 300.0
    """A batch running longer than this means a hung worker: it is killed, restarted,
    and its batch goes back to the queue."""
    start_timeout_s: float = 300.0
    """A worker must load its voice and warm up within this."""
    restart_backoff_s: float = 1.0
    """Delay before restarting a dead worker; doubles per recent failure."""
    restart_backoff_max_s: float = 60.0
    """Upper bound of that delay."""
    max_failures: int = 5
    """A device whose worker failed this many times within failure_window_s is taken
    out of rotation (reported in `ttsd status` and the log)."""
    failure_window_s: float = 600.0
    """The window for max_failures."""


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    input: InputConfig = field(default_factory=InputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path | None = None
    """The file this config was read from (None for defaults)."""

    @staticmethod
    def load(path: Path | str | None = None) -> Config:
        """The config read from ``path`` (``--config``), else from ``$TTSD_CONFIG``, else
        from ``./config.toml`` in the current folder, else the built-in defaults; every
        path made absolute and the folders checked (``check_folders``).

        A file named by ``path`` or ``$TTSD_CONFIG`` that is missing or unreadable is a
        ConfigError naming it and where it was named; an empty ``$TTSD_CONFIG`` is unset.
        """
        if path is not None:
            return _read(Path(path), "--config")
        env = os.environ.get("TTSD_CONFIG", "")
        if env:
            return _read(Path(env), "$TTSD_CONFIG")
        local = Path("config.toml")
        if local.exists():
            return _read(local, None)
        return Config().resolved(Path.cwd(), "built-in defaults")

    def resolved(self, base: Path, where: str = "config") -> Config:
        """Make every relative path absolute against ``base`` (a set ``paths.voice_cache``
        too; "" stays "", the per-user folder), then check the folders (``check_folders``;
        errors start with ``where``)."""
        def fix(p: Path) -> Path:
            p = p.expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        vc = self.paths.voice_cache
        paths = PathsConfig(**{f.name: fix(getattr(self.paths, f.name))
                               for f in dataclasses.fields(PathsConfig) if f.name != "voice_cache"},
                            voice_cache=str(fix(Path(vc))) if vc else "")
        check_folders(paths, where)
        engine = dataclasses.replace(self.engine, voices_dir=fix(self.engine.voices_dir))
        return dataclasses.replace(self, paths=paths, engine=engine)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            section = getattr(self, f.name)
            out[f.name] = {k.name: _plain(getattr(section, k.name))
                           for k in dataclasses.fields(section)}
        return out


def _read(path: Path, named_by: str | None) -> Config:
    """The config in the file ``path``; ``named_by`` (``--config``, ``$TTSD_CONFIG``, or
    None for ``./config.toml``) says where the path came from, for the error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{named_by} names {path}, which does not exist" if named_by
                          else f"{path}: no such config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        reason = f"cannot be read ({exc.strerror or exc})"
        raise ConfigError(f"{named_by} names {path}, which {reason}" if named_by
                          else f"{path}: {reason}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = from_dict(raw, where=str(path))
    real = path.resolve()
    return dataclasses.replace(cfg, source=real).resolved(real.parent, str(path))


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v


SECTIONS: dict[str, type] = {
    "paths": PathsConfig, "input": InputConfig, "engine": EngineConfig,
    "batching": BatchingConfig, "output": OutputConfig, "cache": CacheConfig,
    "memory": MemoryConfig, "daemon": DaemonConfig, "cluster": ClusterConfig,
}


def from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    """Build a validated Config from parsed TOML; errors name the key."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section [{min(unknown)}]"
                          f" (known: {', '.join(SECTIONS)})")
    sections = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        sections[name] = _section(cls, table, f"{where}: {name}")
    cfg = Config(**sections)
    validate(cfg, where)
    return cfg


def _section(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        values[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint == tuple[str, ...]:  # engine.devices: "auto" or a list of strings
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            raise ConfigError(f"{where}: expected \"auto\" or a list of device strings, "
                              f"got {value!r}")
        return tuple(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported setting type {hint}")  # pragma: no cover


_DTYPES = ("auto", "float32", "float16", "bfloat16")
_SUBTYPES = ("PCM_16", "PCM_24", "PCM_32", "FLOAT")
_LEVELS = ("debug", "info", "warning", "error")
_BACKENDS = ("local", "ray")


FOLDERS = ("inbox", "outbox", "done", "failed", "state")
"""The [paths] keys that must name distinct folders, none inside another."""

_ONE_EACH = "each must be its own folder, none inside another"


def check_folders(paths: PathsConfig, where: str = "config") -> None:
    """Refuse two of the ``FOLDERS`` that are one folder, or one inside another.

    The paths must be absolute. They are compared as real paths (``os.path.realpath``:
    the symlinks among the parts that exist are followed), so an alias is caught. The
    ConfigError names the keys and their paths.
    """
    given: dict[str, Path] = {k: getattr(paths, k) for k in FOLDERS}
    real = {k: Path(os.path.realpath(p)) for k, p in given.items()}

    def show(key: str) -> str:
        return f"paths.{key}" if given[key] == real[key] else f"paths.{key} ({given[key]})"

    def at(key: str) -> str:
        return str(given[key]) if given[key] == real[key] else f"{given[key]}, which is {real[key]}"

    for i, key in enumerate(FOLDERS):
        same = [key] + [k for k in FOLDERS[i + 1:] if real[k] == real[key]]
        if len(same) > 1:
            names = ", ".join(show(k) for k in same[:-1]) + f" and {show(same[-1])}"
            raise ConfigError(f"{where}: {names} are the same folder ({real[key]}): "
                              f"{_ONE_EACH}")
    for outer, inner in itertools.permutations(FOLDERS, 2):
        if real[inner].is_relative_to(real[outer]):
            raise ConfigError(f"{where}: paths.{inner} ({at(inner)}) lies inside "
                              f"paths.{outer} ({at(outer)}): {_ONE_EACH}")


def validate(cfg: Config, where: str = "config") -> None:
    """Reject impossible values, naming the key; the folders too once their paths are
    absolute (``check_folders``; relative ones are checked by ``Config.resolved``)."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {key}: {msg}")

    i, e, b, m, d = cfg.input, cfg.engine, cfg.batching, cfg.memory, cfg.daemon
    need(i.settle_s >= 0, "input.settle_s", "must be >= 0")
    need(i.rescan_s > 0, "input.rescan_s", "must be > 0")
    need(i.max_file_bytes > 0, "input.max_file_bytes", "must be > 0")
    need(i.max_lines > 0, "input.max_lines", "must be > 0")
    need(i.max_line_chars > 0, "input.max_line_chars", "must be > 0")
    need(i.max_pending_lines > 0, "input.max_pending_lines", "must be > 0")
    need(e.dtype in _DTYPES, "engine.dtype", f"must be one of {', '.join(_DTYPES)}")
    need(e.device == "auto" or e.device == "cpu" or e.device.startswith("cuda"),
         "engine.device", "must be auto, cpu, cuda or cuda:N")
    for dev in e.devices:
        need(dev == "auto" and len(e.devices) == 1 or dev == "cpu" or _cuda(dev),
             "engine.devices", f"{dev!r}: each must be cpu, cuda or cuda:N "
             "(or the whole value \"auto\")")
    need(0.1 <= e.speed <= 10, "engine.speed", "must be between 0.1 and 10")
    need(e.noise_scale <= 10, "engine.noise_scale", "must be <= 10")
    need(e.noise_w <= 10, "engine.noise_w", "must be <= 10")
    need(0 <= e.sentence_silence_s <= 10, "engine.sentence_silence_s", "must be between 0 and 10")
    need(e.max_audio_s_per_char > 0, "engine.max_audio_s_per_char", "must be > 0")
    need(0 < e.memory_fraction <= 1, "engine.memory_fraction", "must be in (0, 1]")
    need(e.compile in ("auto", "on", "off"), "engine.compile", "must be auto, on or off")
    need(e.compile_text in ("auto", "on", "off"), "engine.compile_text",
         "must be auto, on or off")
    need(e.overlap_halves in ("auto", "on", "off"), "engine.overlap_halves",
         f"{e.overlap_halves!r}: must be auto, on or off")
    need(e.cuda_graphs in ("auto", "on", "off"), "engine.cuda_graphs",
         "must be auto, on or off")
    need(0 <= e.warmup_frames <= 100_000, "engine.warmup_frames", "must be 0 to 100000")
    need(0 <= e.row_step <= 128, "engine.row_step", "must be 0 to 128")
    need(e.audio_graphs in ("auto", "on", "off"), "engine.audio_graphs",
         f"{e.audio_graphs!r}: must be auto, on or off")
    need(0 <= e.phonemizer_processes <= 64, "engine.phonemizer_processes",
         "must be between 0 (auto) and 64")
    need(b.max_batch_size >= 0, "batching.max_batch_size", "must be >= 0 (0 = auto)")
    need(d.gil_switch_ms >= 0, "daemon.gil_switch_ms", "must be >= 0 (0 = default)")
    need(b.lines_per_batch >= 0, "batching.lines_per_batch", "must be >= 0 (0 = auto)")
    need(b.max_wait_ms >= 0, "batching.max_wait_ms", "must be >= 0")
    need(b.max_phonemes > 0, "batching.max_phonemes", "must be > 0")
    need(b.prefetch >= 1, "batching.prefetch", "must be >= 1")
    need(0 < b.idle_batch <= 1, "batching.idle_batch", "must be > 0 and <= 1")
    need(b.writer_threads >= 0, "batching.writer_threads", "must be >= 0 (0 = auto)")
    need(cfg.output.subtype in _SUBTYPES, "output.subtype", f"must be one of {', '.join(_SUBTYPES)}")
    need(m.free_memory_every_s >= 0, "memory.free_memory_every_s", "must be >= 0")
    need(m.idle_s >= 0, "memory.idle_s", "must be >= 0")
    need(d.log_level in _LEVELS, "daemon.log_level", f"must be one of {', '.join(_LEVELS)}")
    need(d.heartbeat_s > 0, "daemon.heartbeat_s", "must be > 0")
    need(d.max_attempts >= 1, "daemon.max_attempts", "must be >= 1")
    need(d.stop_timeout_s >= 0, "daemon.stop_timeout_s", "must be >= 0")
    need(d.once_blocked_s > 0, "daemon.once_blocked_s", "must be > 0")
    c = cfg.cluster
    need(c.backend in _BACKENDS, "cluster.backend", f"must be one of {', '.join(_BACKENDS)}")
    need(c.address in ("auto", "local") or c.address.startswith("ray://")
         or ":" in c.address, "cluster.address",
         'must be "auto", "local", "ray://HOST:PORT" or HOST:PORT')
    need(c.workers >= 0, "cluster.workers", "must be >= 0 (0 = one per GPU)")
    need(c.cpus_per_worker >= 0, "cluster.cpus_per_worker", "must be >= 0 (0 = auto)")
    need(c.queue_ahead >= 0, "cluster.queue_ahead", "must be >= 0")
    need(c.batch_timeout_s > 0, "cluster.batch_timeout_s", "must be > 0")
    need(c.start_timeout_s > 0, "cluster.start_timeout_s", "must be > 0")
    need(c.restart_backoff_s >= 0, "cluster.restart_backoff_s", "must be >= 0")
    need(c.restart_backoff_max_s >= c.restart_backoff_s, "cluster.restart_backoff_max_s",
         "must be >= cluster.restart_backoff_s")
    need(c.max_failures >= 1, "cluster.max_failures", "must be >= 1")
    need(c.failure_window_s > 0, "cluster.failure_window_s", "must be > 0")
    if all(getattr(cfg.paths, k).is_absolute() for k in FOLDERS):
        check_folders(cfg.paths, where)


def _cuda(dev: str) -> bool:
    return dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())


def dump(cfg: Config) -> str:
    """The config as TOML text (tomli-w)."""
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())
