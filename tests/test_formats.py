"""Audio as production pipelines take it: every format decoded back and compared with the
WAV of the same audio, rates, loudness against the reference meter, and the daemon and
`ttsd say` writing them."""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from harness import ROOT, TONE, run_once

from ttsd.config import from_dict
from ttsd.errors import ConfigError
from ttsd.output.levels import loudness, true_peak
from ttsd.output.render import LineAudio

SR = 22050


def speech_like(seconds: float, level: float = 1.0, seed: int = 0) -> np.ndarray:
    """Syllables: a voiced buzz with formant-ish partials and noise under a 4 Hz
    envelope with gaps, peak-normalized to ``level`` (as the engine gives a sentence)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) + 0.2 * rng.standard_normal(t.size)
    x = env * x
    return (x / np.abs(x).max() * level).astype(np.float32)


def decode(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """A file's samples and rate as a player gets them: FFmpeg (PyAV) for MP3 and Opus,
    which honours the encoder's delay, libsndfile for the rest."""
    if name in ("mp3", "opus"):
        with av.open(io.BytesIO(data)) as c:
            frames = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
            rate = c.streams.audio[0].rate
        return np.concatenate(frames).astype(np.float32), rate
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def best_correlation(a: np.ndarray, b: np.ndarray, lag: int = 2048) -> float:
    """The correlation of ``a`` and ``b`` at the best shift within ``lag`` samples."""
    best = -1.0
    n = min(len(a), len(b)) - lag
    for shift in range(-lag, lag + 1, 1):
        x = a[max(0, shift):max(0, shift) + n]
        y = b[max(0, -shift):max(0, -shift) + n]
        if len(x) == len(y) == n:
            best = max(best, float(np.corrcoef(x, y)[0, 1]))
        if best > 0.9999:
            break
    return best


# (format, subtype, rate asked, rate expected, correlation bound, length slack in samples)
CASES = [
    ("wav", "PCM_16", 0, SR, 0.9999, 0),
    ("wav", "PCM_24", 0, SR, 0.9999, 0),
    ("wav", "PCM_32", 16000, 16000, 0.9999, 0),
    ("wav", "FLOAT", 44100, 44100, 0.9999, 0),
    ("wav", "ULAW", 8000, 8000, 0.999, 0),
    ("wav", "ALAW", 8000, 8000, 0.999, 0),
    ("flac", "PCM_16", 0, SR, 0.9999, 0),
    ("flac", "PCM_24", 48000, 48000, 0.9999, 0),
    ("mp3", "", 0, SR, 0.98, 1152),
    ("mp3", "", 44100, 44100, 0.98, 1152),
    ("ogg", "", 0, SR, 0.98, 0),
    ("opus", "", 0, 48000, 0.95, 0),
]


@pytest.mark.parametrize(("fmt", "subtype", "asked", "rate", "bound", "slack"), CASES,
                         ids=[f"{c[0]}-{c[1] or 'default'}-{c[2]}" for c in CASES])
def test_every_format_decodes_back_to_the_audio_at_its_rate_and_length(
        fmt: str, subtype: str, asked: int, rate: int, bound: float, slack: int) -> None:
    cfg = from_dict({"output": {"format": fmt, "subtype": subtype or "PCM_16",
                                "sample_rate": asked}})
    audio = LineAudio.of(cfg.output)
    x = speech_like(2.3)
    parts, rendered = audio.encode(x, SR)
    data = b"".join(bytes(p) for p in parts)
    assert rendered.sample_rate == rate
    got, got_rate = decode(data, fmt)
    assert got_rate == rate
    want = len(rendered.samples)
    assert want == round(len(x) * rate / SR)
    assert abs(len(got) - want) <= slack, (len(got), want)
    assert best_correlation(got, rendered.samples) >= bound


def test_a_truncated_or_damaged_file_of_each_format_is_not_taken_for_a_line(
        tmp_path: Path) -> None:
    for fmt in ("wav", "flac", "mp3", "ogg", "opus"):
        audio = LineAudio.of(from_dict({"output": {"format": fmt}}).output)
        parts, rendered = audio.encode(speech_like(1.5), SR)
        data = b"".join(bytes(p) for p in parts)
        whole = tmp_path / f"whole.{fmt}"
        whole.write_bytes(data)
        assert audio.file_ok(whole, sample_rate=rendered.sample_rate, size=len(data))
        cut = tmp_path / f"cut.{fmt}"
        cut.write_bytes(data[:len(data) // 2])
        assert not audio.file_ok(cut, sample_rate=rendered.sample_rate, size=len(data)), fmt
        garbage = tmp_path / f"garbage.{fmt}"
        garbage.write_bytes(os.urandom(len(data)))
        assert not audio.file_ok(garbage, sample_rate=rendered.sample_rate), fmt
        assert not audio.file_ok(whole, sample_rate=rendered.sample_rate + 1), fmt


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_loudness_matches_the_reference_meter(rate: int) -> None:
    """pyloudnorm with the BS.1770 filters (its "DeMan" class) within 0.01 LU; its
    default filter class (a cookbook approximation) within 0.3 LU."""
    for seconds in (0.45, 1.3, 7.7):
        x = speech_like(seconds, 0.5, seed=rate)
        if rate != SR:
            from ttsd.output.levels import resample
            x = resample(x, SR, rate)
        exact = pyloudnorm.Meter(rate, filter_class="DeMan").integrated_loudness(
            x.astype(np.float64))
        approx = pyloudnorm.Meter(rate).integrated_loudness(x.astype(np.float64))
        assert abs(loudness(x, rate) - exact) < 0.01
        assert abs(loudness(x, rate) - approx) < 0.3


@pytest.mark.parametrize(("target", "ceiling", "rate"), [(-16.0, -1.0, 0), (-23.0, -2.0, 0),
                                                          (-16.0, -1.0, 48000)])
def test_lines_of_any_length_and_level_land_on_the_target_under_the_ceiling(
        target: float, ceiling: float, rate: int) -> None:
    cfg = from_dict({"output": {"format": "wav", "subtype": "FLOAT", "sample_rate": rate,
                                "loudness_lufs": target, "true_peak_dbtp": ceiling}})
    audio = LineAudio.of(cfg.output)
    levels = []
    for seconds, level in ((0.3, 1.0), (1.5, 0.2), (6.0, 1.0), (20.0, 0.7)):
        _parts, r = audio.encode(speech_like(seconds, level, seed=int(seconds * 10)), SR)
        measured = pyloudnorm.Meter(r.sample_rate).integrated_loudness(
            r.samples.astype(np.float64)) if seconds >= 0.4 else r.lufs
        assert abs(measured - target) < 0.5, (seconds, measured)
        peak = 20 * math.log10(true_peak(r.samples, r.sample_rate).max())
        assert peak <= ceiling + 0.1, (seconds, peak)
        levels.append(measured)
    assert max(levels) - min(levels) < 0.5


def test_volume_is_a_plain_gain() -> None:
    x = speech_like(2.0, 0.5)
    half = LineAudio.of(from_dict({"output": {"subtype": "FLOAT", "volume": 0.5}}).output)
    _parts, r = half.encode(x, SR)
    assert np.allclose(r.samples, x * 0.5, atol=1e-7)


@pytest.mark.parametrize(("section", "why"), [
    ({"format": "opus", "sample_rate": 22050}, "48000"),
    ({"format": "flac", "subtype": "PCM_32"}, "flac takes"),
    ({"format": "aac"}, "output.format"),
    ({"sample_rate": 12345}, "output.sample_rate"),
    ({"loudness_lufs": 3.0}, "output.loudness_lufs"),
    ({"join": "book"}, "output.join"),
])
def test_output_settings_that_cannot_work_are_refused_naming_the_key(
        section: dict, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        from_dict({"output": section})


def test_the_daemon_writes_mp3_at_the_rate_and_loudness_asked(tmp_path: Path) -> None:
    """The real daemon: every line an MP3 at 16 kHz and -20 LUFS, the manifest naming
    each, and the cache answering a second drop with the same MP3s."""
    texts = ["A short one.", ("This line is quite a lot longer than the one before it, "
                              "and it keeps going for a while."), "Third line here."]
    conf = ("[output]\nformat = \"mp3\"\nsample_rate = 16000\nloudness_lufs = -20.0\n"
            "bitrate_kbps = 48\n")
    site = run_once(tmp_path / "site", texts, conf)
    out = site.outbox / "lines"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0001.mp3", "0002.mp3", "0003.mp3", "manifest.csv"]
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["wav"] for r in rows] == ["0001.mp3", "0002.mp3", "0003.mp3"]
    assert {r["format"] for r in rows} == {"mp3"} and {r["sample_rate"] for r in rows} == {"16000"}
    assert all(abs(float(r["lufs"]) - -20.0) < 0.2 for r in rows), rows
    for name in files[:3]:
        samples, rate = decode((out / name).read_bytes(), "mp3")
        assert rate == 16000
        if len(samples) >= 0.4 * rate:
            lufs = pyloudnorm.Meter(rate).integrated_loudness(samples.astype(np.float64))
            assert abs(lufs - -20.0) < 0.5, (name, lufs)
    first = {p.name: p.read_bytes() for p in out.glob("*.mp3")}
    (site.inbox / "again.txt").write_text("\n".join(texts) + "\n")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 0, site.logs()
    again = {p.name: p.read_bytes() for p in (site.outbox / "again").glob("*.mp3")}
    assert again == first
    assert site.query("SELECT COUNT(*) FROM lines WHERE cached = 1")[0][0] == 3
    with open(site.outbox / "again" / "manifest.csv", newline="", encoding="utf-8") as f:
        cached_rows = list(csv.DictReader(f))
    assert [(r["cached"], r["sample_rate"], r["lufs"]) for r in cached_rows] == \
        [("true", r["sample_rate"], r["lufs"]) for r in rows]


def test_a_damaged_cached_mp3_is_a_miss_not_served(tmp_path: Path) -> None:
    texts = ["Cached once.", "Cached twice."]
    site = run_once(tmp_path / "site", texts, "[output]\nformat = \"mp3\"\n", env=TONE)
    cached = sorted((site.root / "state" / "cache").rglob("*.mp3"))
    assert len(cached) == 2
    data = cached[0].read_bytes()
    cached[0].write_bytes(data[:len(data) // 2])      # truncated in place
    (site.inbox / "again.txt").write_text("\n".join(texts) + "\n")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 0, site.logs()
    rows = site.query("SELECT l.number, l.cached FROM lines l JOIN files f ON f.id = l.file_id "
                      "WHERE f.name = 'again.txt' ORDER BY l.number")
    assert sorted(c for _n, c in rows) == [0, 1]
    for p in (site.outbox / "again").glob("*.mp3"):
        samples, _rate = decode(p.read_bytes(), "mp3")
        assert len(samples) > 0.3 * SR


def say(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TTSD_CONFIG": "", **TONE}
    return subprocess.run([sys.executable, "-m", "ttsd.cli", "say", *args, "--device", "cpu"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_say_picks_the_format_from_the_suffix(tmp_path: Path) -> None:
    for name, fmt, rate in (("a.flac", "flac", SR), ("b.mp3", "mp3", 24000),
                            ("c.opus", "opus", 48000), ("d.ogg", "ogg", SR)):
        args = ["--sample-rate", "24000"] if fmt == "mp3" else []
        out = say(tmp_path, "Hello there.", "-o", name, *args)
        assert out.returncode == 0, out.stderr
        samples, got = decode((tmp_path / name).read_bytes(), fmt)
        assert got == rate and len(samples) > 0.2 * rate
    refused = say(tmp_path, "Hello there.", "-o", "e.m4a")
    assert refused.returncode == 2 and ".m4a" in refused.stderr
    assert not (tmp_path / "e.m4a").exists()


def test_the_same_line_twice_in_one_batch_gets_the_same_file_twice(tmp_path: Path) -> None:
    """One result for both lines, encoded once: two identical Opus files, one cache
    entry."""
    texts = ["Say it twice.", "Say it twice.", "Once only."]
    site = run_once(tmp_path / "site", texts, '[output]\nformat = "opus"\n', env=TONE)
    out = site.outbox / "lines"
    first, second = (out / "0001.opus").read_bytes(), (out / "0002.opus").read_bytes()
    assert first == second and len(first) > 100
    assert decode(first, "opus")[1] == 48000
    assert len(list((site.root / "state" / "cache").rglob("*.opus"))) == 2


def test_a_csv_volume_column_scales_that_line_alone(tmp_path: Path) -> None:
    """A game-dialogue CSV: one line whispered at half volume, the same words at full
    volume beside it, and volumes that are not a gain failing their line alone with the
    column named. The cache keeps the two apart, and answers a second drop with the
    same files."""
    from harness import Site

    site = Site(tmp_path / "site", env=TONE)
    site.inbox.mkdir(parents=True)
    table = ("id,text,volume\n"
             "full,The same words said twice.,\n"
             "half,The same words said twice.,\"0,5\"\n"
             "word,The same words said twice.,loud\n"
             "zero,The same words said twice.,0\n"
             "huge,The same words said twice.,20\n")
    (site.inbox / "scene.csv").write_text(table, encoding="utf-8")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 1, site.logs()   # a line failed: the run says so
    out = site.outbox / "scene"
    full, rate = sf.read(out / "full.wav", dtype="int16")
    half, half_rate = sf.read(out / "half.wav", dtype="int16")
    assert rate == half_rate and len(full) == len(half) and np.abs(full).max() > 8000
    assert np.abs(half.astype(np.int32) - np.round(full / 2)).max() <= 1
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert rows["word"]["error"] == "volume 'loud' is not a finite number above 0 and at most 16"
    assert rows["zero"]["error"].startswith("volume '0' is not a finite number")
    assert rows["huge"]["error"].startswith("volume '20' is not a finite number")
    assert not (out / "word.wav").exists()
    keys = site.query("SELECT cache_key FROM lines WHERE line_id IN ('full', 'half')")
    assert len({k for (k,) in keys}) == 2
    (site.inbox / "again.csv").write_text(table, encoding="utf-8")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 1, site.logs()
    for name in ("full.wav", "half.wav"):
        assert (site.outbox / "again" / name).read_bytes() == (out / name).read_bytes()
    assert site.query("SELECT COUNT(*) FROM lines WHERE cached = 1")[0][0] == 2
