"""Finding and reading the config file: which file is used (``--config``, else
``$TTSD_CONFIG``, else ./config.toml, else the built-in defaults), its TOML turned into
the records of ``ttsd.config.schema`` with each value's type checked, and the
documented default file that ``ttsd init`` writes.

Unknown keys are refused with the key named; keys that were settings once and are
fixed now (``RETIRED``) are ignored with a warning, so an older file still loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tomllib
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from ttsd.config.checks import validate
from ttsd.config.schema import SECTIONS, Config
from ttsd.errors import ConfigError

RETIRED: dict[str, object] = {
    "engine.cudnn_benchmark": False,
    "engine.compile_text": "auto",
    "engine.pack_calls": True,
    "engine.warmup_frames": 2048,
    "engine.row_step": 16,
    "engine.cuda_graphs": "auto",
    "engine.audio_graphs": "auto",
    "engine.overlap_halves": "auto",
    "batching.stream_writes": True,
    "daemon.gil_switch_ms": 1.0,
}
"""Keys that are no longer settings, and the value the daemon now always uses."""

_warned: set[str] = set()
"""The retired keys already warned about in this process (a reload says nothing new)."""


def find_and_read(path: Path | str | None = None) -> Config:
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
        sections[name] = _section(cls, name, table, where)
    cfg = Config(**sections)
    validate(cfg, where)
    return cfg


def _section(cls: type, name: str, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if f"{name}.{key}" in RETIRED:
            _warn_retired(f"{name}.{key}", where)
        elif key not in known:
            raise ConfigError(f"{where}: {name}.{key}: unknown key "
                              f"(known: {', '.join(sorted(known))})")
        else:
            values[key] = _coerce(hints[key], value, f"{where}: {name}.{key}")
    return cls(**values)


def _warn_retired(key: str, where: str) -> None:
    """Say once per process that ``key`` is set but no longer read. Printed to stderr
    as the CLI prints its errors: the config is read before the log is set up."""
    if key in _warned:
        return
    _warned.add(key)
    fixed = RETIRED[key]
    shown = str(fixed).lower() if isinstance(fixed, bool) else (
        f'"{fixed}"' if isinstance(fixed, str) else fixed)
    print(f"ttsd: warning: {where}: {key} is no longer a setting (always {shown} now); "
          "it is ignored: remove it from the file", file=sys.stderr, flush=True)


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


def dump(cfg: Config) -> str:
    """The config as TOML text (tomli-w), without comments."""
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())


def default_text() -> str:
    """The documented config file (every key, its default and one line of meaning), as
    shipped in the package; ``ttsd init`` writes it and the repository's config.toml is
    a copy."""
    return resources.files("ttsd.config").joinpath("default.toml").read_text(encoding="utf-8")
