"""Ingest's cache key: the memoized hash head must give exactly the keys of the plain
formula (keys name the cache's files: a changed key is a cache miss for every line)."""

from __future__ import annotations

import hashlib
import unicodedata

from ttsd.engine.runtime import ENGINE_VERSION
from ttsd.ingest import VoiceFacts, cache_key


def _plain(text, voice, speaker_id, length_scale, noise_scale, noise_w, seed, fmt) -> str:
    parts = [ENGINE_VERSION, voice.name, voice.digest, str(voice.sample_rate), str(speaker_id),
             repr(round(length_scale, 6)), repr(round(noise_scale, 6)),
             repr(round(noise_w, 6)), str(seed), fmt, unicodedata.normalize("NFC", text)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def test_cache_key_matches_the_plain_formula_for_twins_that_compare_equal() -> None:
    """1 and 1.0, 0.0 and -0.0 compare (and hash) equal but print differently, so they
    must not share a memoized head; NFC applies to the text only."""
    voice = VoiceFacts("v", "d" * 64, 22050, lambda s: 0, 0.667, 0.8, 1.0)
    other = VoiceFacts("w", "e" * 64, 16000, lambda s: 0, 0.667, 0.8, 1.0)
    cases = [("café", voice, 0, 1 / 1.2, 0.667, 0.8, 0, "wav/PCM_16"),
             ("cafe\u0301", voice, 0, 1 / 1.2, 0.667, 0.8, 0, "wav/PCM_16"),
             ("a\x1fb", other, 3, 1.0000004, 0.5, 0.1, 7, "wav/FLOAT")]
    for zero in (0.0, -0.0, 0):
        for one in (1.0, 1):
            cases.append(("Hello.", voice, 0, one, zero, 0.8, 0, "wav/PCM_16"))
    keys = set()
    for case in cases + cases[::-1]:   # both orders: a head memoized first is not reused
        assert cache_key(*case) == _plain(*case), case
        keys.add(cache_key(*case))
    assert cache_key(*cases[0]) == cache_key(*cases[1])            # NFC
    assert len(keys) == len(cases) - 1
