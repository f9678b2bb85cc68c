"""The config's checks: each key's allowed values, and the five folders of [paths] that
must be distinct. Every refusal is a ConfigError that names the key (and the file).

Types are checked as the file is read (``ttsd.config.load``); these are the ranges.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttsd.errors import ConfigError

if TYPE_CHECKING:
    from ttsd.config.schema import Config, PathsConfig

DTYPES = ("auto", "float32", "float16", "bfloat16")
FORMATS = ("wav", "flac", "mp3", "ogg", "opus")
"""The formats of a line's file (``output.format``)."""
JOIN_FORMATS = (*FORMATS, "m4b")
"""The formats of an input joined into one file: the line formats, and M4B (AAC in MP4,
the audiobook container) with its chapters."""
SUBTYPES = {"wav": ("PCM_16", "PCM_24", "PCM_32", "FLOAT", "ULAW", "ALAW"),
            "flac": ("PCM_16", "PCM_24")}
"""The sample formats each format takes (``output.subtype``); the others have none."""


def subtype_for(fmt: str, subtype: str) -> str:
    """``subtype`` where ``fmt`` takes it, else that format's first (PCM_16), or "" for a
    format that has none."""
    takes = SUBTYPES.get(fmt, ())
    return subtype if subtype in takes else takes[0] if takes else ""


RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""The rates ``output.sample_rate`` takes (0: the voice's own)."""
LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("local", "processes", "ray")
SWITCH = ("auto", "on", "off")


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"must be one of {', '.join(choices)}"


def _cuda(dev: str) -> bool:
    return dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())


def _address(a: str) -> bool:
    return a in ("auto", "local") or a.startswith("ray://") or ":" in a


_AT_LEAST_0 = (lambda v: v >= 0), "must be >= 0"
_AUTO_0 = (lambda v: v >= 0), "must be >= 0 (0 = auto)"
_ABOVE_0 = (lambda v: v > 0), "must be > 0"
_AT_LEAST_1 = (lambda v: v >= 1), "must be >= 1"

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "input.settle_s": _AT_LEAST_0,
    "input.rescan_s": _ABOVE_0,
    "input.max_file_bytes": _ABOVE_0,
    "input.max_lines": _ABOVE_0,
    "input.max_line_chars": _ABOVE_0,
    "input.max_pending_lines": _ABOVE_0,
    "input.markup": _one_of(("none", "ssml")),
    "input.markup_unknown": _one_of(("fail", "read")),
    "input.paragraph_pause_s": ((lambda v: 0 <= v <= 10), "must be between 0 and 10"),
    "engine.voice": ((lambda v: v != ""), "must name a voice (see `ttsd voices`)"),
    "engine.device": ((lambda v: v in ("auto", "cpu") or v.startswith("cuda")),
                      "must be auto, cpu, cuda or cuda:N"),
    "engine.dtype": _one_of(DTYPES),
    "engine.speed": ((lambda v: 0.1 <= v <= 10), "must be between 0.1 and 10"),
    "engine.noise_scale": ((lambda v: v <= 10), "must be <= 10 (negative = the voice's own)"),
    "engine.noise_w": ((lambda v: v <= 10), "must be <= 10 (negative = the voice's own)"),
    "engine.sentence_silence_s": ((lambda v: 0 <= v <= 10), "must be between 0 and 10"),
    "engine.max_audio_s_per_char": _ABOVE_0,
    "engine.memory_fraction": ((lambda v: 0 < v <= 1), "must be in (0, 1]"),
    "engine.phonemizer_processes": ((lambda v: 0 <= v <= 64),
                                    "must be between 0 (auto) and 64"),
    "engine.compile": ((lambda v: v in (*SWITCH, "ahead")), "must be auto, on, off or ahead"),
    "engine.fused": ((lambda v: v in ("on", "off")), "must be on or off"),
    "batching.max_batch_size": _AUTO_0,
    "batching.lines_per_batch": _AUTO_0,
    "batching.max_wait_ms": _AT_LEAST_0,
    "batching.max_phonemes": _ABOVE_0,
    "batching.prefetch": _AT_LEAST_1,
    "batching.idle_batch": ((lambda v: 0 < v <= 1), "must be > 0 and <= 1"),
    "batching.writer_threads": _AUTO_0,
    "output.format": _one_of(FORMATS),
    "output.bitrate_kbps": ((lambda v: v == 0 or 6 <= v <= 320),
                            "must be 0 (the format's default) or 6 to 320"),
    "output.sample_rate": ((lambda v: v == 0 or v in RATES),
                           f"must be 0 (the voice's own) or one of {', '.join(map(str, RATES))}"),
    "output.loudness_lufs": ((lambda v: v == 0 or -70 <= v <= -5),
                             "must be 0 (off) or between -70 and -5 LUFS"),
    "output.true_peak_dbtp": ((lambda v: -20 <= v <= 0), "must be between -20 and 0 dBTP"),
    "output.volume": ((lambda v: 0 < v <= 16), "must be > 0 and <= 16"),
    "output.join": _one_of(("none", "file")),
    "output.join_format": ((lambda v: v == "" or v in JOIN_FORMATS),
                           f"must be \"\" (the lines' format) or one of {', '.join(JOIN_FORMATS)}"),
    "output.join_pause_s": ((lambda v: 0 <= v <= 60), "must be between 0 and 60"),
    "output.chapters": _one_of(("line", "column", "none")),
    "memory.free_memory_every_s": ((lambda v: v >= 0), "must be >= 0 (0 = never)"),
    "memory.idle_s": _AT_LEAST_0,
    "daemon.log_level": _one_of(LEVELS),
    "daemon.heartbeat_s": _ABOVE_0,
    "daemon.max_attempts": _AT_LEAST_1,
    "daemon.stop_timeout_s": _AT_LEAST_0,
    "daemon.once_blocked_s": _ABOVE_0,
    "cluster.backend": _one_of(BACKENDS),
    "cluster.address": (_address, 'must be "auto", "local", "ray://HOST:PORT" or HOST:PORT'),
    "cluster.workers": ((lambda v: v >= 0), "must be >= 0 (0 = one per GPU)"),
    "cluster.cpus_per_worker": _AUTO_0,
    "cluster.queue_ahead": _AT_LEAST_0,
    "cluster.batch_timeout_s": _ABOVE_0,
    "cluster.start_timeout_s": _ABOVE_0,
    "cluster.restart_backoff_s": _AT_LEAST_0,
    "cluster.max_failures": _AT_LEAST_1,
    "cluster.failure_window_s": _ABOVE_0,
}
"""Each ranged key's test and what the refusal says. Keys not here take any value of
their type (switches, free text, the seed), or are checked below (``validate``)."""


def validate(cfg: Config, where: str = "config") -> None:
    """Reject impossible values, naming the key and the value given; the folders too
    once their paths are absolute (``check_folders``; relative ones are checked by
    ``Config.resolved``)."""
    def refuse(key: str, value: Any, msg: str) -> None:
        raise ConfigError(f"{where}: {key}: {msg}, got {value!r}")

    for key, (ok, msg) in RULES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            refuse(key, value, msg)
    for dev in cfg.engine.devices:
        if not (dev == "auto" and len(cfg.engine.devices) == 1 or dev == "cpu" or _cuda(dev)):
            refuse("engine.devices", list(cfg.engine.devices),
                   f"{dev!r}: each must be cpu, cuda or cuda:N (or the whole value \"auto\")")
    out = cfg.output
    if out.format in SUBTYPES and out.subtype not in SUBTYPES[out.format]:
        refuse("output.subtype", out.subtype,
               f"{out.format} takes {', '.join(SUBTYPES[out.format])}")
    if out.format == "opus" and out.sample_rate not in (0, 48000):
        refuse("output.sample_rate", out.sample_rate,
               "opus is decoded at 48000 Hz by every player: use 0 or 48000")
    c = cfg.cluster
    if c.restart_backoff_max_s < c.restart_backoff_s:
        refuse("cluster.restart_backoff_max_s", c.restart_backoff_max_s,
               f"must be >= cluster.restart_backoff_s ({c.restart_backoff_s})")
    if all(getattr(cfg.paths, k).is_absolute() for k in FOLDERS):
        check_folders(cfg.paths, where)


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
