"""The encoder pool: a line encoded in a pool process is the file the writer thread
would have written, and a pool process that dies takes no line with it."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from harness import helpers_left_after_kill
from test_formats import SR, decode, speech_like

from ttsd.config import from_dict
from ttsd.output.render import LineAudio
from ttsd.pipeline.encoders import Encoders


def audio_for(fmt: str, **more: object) -> LineAudio:
    return LineAudio.of(from_dict({"output": {"format": fmt, **more}}).output)


@pytest.mark.parametrize(("fmt", "more"), [("mp3", {}), ("flac", {}), ("opus", {}),
                                           ("wav", {"loudness_lufs": -20.0})])
def test_a_line_from_the_pool_is_the_file_the_thread_writes(fmt: str, more: dict) -> None:
    audio = audio_for(fmt, **more)
    x = (speech_like(1.7) * 32767).astype(np.int16)
    parts, rendered = audio.encode(x, SR)
    encoders = Encoders(audio, processes=2)
    try:
        assert not encoders.inline
        got = encoders.encode(x, SR)
        assert encoders._pool is not None   # it went through the pool
    finally:
        encoders.close()
    mine, theirs = (b"".join(bytes(p) for p in ps) for ps in (got.parts, parts))
    if fmt == "opus":   # an Ogg stream's serial number is drawn anew for each file
        assert np.array_equal(decode(mine, fmt)[0], decode(theirs, fmt)[0])
    else:
        assert mine == theirs
    assert (got.sample_rate, got.seconds, got.lufs) == \
        (rendered.sample_rate, rendered.seconds, rendered.lufs)


def test_a_plain_wav_is_written_on_the_thread() -> None:
    encoders = Encoders(audio_for("wav"), processes=4)
    got = encoders.encode(np.zeros(SR, np.int16), SR)
    assert encoders.inline and encoders._pool is None
    assert got.seconds == 1.0


def test_a_killed_pool_process_loses_no_line() -> None:
    audio = audio_for("mp3")
    x = (speech_like(1.0) * 32767).astype(np.int16)
    want = b"".join(bytes(p) for p in audio.encode(x, SR)[0])
    encoders = Encoders(audio, processes=2)
    try:
        encoders.encode(x, SR)
        for pid in list(encoders._pool._processes):
            os.kill(pid, signal.SIGKILL)
        got = [encoders.encode(x, SR) for _ in range(3)]   # the first finds it broken
    finally:
        encoders.close()
    assert all(b"".join(bytes(p) for p in g.parts) == want for g in got)


def test_nan_samples_are_refused_from_the_pool_as_on_the_thread() -> None:
    encoders = Encoders(audio_for("flac"), processes=2)
    try:
        with pytest.raises(ValueError):
            encoders.encode(np.full(SR, np.nan, np.float32), SR)
    finally:
        encoders.close()


def test_pool_processes_exit_when_the_daemon_is_killed(tmp_path) -> None:
    """A daemon killed with SIGKILL must not leave its encoder processes behind."""
    left = helpers_left_after_kill(tmp_path / "parent.py", (
        "import time\n"
        "import numpy as np\n"
        "from ttsd.config import from_dict\n"
        "from ttsd.output.render import LineAudio\n"
        "from ttsd.pipeline.encoders import Encoders\n"
        "if __name__ == '__main__':\n"
        "    e = Encoders(LineAudio.of(from_dict({'output': {'format': 'mp3'}}).output), 2)\n"
        "    e.encode(np.zeros(22050, np.int16), 22050)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"))
    assert not left, f"encoder processes outlived their parent: {left}"


def test_a_ctrl_c_to_the_group_leaves_the_pool_working() -> None:
    """SIGINT reaches every process of a terminal's group: the pool goes on, and the
    daemon stops it when it is done."""
    encoders = Encoders(audio_for("mp3"), processes=2)
    x = np.zeros(SR, np.int16)
    try:
        encoders.encode(x, SR)
        pool = encoders._pool
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGINT)
        encoders.encode(x, SR)
        assert encoders._pool is pool   # not broken, not restarted
    finally:
        encoders.close()
