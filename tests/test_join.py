"""Whole files: an input's lines joined into one audio file with chapters and timed text,
streamed (memory does not grow with the input's length)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from harness import ROOT, TONE, Site, assert_invariant


def decoded_seconds(path: Path) -> tuple[float, int]:
    with av.open(str(path)) as c:
        frames = sum(f.samples for f in c.decode(audio=0))
        rate = c.streams.audio[0].rate
    return frames / rate, rate


def srt_starts(text: str) -> list[float]:
    out = []
    for h, m, s, ms in re.findall(r"^(\d\d):(\d\d):(\d\d),(\d{3}) -->", text, re.MULTILINE):
        out.append(int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000)
    return out


CSV = ("id,chapter,text\n"
       "intro,Opening,Welcome to the book.\n"
       "p1,,It was a bright cold day in April.\n"
       "p2,,The clocks were striking thirteen.\n"
       "c2,The Second Part,Later that night the rain came.\n"
       "c2b,,And it did not stop until morning.\n")


@pytest.mark.parametrize(("fmt", "chapters", "marks"), [
    ("mp3", "column", ["Opening", "The Second Part"]),
    ("m4b", "line", ["intro", "p1", "p2", "c2", "c2b"]),
    ("opus", "column", ["Opening", "The Second Part"]),
])
def test_an_input_is_joined_into_one_file_with_chapters_and_subtitles(
        tmp_path: Path, fmt: str, chapters: str, marks: list[str]) -> None:
    conf = (f'[output]\njoin = "file"\njoin_format = "{fmt}"\njoin_pause_s = 0.4\n'
            f'chapters = "{chapters}"\n')
    site = Site(tmp_path / "site", extra_config=conf, env=TONE)
    site.inbox.mkdir(parents=True)
    (site.inbox / "book.csv").write_text(CSV, encoding="utf-8")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 0, site.logs()
    assert_invariant(site)

    joined = site.outbox / f"book.{fmt}"
    assert joined.is_file()
    lines = [site.outbox / "book" / f"{i}.wav" for i in ("intro", "p1", "p2", "c2", "c2b")]
    lengths = [sf.info(str(p)).duration for p in lines]
    want = sum(lengths) + 0.4 * (len(lines) - 1)
    got, _rate = decoded_seconds(joined)
    assert abs(got - want) < 0.08, (got, want)          # within a few codec frames

    with av.open(str(joined)) as c:
        titles = [ch["metadata"].get("title") for ch in c.chapters()]
    assert titles == marks

    subs = (site.outbox / "book.srt").read_text()
    starts = srt_starts(subs)
    expect = np.concatenate(([0.0], np.cumsum([x + 0.4 for x in lengths[:-1]])))
    assert np.allclose(starts, expect, atol=0.002), (starts, expect)
    assert "Welcome to the book." in subs
    vtt = (site.outbox / "book.vtt").read_text()
    assert vtt.startswith("WEBVTT") and vtt.count("-->") == 5
    cue = (site.outbox / "book.cue").read_text()
    assert cue.count("TRACK") == 5 and f'FILE "book.{fmt}"' in cue


def test_a_failed_line_is_left_out_of_the_joined_file(tmp_path: Path) -> None:
    texts = ["First line.", "{{fault:long}} This one fails.", "Third line."]
    site = Site(tmp_path / "site", extra_config='[output]\njoin = "file"\njoin_pause_s = 0.0\n',
                env=TONE)
    site.inbox.mkdir(parents=True)
    (site.inbox / "lines.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 1, site.logs()   # a line failed
    assert_invariant(site)
    joined = site.outbox / "lines.wav"
    kept = [site.outbox / "lines" / n for n in ("0001.wav", "0003.wav")]
    total = sum(sf.info(str(p)).frames for p in kept)
    assert sf.info(str(joined)).frames == total
    assert (site.outbox / "lines.srt").read_text().count("-->") == 2


JOIN_SCRIPT = r"""
import json, resource, sys
from pathlib import Path
from ttsd.config import from_dict
from ttsd.output.join import Part, join_lines
root, n = Path(sys.argv[1]), int(sys.argv[2])
parts = [Part(i, str(root / "lines" / f"{i % 50}.wav"), f"Line {i}", f"Line {i}")
         for i in range(n)]
out = from_dict({"output": {"join": "file", "join_format": "mp3"}}).output
joined = join_lines(root, f"book{n}", parts, out, title="book")
print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": joined.seconds}))
"""


def test_joining_streams_memory_does_not_grow_with_the_input(tmp_path: Path) -> None:
    """200 and 2,000 lines of 2 s (6.7 min and 67 min of audio: 35 MB and 350 MB as
    float32): the peak memory of the joining process is the same."""
    (tmp_path / "lines").mkdir()
    rng = np.random.default_rng(0)
    for i in range(50):
        sf.write(str(tmp_path / "lines" / f"{i}.wav"),
                 (0.3 * rng.standard_normal(44100)).astype(np.float32), 22050)
    got = {}
    for n in (200, 2000):
        out = subprocess.run([sys.executable, "-c", JOIN_SCRIPT, str(tmp_path), str(n)],
                             capture_output=True, text=True, timeout=600, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        got[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert got[2000]["seconds"] > 9 * got[200]["seconds"]
    assert got[2000]["rss_kb"] < got[200]["rss_kb"] + 30_000, got
