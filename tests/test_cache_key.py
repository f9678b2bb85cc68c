"""The cache key: what decides a line's WAV bytes, hashed the same way by every path.

A changed derivation would silently orphan every cached WAV (or, worse, answer a line
with another's audio), so the formula is spelled out here independently of the code:
SHA-256 of the fields joined by U+001F, the text last and in NFC.
"""

from __future__ import annotations

import hashlib
import threading
import unicodedata
from pathlib import Path

from ttsd import ingest
from ttsd.config import from_dict
from ttsd.engine.runtime import ENGINE_VERSION
from ttsd.errors import VoiceError
from ttsd.ingest import Ingest, VoiceFacts, cache_key
from ttsd.records import Line


def _speaker(name: str | None) -> int:
    table = {None: 0, "": 0, "alice": 0, "bob": 1, "0": 0, "1": 1}
    if name not in table:
        raise VoiceError(f"no speaker {name!r}")
    return table[name]


VOICE = VoiceFacts("joe", "d" * 64, 22050, _speaker, 0.667, 0.8, 1.0)
OTHER = VoiceFacts("amy", "e" * 64, 16000, _speaker, 0.5, 0.7, 1.1)


def _formula(text: str, voice: VoiceFacts, sid: int, length_scale: float, noise_scale: float,
             noise_w: float, seed: int, fmt: str) -> str:
    fields = [ENGINE_VERSION, voice.name, voice.digest, str(voice.sample_rate), str(sid),
              repr(round(length_scale, 6)), repr(round(noise_scale, 6)),
              repr(round(noise_w, 6)), str(seed), fmt, unicodedata.normalize("NFC", text)]
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()


def test_cache_key_is_the_documented_formula() -> None:
    for text in ("Hello there.", "Caf\u0065\u0301 au lait.", "日本語のテキスト。", "x" * 5000):
        for args in ((VOICE, 0, 1.0, 0.667, 0.8, 0), (OTHER, 1, 1 / 1.3, 0.5, 0.7, 42)):
            assert cache_key(text, *args, "wav/PCM_16") == _formula(text, *args, "wav/PCM_16")
    # NFC: a decomposed and a composed "é" are one line; the output format is part of it.
    assert cache_key("Caf\u0065\u0301", VOICE, 0, 1, 0.667, 0.8, 0, "wav/PCM_16") == \
        cache_key("Caf\u00e9", VOICE, 0, 1, 0.667, 0.8, 0, "wav/PCM_16")
    assert cache_key("a", VOICE, 0, 1, 0.667, 0.8, 0, "wav/PCM_16") != \
        cache_key("a", VOICE, 0, 1, 0.667, 0.8, 0, "wav/FLOAT")


def test_ingest_keys_match_cache_key_for_every_voice_speaker_and_speed(tmp_path: Path) -> None:
    """Ingest hashes each key prefix once and copies it per line: the keys it gives
    lines of mixed voices, speakers and speeds (more speeds than it keeps prefixes
    for) are cache_key's, before and after its table of prefixes is cleared."""
    cfg = from_dict({"paths": {k: str(tmp_path / k) for k in
                               ("inbox", "outbox", "done", "failed", "state")},
                     "engine": {"seed": 7, "voice": "joe"}})
    ing = Ingest(cfg, {"joe": VOICE, "amy": OTHER}, threading.Event(), fmt="wav/PCM_16")
    e = cfg.engine
    speeds = [0.5 + k / 100 for k in range(ingest.KEY_PREFIXES + 40)]
    n = 0
    for rounds in range(2):
        for k, speed in enumerate(speeds):
            for voice, speaker in ((VOICE, None), (OTHER, "bob"), (VOICE, "1")):
                n += 1
                text = f"Line {k} of round {rounds}: caf\u0065\u0301."
                got = ing._new_line(Line(n, text, id=f"id{n}", voice=voice.name,
                                         speaker=speaker, speed=speed), 4, {})
                assert got.error is None, got.error
                sid = _speaker(speaker)
                assert got.speaker_id == sid
                assert got.cache_key == _formula(text, voice, sid, voice.length_scale / speed,
                                                 voice.noise_scale, voice.noise_w, e.seed,
                                                 "wav/PCM_16")
        assert len(ing._prefixes) <= ingest.KEY_PREFIXES
    # The configured speed and the voice's own scales, as a plain .txt line gets them.
    plain = ing._new_line(Line(n + 1, "Plain line."), 4, {})
    assert plain.cache_key == _formula("Plain line.", VOICE, 0, VOICE.length_scale / e.speed,
                                       VOICE.noise_scale, VOICE.noise_w, 7, "wav/PCM_16")
    # Equal numbers that print differently hash differently (cache_key's text), so the
    # prefixes Ingest keeps must not be shared between them.
    for ns, nw in ((0.0, 0.8), (-0.0, 0.8), (0, 0.8), (1, 1), (1.0, 1.0), (True, 1.0)):
        assert ing._cache_key("Same line.", VOICE, 0, 1.0, ns, nw) == \
            cache_key("Same line.", VOICE, 0, 1.0, ns, nw, 7, "wav/PCM_16"), (ns, nw)
