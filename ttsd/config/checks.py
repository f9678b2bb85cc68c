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
SUBTYPES = ("PCM_16", "PCM_24", "PCM_32", "FLOAT")
LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("local", "ray")
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
    "engine.compile": ((lambda v: v in SWITCH), "must be auto, on or off"),
    "batching.max_batch_size": _AUTO_0,
    "batching.lines_per_batch": _AUTO_0,
    "batching.max_wait_ms": _AT_LEAST_0,
    "batching.max_phonemes": _ABOVE_0,
    "batching.prefetch": _AT_LEAST_1,
    "batching.idle_batch": ((lambda v: 0 < v <= 1), "must be > 0 and <= 1"),
    "batching.writer_threads": _AUTO_0,
    "output.subtype": _one_of(SUBTYPES),
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
