"""The cache key: what decides a line's WAV bytes, hashed the same way by every path.

A changed derivation would silently orphan every cached WAV (or, worse, answer a line
with another's audio), so the formula is spelled out here independently of the code:
SHA-256 of the fields joined by U+001F, the text last and in NFC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import unicodedata
from pathlib import Path

from ttsd import cache
from ttsd.config import from_dict
from ttsd.engine.options import ENGINE_VERSION, auto_dtype
from ttsd.errors import VoiceError
from ttsd.ingest import files as ingest
from ttsd.ingest.files import Ingest
from ttsd.jobs import Job, VoiceFacts
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


def cache_key(text: str, voice: VoiceFacts, sid: int, length_scale: float, noise_scale: float,
              noise_w: float, seed: int, fmt: str) -> str:
    return cache.cache_key(text, Job(voice, sid, length_scale, noise_scale, noise_w, seed), fmt)


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
        assert ing._cache_key("Same line.", Job(VOICE, 0, 1.0, ns, nw, 7)) == \
            cache_key("Same line.", VOICE, 0, 1.0, ns, nw, 7, "wav/PCM_16"), (ns, nw)


# Config keys that do not change a line's audio bytes. A key added to the config must
# be added here or to cache.AUDIO_KEYS (and then to the cache key): the test below
# fails until it is.
NOT_AUDIO = {
    "paths.inbox", "paths.outbox", "paths.done", "paths.failed", "paths.state",
    "paths.voice_cache", "input.settle_s", "input.rescan_s", "input.polling", "input.max_file_bytes",
    "input.max_lines", "input.max_line_chars", "input.max_pending_lines",
    "engine.voices_dir", "engine.max_audio_s_per_char", "engine.memory_fraction",
    "engine.warmup", "engine.phonemizer_processes",
    "batching.max_batch_size", "batching.lines_per_batch", "batching.max_wait_ms",
    "batching.max_phonemes", "batching.prefetch", "batching.writer_threads",
    "batching.idle_batch",
    "output.manifest", "output.join", "output.join_format", "output.join_pause_s",
    "output.chapters", "cache.enabled", "cache.link",
    "memory.free_memory_every_s", "memory.idle_s",
    "daemon.log_level", "daemon.heartbeat_s", "daemon.max_attempts", "daemon.stop_timeout_s",
    "daemon.once_blocked_s",
    "cluster.backend", "cluster.address", "cluster.workers", "cluster.cpus_per_worker",
    "cluster.queue_ahead", "cluster.batch_timeout_s", "cluster.start_timeout_s",
    "cluster.restart_backoff_s", "cluster.restart_backoff_max_s", "cluster.max_failures",
    "cluster.failure_window_s",
}

CHANGED = {   # for each key of cache.AUDIO_KEYS: (value, other value)
    "engine.voice": ("joe", "amy"), "engine.speaker": ("alice", "bob"),
    "engine.speed": (1.0, 1.25), "engine.noise_scale": (-1.0, 0.3),
    "engine.noise_w": (-1.0, 0.3), "engine.seed": (0, 1),
    "engine.sentence_silence_s": (0.2, 0.5), "engine.dtype": ("float32", "float16"),
    "engine.compile": ("off", "on"), "output.subtype": ("PCM_16", "PCM_24"),
    "output.format": ("wav", "flac"), "output.bitrate_kbps": (0, 96),
    "output.sample_rate": (0, 16000), "output.loudness_lufs": (0.0, -16.0),
    "output.true_peak_dbtp": (-1.0, -2.0), "output.volume": (1.0, 0.5),
    "output.timestamps": (False, True), "input.markup": ("none", "ssml"),
    "input.markup_unknown": ("fail", "read"), "input.paragraph_pause_s": (0.6, 1.0),
    "input.lexicon": ("", "words.tsv"),   # the file is written in tmp_path by _key
}
WITH = {"output.true_peak_dbtp": {"output.loudness_lufs": -16.0},
        "output.bitrate_kbps": {"output.format": "mp3"},
        "input.markup_unknown": {"input.markup": "ssml"},
        "input.paragraph_pause_s": {"input.markup": "ssml"}}
"""Keys that act only beside another setting: the ceiling on a loudness target, a
bitrate on a format that has one, how SSML is read on lines that are SSML."""
BY_DEVICE = ("engine.device", "engine.devices")
"""Keys that act through the kind of device they resolve to (the ``gpu`` argument)."""
ON_GPU = {"engine.fused": ("off", "on")}
"""Keys that change the audio on a GPU only (elsewhere the setting does nothing)."""


def _config_keys() -> set[str]:
    from ttsd.config import SECTIONS
    return {f"{name}.{f.name}" for name, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)}


def test_every_config_key_is_known_to_change_the_audio_or_not() -> None:
    keys = _config_keys()
    audio = set(cache.AUDIO_KEYS)
    assert not audio & NOT_AUDIO, audio & NOT_AUDIO
    assert keys == audio | NOT_AUDIO, (sorted(keys - audio - NOT_AUDIO),
                                       sorted((audio | NOT_AUDIO) - keys))


def _key(tmp_path: Path, values: dict[str, object], gpu: bool) -> str:
    raw: dict[str, dict] = {"paths": {k: str(tmp_path / k) for k in
                                      ("inbox", "outbox", "done", "failed", "state")},
                            "engine": {"voice": "joe"}}
    for key, value in values.items():
        if value == "words.tsv":
            (tmp_path / "words.tsv").write_text("sentence\tsentense\n", encoding="utf-8")
            value = str(tmp_path / "words.tsv")
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    cfg = from_dict(raw)
    ing = Ingest(cfg, {"joe": VOICE, "amy": OTHER}, threading.Event(),
                 fmt=cache.audio_format(cfg, gpu))
    got = ing._new_line(Line(1, "One sentence. And another one."), 4, {})
    assert got.error is None, got.error
    return got.cache_key


def test_every_setting_that_changes_the_audio_changes_the_cache_key(tmp_path: Path) -> None:
    assert set(CHANGED) | set(BY_DEVICE) | set(ON_GPU) == set(cache.AUDIO_KEYS)
    for key, (a, b) in ON_GPU.items():
        assert _key(tmp_path, {key: a}, True) != _key(tmp_path, {key: b}, True), key
        assert _key(tmp_path, {key: a}, False) == _key(tmp_path, {key: b}, False), key
    for key, (a, b) in CHANGED.items():
        for gpu in (False, True):
            ctx = WITH.get(key, {})
            assert _key(tmp_path, {**ctx, key: a}, gpu) != _key(tmp_path, {**ctx, key: b}, gpu), \
                (key, gpu)
    assert _key(tmp_path, {}, False) != _key(tmp_path, {}, True)
    # "auto" is the dtype it resolves to on that device, not a setting of its own.
    # On a CPU: bfloat16 where it has bfloat16 arithmetic of its own, else float32.
    assert _key(tmp_path, {"engine.dtype": "auto"}, False) == \
        _key(tmp_path, {"engine.dtype": auto_dtype(False)}, False)
    assert _key(tmp_path, {"engine.dtype": "bfloat16"}, False) != \
        _key(tmp_path, {"engine.dtype": "float32"}, False)
    assert _key(tmp_path, {"engine.dtype": "auto"}, True) == \
        _key(tmp_path, {"engine.dtype": "bfloat16"}, True)


def test_a_changed_sentence_silence_is_not_answered_from_the_cache(tmp_path: Path) -> None:
    """The real daemon: after engine.sentence_silence_s changes, the same line is
    synthesized again with the new silence instead of coming back from the cache."""
    import soundfile as sf
    from harness import Site, assert_invariant

    text = "The first sentence is here. The second one follows it.\n"
    seconds = []
    for silence in (0.2, 1.0):
        site = Site(tmp_path, extra_config=f"[engine]\nsentence_silence_s = {silence}\n")
        site.write_config()
        site.inbox.mkdir(parents=True, exist_ok=True)
        (site.inbox / "two.txt").write_text(text, encoding="utf-8")
        out = site.cli("run", "--once", timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        wav, cached = site.query("SELECT wav, cached FROM lines ORDER BY id DESC LIMIT 1")[0]
        assert cached == 0, "answered from the cache with the old silence"
        seconds.append(sf.info(wav).duration)
        assert_invariant(site)
    assert seconds[1] - seconds[0] > 0.6, seconds
