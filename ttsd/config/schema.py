"""The config's records: one frozen dataclass per section of config.toml, with its
defaults and what each key means (the documented file, ``default.toml``, says the same
in one line a key).

Built once at the edge (``Config.load``, reading in ``ttsd.config.load``); each stage
receives its own section. Relative paths resolve against the folder of the config file
(or the current folder when no file is used).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from ttsd.config.checks import check_folders


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
    markup: str = "none"
    """"ssml": every line is SSML; "none": only a line that starts with ``<speak>`` (a
    CSV ``markup`` column decides for its row)."""
    markup_unknown: str = "fail"
    """An unknown SSML tag or attribute: "fail" the line, or "read" the text inside."""
    paragraph_pause_s: float = 0.6
    """The pause around an SSML ``<p>`` (``<s>``: ``engine.sentence_silence_s``)."""
    lexicon: str = ""
    """A pronunciation lexicon (``ttsd.markup.lexicon``): a file of WORD<TAB>/IPA/ or
    WORD<TAB>respelling lines, relative to the config's folder; "" for none."""


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
    in the daemon's own process on ``device`` (or that one device)."""
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
    warmup: bool = True
    """Run the model over typical shapes at load so the first batch is fast."""
    phonemizer_processes: int = 0
    """Processes running espeak-ng for the daemon; 0 = auto (a quarter of the cores, 1 to
    4). Each is replaced after 500 chunks of 16 lines: Piper's espeak-ng bridge keeps
    ≈ 2 KB per distinct line, so one process forever would grow without bound."""
    compile: str = "auto"
    """torch.compile the audio half (flows + decoder) with dynamic shapes: "auto" (on a
    GPU), "on" or "off". Fuses the decoder's masks and activations into its convolutions
    (≈ 2× on an H100); costs ≈ 20-40 s at start-up (cached on disk by PyTorch after).
    "ahead": compile both halves once per machine into packages kept beside the converted
    voices, which later starts load without tracing the model again; the warm-up then
    runs one line before the daemon is ready and the rest while it is idle. Not yet
    measured on a GPU, so not the default."""
    fused: str = "off"
    """"on": on a GPU, run the decoder's residual blocks as fused Triton kernels (each
    step's activation, convolution, bias and residual in one pass over the samples,
    instead of several passes through GPU memory; ``engine/vits/fused.py``), with
    ``compile`` "auto" or "on" (packages built "ahead" keep the unfused decoder). "off":
    the torch ops. Its speed on a GPU is not yet measured, so it is not the default."""


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

    max_wait_ms: int = 50
    """A partial batch is sent after waiting this long for more lines."""
    max_phonemes: int = 80000
    """Phoneme budget of one text-half model call (padded length × sentences)."""
    prefetch: int = 2
    """Batches prepared ahead of the GPU (and finished batches waiting for the sink)."""
    idle_batch: float = 0.5
    """Share of a batch taken while the model is idle (a burst's first batch): its
    WAVs come sooner; 1.0 = whole batches from the first."""
    writer_threads: int = 0
    """Threads encoding, writing and fsyncing WAV files; 0 = auto (two per core, at
    most 32: see ``writers``)."""

    def lines(self, model_batch: int, gpu: bool) -> int:
        """``lines_per_batch`` resolved for a model batch of ``model_batch``."""
        return self.lines_per_batch or (LINES_PER_MODEL_BATCH * model_batch if gpu
                                        else model_batch)

    @property
    def writers(self) -> int:
        """``writer_threads`` resolved; auto = ``min(32, 2 × cores)``.

        A writer thread is I/O-bound: the PCM_16 encoder is numpy (~0.2 ms per 6 s line,
        GIL released in the array loops) and the rest is write + fsync of the file, which
        release the GIL and mostly wait on the disk. Two threads per core keep the cores
        busy while the others wait (on a 2-core VM: 4 threads 0.77 ms/line, 2 threads
        0.91, 8 threads 0.83, 32 threads 1.04); the cap bounds the WAVs in flight (~2 MB
        of buffers each) and the fsyncs queued on one disk."""
        return self.writer_threads or min(WRITERS_MAX, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class OutputConfig:
    format: str = "wav"
    """A line's file: wav, flac, mp3, ogg (Vorbis) or opus; the suffix follows it."""
    subtype: str = "PCM_16"
    """Sample format of wav (PCM_16, PCM_24, PCM_32, FLOAT; telephony ULAW, ALAW) and of
    flac (PCM_16, PCM_24); the other formats have none."""
    bitrate_kbps: int = 0
    """mp3, opus and m4b: constant bitrate in kbit/s; 0 = 64 (mp3, m4b) or 32 (opus)."""
    sample_rate: int = 0
    """Hz: 0 = the voice's own (22,050 for most), else 8000 … 48000 (soxr); opus: 48000."""
    loudness_lufs: float = 0.0
    """Integrated loudness of every line (ITU-R BS.1770), e.g. -16 (podcasts), -23 (EBU
    R128); 0 = off: each sentence at its own peak, as the voice gives it."""
    true_peak_dbtp: float = -1.0
    """With a loudness target: the ceiling of a line's true peak (a limiter holds it)."""
    volume: float = 1.0
    """A plain gain on every line (after the loudness target), e.g. 0.5 = -6 dB."""
    timestamps: bool = False
    """Beside each line's file a JSON of its sentences, words and phonemes (start and end
    in seconds), from the durations the voice gave them."""
    join: str = "none"
    """none, or file: also one audio file per input, its lines in order (outbox/<stem>.<fmt>)."""
    join_format: str = ""
    """The joined file's format: "" = the lines' format, or wav, flac, mp3, ogg, opus, m4b."""
    join_pause_s: float = 0.5
    """Silence between two lines in the joined file."""
    chapters: str = "line"
    """Chapter marks in a joined mp3/opus/m4b: line (one per line), column (one where
    a CSV's `chapter` column starts a new one), none."""
    manifest: bool = True
    """Write outbox/<stem>/manifest.csv when a file is finished."""

    @property
    def pcm16(self) -> bool:
        """Lines are 16-bit WAV at the voice's own rate and levels: the engine's int16
        samples are written as they are."""
        return (self.format == "wav" and self.subtype == "PCM_16" and not self.sample_rate
                and not self.loudness_lufs and self.volume == 1.0)


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
    memory pools stay (about one audio call's activations): they are the warm state,
    like the weights."""
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


@dataclass(frozen=True)
class ClusterConfig:
    backend: str = "local"
    """local: the model inside the daemon on one device, worker processes on this host
    for several (engine.devices); processes: worker processes even for one device (a
    crash in the model's native code then costs a worker, not the daemon); ray: Ray
    actors."""
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
        from ttsd.config.load import find_and_read

        return find_and_read(path)

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
        lexicon = self.input.lexicon
        inputs = dataclasses.replace(self.input, lexicon=str(fix(Path(lexicon))) if lexicon
                                     else "")
        return dataclasses.replace(self, paths=paths, engine=engine, input=inputs)

    def to_dict(self) -> dict[str, Any]:
        """The settings as parsed TOML would hold them (``source`` left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            section = getattr(self, f.name)
            out[f.name] = {k.name: _plain(getattr(section, k.name))
                           for k in dataclasses.fields(section)}
        return out


def _plain(v: Any) -> Any:
    """A value as TOML holds it: paths as strings, tuples as lists."""
    return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v


SECTIONS: dict[str, type] = {
    "paths": PathsConfig, "input": InputConfig, "engine": EngineConfig,
    "batching": BatchingConfig, "output": OutputConfig, "cache": CacheConfig,
    "memory": MemoryConfig, "daemon": DaemonConfig, "cluster": ClusterConfig,
}
"""The [tables] of config.toml and the record each one fills."""
