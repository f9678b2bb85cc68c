"""Markup as a script writer uses it: the real daemon, the real voice, real files. A break
is digital silence of its length at its place, a slower segment is longer while the rest
is unchanged, given phonemes replace a word's, and bad or hostile markup fails its line
alone with the problem named."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
from harness import Site

from ttsd.engine.options import EngineOptions
from ttsd.engine.records import Request
from ttsd.engine.runtime import start_engine
from ttsd.markup.ssml import MarkupError, parse

VOICE = "en_US-joe-medium"
SR = 22050
HOP = 256


def zero_runs(audio: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every run of exact zeros, in samples."""
    z = np.concatenate([[0], (audio == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(z))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def daemon_lines(tmp_path: Path, name: str, body: str, extra: str = "") -> tuple[Site, dict]:
    """The real daemon over one input; its manifest rows by id (or line number)."""
    site = Site(tmp_path / "site", extra_config=extra)
    site.inbox.mkdir(parents=True)
    (site.inbox / name).write_text(body, encoding="utf-8")
    site.start("--once")
    site.proc.wait(timeout=600)
    with open(site.outbox / Path(name).stem / "manifest.csv", newline="",
              encoding="utf-8") as f:
        rows = {r["id"] or r["line"]: r for r in csv.DictReader(f)}
    return site, rows


def test_tags_in_a_csv_do_what_they_say_in_the_daemons_files(tmp_path: Path) -> None:
    table = (
        "id,text,markup,pause_after\n"
        "plain,\"Hello there, my friend.\",,\n"
        "break,\"Hello there, <break time=\"\"700ms\"\"/> my friend.\",ssml,\n"
        "slow,\"Hello there, <prosody rate=\"\"50%\"\">my friend.</prosody>\",ssml,\n"
        "pause,\"Hello there, my friend.\",,1.5\n"
        "lessthan,\"Is 3 < 4? <b>Yes.</b>\",,\n"
        "speak,\"<speak>Hello there<break time=\"\"300ms\"\"/> my friend.</speak>\",,\n"
        "unknown,\"Hello <emphasis>there</emphasis>.\",ssml,\n"
        "broken,\"Hello <break time=\"\"1s\"\" there.\",ssml,\n"
        "notamarkup,Hello.,xml,\n")
    site, rows = daemon_lines(tmp_path, "scene.csv", table)
    out = site.outbox / "scene"

    def audio(name: str) -> np.ndarray:
        data, rate = sf.read(out / f"{name}.wav", dtype="int16")
        assert rate == SR
        return data

    assert [rows[k]["markup"] for k in ("plain", "break", "lessthan", "speak")] == \
        ["", "ssml", "", "ssml"]
    plain, brk, slow, pause = (audio(n) for n in ("plain", "break", "slow", "pause"))
    # A break: 0.7 s of digital silence where it stands, nothing else.
    runs = [r for r in zero_runs(brk) if r[1] >= 0.1 * SR]
    assert len(runs) == 1 and abs(runs[0][1] - 0.7 * SR) <= HOP, runs
    assert 0.2 * SR < runs[0][0] < len(brk) - 0.4 * SR
    assert not [r for r in zero_runs(plain) if r[1] >= 0.1 * SR]
    # A slow segment: longer by about what its words took, the words before unchanged.
    assert len(slow) > len(plain) + 0.3 * SR
    # pause_after: the line (within the CPU's rounding across batches), then 1.5 s of
    # silence.
    assert np.abs(pause[:len(plain)].astype(np.int32) - plain).max() <= 1
    assert len(pause) - len(plain) == round(1.5 * SR) and not pause[len(plain):].any()
    # Plain text with "<" in it is text; a line that starts with <speak> is SSML.
    assert rows["lessthan"]["error"] == "" and (out / "lessthan.wav").exists()
    spoken = [r for r in zero_runs(audio("speak")) if r[1] >= 0.1 * SR]
    assert len(spoken) == 1 and abs(spoken[0][1] - 0.3 * SR) <= HOP
    # Bad markup fails its line alone, named.
    assert rows["unknown"]["error"].startswith("markup: unknown tag <emphasis>")
    assert "at column 7" in rows["unknown"]["error"]
    assert rows["broken"]["error"].startswith("markup: malformed markup at column")
    assert rows["notamarkup"]["error"] == "markup 'xml' is not \"ssml\" or \"none\""
    for bad in ("unknown", "broken", "notamarkup"):
        assert not (out / f"{bad}.wav").exists()


def test_phoneme_tags_and_piper_blocks_give_the_same_audio() -> None:
    """``<phoneme ph>`` and Piper's own ``[[ ]]`` say the same phonemes; each replaces
    the word's own pronunciation and nothing else."""
    engine = start_engine(EngineOptions(device="cpu", compile="off", phonemizer_processes=0))
    tag = 'I say <phoneme alphabet="ipa" ph="təmˈɑːtoʊ">tomato</phoneme> today.'
    block = "I say [[ təmˈɑːtoʊ ]] today."
    word = "I say tomato today."
    prep = engine.prepare([Request(0, tag, VOICE, markup=True), Request(1, block, VOICE),
                           Request(2, word, VOICE)])
    assert [p.error for p in prep] == [None, None, None]
    assert prep[0].sentences == prep[1].sentences
    assert prep[1].sentences != prep[2].sentences
    ph = engine.voice(VOICE).phonemizer
    given = ph.ids(list("təmˈɑːtoʊ"))[1:-1]   # without BOS and EOS
    flat = prep[1].sentences[0]
    assert any(flat[i:i + len(given)] == given for i in range(len(flat)))
    # The words around it keep their phonemes.
    around = ph.sentences("I say")[0][1:-2]
    assert flat[1:1 + len(around)] == around


def test_hostile_markup_fails_the_line_without_expanding_or_reading() -> None:
    laughs = ('<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">'
              '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><speak>&lol3;</speak>')
    external = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                '<speak>&e;</speak>')
    for text in (laughs, external):
        try:
            parse(text)
        except MarkupError as exc:
            assert "DTD" in str(exc), exc
        else:
            raise AssertionError("a DTD was accepted")
    many = "Go " + "<break time=\"1ms\"/>word " * 5000
    try:
        parse(many)
    except MarkupError as exc:
        assert "more than 500 segments" in str(exc)
    else:
        raise AssertionError("5,000 segments were accepted")


def test_ttsd_phonemes_shows_what_the_voice_will_say(tmp_path: Path) -> None:
    import subprocess
    import sys

    from harness import ROOT, subprocess_env

    def phonemes(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ttsd.cli", "phonemes", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=subprocess_env({"PYTHONPATH": str(ROOT), "TTSD_CONFIG": ""}),
                              check=False)

    out = phonemes('Say <sub alias="Doctor">Dr.</sub> Smith <break time="500ms"/> '
                   'and <phoneme alphabet="ipa" ph="təmˈɑːtoʊ">tomato</phoneme>.', "--ssml")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[0] == "1" and "dˈɑːktɚ" in lines[0] and "[then 0.5 s]" in lines[0]
    assert "təmˈɑːtoʊ" in lines[1]
    bad = phonemes("<speak>Hello <emphasis>there</emphasis></speak>")
    assert bad.returncode == 1 and "unknown tag <emphasis>" in bad.stderr


def _engine(**more: object):
    return start_engine(EngineOptions(device="cpu", compile="off", phonemizer_processes=0,
                                      **more))


def test_a_slower_segment_is_longer_and_the_rest_is_unchanged() -> None:
    """``<prosody rate="50%">``: that segment's frames about double (1.79x here: each
    phoneme's frames are its predicted duration rounded up, so a short one doubles
    less), the segment before keeps its frames exactly."""
    engine = _engine(timings=True)
    normal, slow = engine.synthesize([
        Request(0, 'Hello there, <prosody rate="100%">my good friend.</prosody>', VOICE,
                markup=True),
        Request(1, 'Hello there, <prosody rate="50%">my good friend.</prosody>', VOICE,
                markup=True)])
    (a1, f1), (a2, f2) = normal.timing.sentences
    (b1, g1), (b2, g2) = slow.timing.sentences
    assert (a1, f1) == (b1, g1)                  # "Hello there," unchanged
    assert a2 == b2
    ratio = sum(g2) / sum(f2)
    assert 1.7 <= ratio <= 2.2, ratio


def test_marked_up_lines_batched_equal_the_same_lines_alone() -> None:
    engine = _engine()
    lines = ['One <break time="300ms"/> two.', 'Slow <prosody rate="x-slow">down</prosody>.',
             "<speak><p>A paragraph.</p><p>Another one.</p></speak>", "Plain text here."]
    reqs = [Request(i, t, VOICE, markup=t.startswith("<") or "<" in t)
            for i, t in enumerate(lines)]
    together = engine.synthesize(reqs)
    for r in reqs:
        alone = engine.synthesize([r])[0]
        assert np.abs(alone.audio.astype(np.int32)
                      - together[r.key].audio.astype(np.int32)).max() <= 1, r.text


def test_an_edited_lexicon_changes_the_next_files_audio(tmp_path: Path) -> None:
    """The daemon keeps running; the lexicon is edited between two drops of the same
    line: the second is synthesized anew with the new pronunciation (not served from
    the cache), and typing the same phonemes as a ``[[ ]]`` block gives the same file."""
    lexicon = tmp_path / "words.tsv"
    lexicon.write_text("# the way we say it\ntomato\t/təmˈeɪɾoʊ/\n", encoding="utf-8")
    site = Site(tmp_path / "site", extra_config=f"[input]\nlexicon = \"{lexicon}\"\n")
    site.inbox.mkdir(parents=True)
    site.start()
    try:
        site.wait_ready()
        (site.inbox / "a.txt").write_text("I like Tomato soup.\n", encoding="utf-8")
        site.wait_files_finished(1)
        lexicon.write_text("tomato\t/təmˈɑːtoʊ/\n", encoding="utf-8")
        (site.inbox / "b.txt").write_text("I like Tomato soup.\n", encoding="utf-8")
        site.wait_files_finished(2)
        (site.inbox / "c.txt").write_text("I like [[ təmˈɑːtoʊ ]] soup.\n", encoding="utf-8")
        site.wait_files_finished(3)
    finally:
        assert site.stop() == 0, site.logs()
    a, b, c = ((site.outbox / n / "0001.wav").read_bytes() for n in "abc")
    assert a != b and b == c
    said = dict(site.query("SELECT f.name, l.said FROM lines l JOIN files f ON f.id = l.file_id"))
    assert said == {"a.txt": "I like [[ təmˈeɪɾoʊ ]] soup.",
                    "b.txt": "I like [[ təmˈɑːtoʊ ]] soup.", "c.txt": None}
    cached = dict(site.query("SELECT f.name, l.cached FROM lines l JOIN files f "
                             "ON f.id = l.file_id"))
    assert cached == {"a.txt": 0, "b.txt": 0, "c.txt": 1}


def test_a_lexicon_that_cannot_be_used_stops_the_start_naming_its_line(tmp_path: Path) -> None:
    lexicon = tmp_path / "words.tsv"
    lexicon.write_text("tomato\t/təmˈɑːtoʊ/\nSiobhan shivawn\n", encoding="utf-8")
    site = Site(tmp_path / "site", extra_config=f"[input]\nlexicon = \"{lexicon}\"\n")
    site.inbox.mkdir(parents=True)
    site.write_config()
    out = site.cli("run", "--once", "--no-progress", timeout=120)
    assert out.returncode != 0
    assert f"input.lexicon: {lexicon} line 2: expected WORD<TAB>/IPA/" in out.stderr, out.stderr


def test_timestamps_of_a_marked_up_line_name_its_words_and_hold_its_break(
        tmp_path: Path) -> None:
    import json

    table = ("id,text,markup\n"
             "a,\"Good <break time=\"\"700ms\"\"/> morning, <sub alias=\"\"Doctor\"\">Dr.</sub> "
             "Lee.\",ssml\n")
    site, rows = daemon_lines(tmp_path, "t.csv", table, "[output]\ntimestamps = true\n")
    assert rows["a"]["error"] == "" and rows["a"]["timestamps"] == "a.json"
    stamps = json.loads((site.outbox / "t" / "a.json").read_text(encoding="utf-8"))
    assert stamps["words_matched"] is True
    words = stamps["words"]
    assert [w["text"] for w in words] == ["Good", "morning,", "Doctor", "Lee."]
    audio, _rate = sf.read(site.outbox / "t" / "a.wav", dtype="int16")
    (start, length), = [r for r in zero_runs(audio) if r[1] >= 0.5 * SR]
    assert abs(length - 0.7 * SR) <= HOP
    # The break's silence lies between the two words' spans (each word's span leaves
    # out the voice's own lead-in and tail around it).
    assert words[0]["end"] <= start / SR and (start + length) / SR <= words[1]["start"]
    assert words[1]["start"] - (start + length) / SR < 0.15


def test_lexicon_sections_apply_to_their_voice_or_language_alone() -> None:
    from ttsd.markup.lexicon import Lexicon, LexiconError

    lexicon = Lexicon.parse(
        "tomato\t/təmˈɑːtoʊ/\nUS\tyou ess\n"
        "[language en_GB]\ntomato\t/təmˈɑːtəʊ/\n"
        "[voice en_US-joe-medium]\nSiobhan\tshivawn\n"
        "[all]\nnguyen\twin\n".encode(), "words.tsv")
    line = "Siobhan and us in the US like tomato with NGUYEN."
    assert lexicon.apply(line, voice="en_US-joe-medium") == \
        "shivawn and us in the you ess like [[ təmˈɑːtoʊ ]] with win."
    assert lexicon.apply(line, voice="en_GB-alba-medium") == \
        "Siobhan and us in the you ess like [[ təmˈɑːtəʊ ]] with win."
    markup = '<speak>US <say-as interpret-as="characters">US</say-as> [[ US ]] &amp;</speak>'
    assert lexicon.apply(markup, markup=True) == \
        '<speak>you ess <say-as interpret-as="characters">US</say-as> [[ US ]] &amp;</speak>'
    for bad, why in ((b"[speaker x]\n", "line 1: a section is"),
                     (b"a b\tx\n", "line 1: 'a b' is not one word"),
                     (b"ok\t/x\n", "line 1: IPA must be written"),
                     (b"\xff\n", "not UTF-8")):
        try:
            Lexicon.parse(bad, "words.tsv")
        except LexiconError as exc:
            assert why in str(exc), exc
        else:
            raise AssertionError(bad)


def test_a_lexicon_named_at_a_sighup_is_used_for_the_next_file(tmp_path: Path) -> None:
    import signal
    import time

    lexicon = tmp_path / "words.tsv"
    lexicon.write_text("tomato\t/təmˈɑːtoʊ/\n", encoding="utf-8")
    site = Site(tmp_path / "site")
    site.inbox.mkdir(parents=True)
    site.start()
    try:
        site.wait_ready()
        site.extra_config = f"[input]\nlexicon = \"{lexicon}\"\n"
        site.write_config()
        site.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "config.reloaded" not in site.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        (site.inbox / "a.txt").write_text("I like tomato soup.\n", encoding="utf-8")
        site.wait_files_finished(1)
    finally:
        assert site.stop() == 0, site.logs()
    assert site.query("SELECT said FROM lines") == [("I like [[ təmˈɑːtoʊ ]] soup.",)]


def test_a_lexicon_broken_while_in_use_keeps_the_last_good_one(tmp_path: Path) -> None:
    from ttsd.markup.lexicon import LexiconFile

    path = tmp_path / "words.tsv"
    path.write_text("tomato\t/təmˈɑːtoʊ/\n", encoding="utf-8")
    held = LexiconFile(path)
    good = held.current()
    path.write_text("tomato /təmˈɑːtoʊ/ without a tab\n", encoding="utf-8")
    assert held.current() is good and "line 1: expected WORD<TAB>" in held.error
    assert not held.use(tmp_path / "missing.tsv")
    assert held.path == path and held.current() is good
    path.write_text("tomato\ttomahto\n", encoding="utf-8")
    assert held.current().apply("tomato") == "tomahto" and held.error is None
    assert held.use(None) and held.current().apply("tomato") == "tomato"
