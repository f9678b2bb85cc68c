"""A line plus the config → a job: the voice, speaker, speed, noise and seed it is said
with. The one place that resolves them, for every input: the daemon's ingest, ``ttsd
say`` and ``ttsd bench``. A line's own fields (CSV ``voice``, ``speaker``, ``speed``)
come first, then the config's ``[engine]`` values, then the voice's own defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ttsd.engine.records import Request
from ttsd.errors import VoiceError
from ttsd.log import get_logger

if TYPE_CHECKING:
    from ttsd.config import EngineConfig
    from ttsd.engine.runtime import Engine

log = get_logger(__name__)


@dataclass(frozen=True)
class VoiceFacts:
    """What resolving a line needs to know of a voice (no model, no torch)."""

    name: str
    digest: str
    sample_rate: int
    speaker_id: Callable[[str | None], int]
    """The voice's own resolver (VoiceInfo.speaker_id): name or id → id, VoiceError if
    unknown; empty → the voice's default speaker."""
    noise_scale: float
    noise_w: float
    length_scale: float


@dataclass(frozen=True)
class Job:
    """How one text is said: everything the model takes besides the text."""

    voice: VoiceFacts
    speaker_id: int
    length_scale: float
    noise_scale: float
    noise_w: float
    seed: int

    def request(self, key: int, text: str) -> Request:
        return Request(key, text, self.voice.name, self.speaker_id, self.length_scale,
                       self.noise_scale, self.noise_w, self.seed)


class JobError(VoiceError):
    """A line that names a voice or speaker that does not exist: the line fails alone."""


def resolve(e: EngineConfig, voices: Mapping[str, VoiceFacts], *, voice: str | None = None,
            speaker: str | None = None, speed: float | None = None) -> Job:
    """The job of a line with these own fields (None: not given) under the config's
    ``[engine]`` section ``e``. Raises JobError naming an unknown voice or speaker."""
    vname = voice or e.voice
    facts = voices.get(vname)
    if facts is None:
        known = ", ".join(sorted(voices)) or "none"
        raise JobError(f"unknown voice {vname!r} (known: {known})")
    try:
        sid = facts.speaker_id(speaker if speaker is not None else (e.speaker or None))
    except VoiceError as exc:
        raise JobError(str(exc)) from None
    return Job(facts, sid, facts.length_scale / (speed if speed is not None else e.speed),
               e.noise_scale if e.noise_scale >= 0 else facts.noise_scale,
               e.noise_w if e.noise_w >= 0 else facts.noise_w, e.seed)


def voice_facts(engine: Engine, name: str) -> VoiceFacts:
    """The facts of the voice ``name``, loading it on ``engine`` if it is not yet (on a
    thread of its own: ``off_this_thread``)."""
    from ttsd.engine.device import off_this_thread

    lv = off_this_thread(engine.device, lambda: engine.voice(name))
    info, inf = lv.info, lv.info.inference
    return VoiceFacts(name, lv.digest, info.sample_rate, info.speaker_id, inf["noise_scale"],
                      inf["noise_w"], inf["length_scale"])


class LazyVoices(dict):
    """Voice facts by name, loading a voice the first time a line asks for it."""

    def __init__(self, engine: Engine, loaded: dict[str, VoiceFacts]) -> None:
        super().__init__(loaded)
        self.engine = engine

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if name in self:
            return self[name]
        if name not in self.engine.voices:
            return default
        try:
            self[name] = voice_facts(self.engine, name)
        except Exception as exc:  # noqa: BLE001 - an unusable voice fails its lines alone
            log.error("voice.unusable", voice=name, error=str(exc))
            return default
        return self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.engine.voices)
