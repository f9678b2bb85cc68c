"""Phonemizing in worker processes: the same ids as in-process, recycled processes,
and a process that dies on one text fails that text alone."""

from __future__ import annotations

import psutil
import pytest
from faults import CRASH_TEXT, CrashingPhonemizer

from ttsd.engine.phonemes import Phonemizer, PhonemizerProcesses
from ttsd.engine.voice import discover

TEXTS = ["Hello there.", "The price: $1,299.99, taxes included. Was it worth it?",
         "An error at 10:45 p.m.", "", "Yes!", "Doctor Alvarez measured 7.5% — not 75%."]


@pytest.fixture(scope="module")
def voice():
    return discover(None)["en_US-joe-medium"]


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def test_processes_give_the_same_ids_as_in_process(voice):
    local = Phonemizer(voice.config)
    procs = PhonemizerProcesses(2)
    try:
        got = procs.sentences_many("k", voice.config, TEXTS * 6)
    finally:
        procs.close()
    assert got == [local.sentences(t) for t in TEXTS * 6]
    assert len(got[1]) == 2          # two sentences stay two


def test_start_warms_every_process_before_the_first_batch(voice):
    """The daemon's warm-up starts all the processes, each with the voice's front end
    loaded; the first real batch then runs on those same processes (no spawn on it)."""
    procs = PhonemizerProcesses(3)
    try:
        assert procs.start("k", voice.config) == 3
        started = _children()
        assert len(started) >= 3
        got = procs.sentences_many("k", voice.config, TEXTS * 8)
        assert _children() == started
    finally:
        procs.close()
    assert got == [Phonemizer(voice.config).sentences(t) for t in TEXTS * 8]


def test_processes_are_replaced_and_stay_correct(voice):
    """phonemizer-dies (memory): espeak-ng grows per distinct line, so each process is
    replaced after ``recycle_tasks`` chunks; results do not change across replacements."""
    local = Phonemizer(voice.config)
    procs = PhonemizerProcesses(1, recycle_tasks=1)
    seen: set[int] = set()
    try:
        for i in range(4):
            texts = [f"Line {i} number {j}." for j in range(PhonemizerProcesses.CHUNK)]
            assert procs.sentences_many("k", voice.config, texts) == \
                [local.sentences(t) for t in texts]
            seen |= _children()
    finally:
        procs.close()
    assert len(seen) >= 3, f"expected replaced processes, saw pids {seen}"


def test_a_process_that_dies_fails_its_text_alone(voice):
    local = Phonemizer(voice.config)
    procs = PhonemizerProcesses(1, front_end=CrashingPhonemizer)
    texts = ["First line.", CRASH_TEXT, "Third line.", "Fourth line."] * 5
    try:
        got = procs.sentences_many("k", voice.config, texts)
        after = procs.sentences_many("k", voice.config, ["Still working."])
    finally:
        procs.close()
    for text, g in zip(texts, got):
        if text == CRASH_TEXT:
            assert g == "the phonemizer (espeak-ng) crashed on this text"
        else:
            assert g == local.sentences(text)
    assert after == [local.sentences("Still working.")]


def test_processes_exit_when_the_daemon_is_killed(tmp_path):
    """A daemon killed with SIGKILL (systemd's last resort, the OOM killer) must not
    leave its phonemizer processes behind: they held their own task pipe open and
    waited forever, re-parented to init."""
    from harness import helpers_left_after_kill

    left = helpers_left_after_kill(tmp_path / "parent.py", (
        "import time\n"
        "from ttsd.engine.phonemes import PhonemizerProcesses\n"
        "from ttsd.engine.voice import discover\n"
        "if __name__ == '__main__':\n"
        "    v = discover(None)['en_US-joe-medium']\n"
        "    p = PhonemizerProcesses(2)\n"
        "    p.sentences_many('k', v.config, ['Hello there.'] * 64)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"))
    assert not left, f"phonemizer processes outlived their parent: {left}"
