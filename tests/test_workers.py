"""Several devices: the real daemon with a pool of worker processes (two CPU workers,
``engine.devices = ["cpu", "cpu"]``) or Ray actors on a local Ray instance, the real
voice, real files, real SQLite. Each end-to-end test ends by checking the invariant."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from harness import FAULTS, ROOT, Site, assert_invariant, assert_no_redo, run_once, snapshot

POOL = '[engine]\ndevices = ["cpu", "cpu"]\n[batching]\nmax_batch_size = 2\n'


def _workers(site: Site) -> list[dict]:
    return site.status()["workers"]


def _wait(cond, timeout: float, site: Site, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if site.proc and site.proc.poll() is not None:
            raise AssertionError(f"daemon exited while waiting for {what}:\n{site.logs()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{site.logs()}")


def _plausible(path: Path, text: str) -> None:
    audio, sr = sf.read(str(path), dtype="float32")
    seconds = len(audio) / sr
    assert 0.025 * len(text) < seconds < 0.2 * len(text) + 1.0, (path, seconds, text)
    assert float(np.sqrt(np.mean(audio ** 2))) > 0.01, f"{path} is silent"


def test_two_cpu_workers_end_to_end(tmp_path: Path) -> None:
    """devices = ["cpu", "cpu"]: a txt and a csv through two worker processes; both do
    batches, every line is one WAV, status shows each worker."""
    site = Site(tmp_path, extra_config=POOL)
    site.start()
    site.wait_ready()
    workers = _workers(site)
    assert [w["device"] for w in workers] == ["cpu", "cpu"]
    assert all(w["state"] == "ready" and w["pid"] and w["host"] for w in workers), workers
    assert len({w["pid"] for w in workers} | {site.proc.pid}) == 3  # separate processes
    lines = [f"Worker test line {i}, short and clear." for i in range(8)]
    (site.inbox / "book.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (site.inbox / "p.csv").write_text('id,text\nhi,"Hello from the pool."\nbad,\n'
                                      'bye,"Goodbye now."\n', encoding="utf-8")
    site.wait_files_finished(2)
    workers = _workers(site)
    status = site.status()
    assert site.stop() == 0
    assert dict(site.query("SELECT state, COUNT(*) FROM lines GROUP BY state")) == \
        {"done": 10, "failed": 1}
    assert site.query("SELECT COUNT(*) FROM lines WHERE state='done' AND synth_count != 1") \
        == [(0,)]
    per_worker = dict(site.query("SELECT worker, COUNT(*) FROM batches GROUP BY worker"))
    assert set(per_worker) == {0, 1}, per_worker       # both workers did batches
    assert all(w["batches"] == per_worker[w["slot"]] for w in workers), (workers, per_worker)
    assert all(w["x_realtime"] and w["x_realtime"] > 0 for w in workers)
    assert status["lines"]["done"] == 10
    for i, text in enumerate(lines, 1):
        _plausible(site.outbox / "book" / f"{i:04d}.wav", text)
    _plausible(site.outbox / "p" / "hi.wav", "Hello from the pool.")
    assert_invariant(site)


def test_processes_backend_runs_one_device_in_a_worker(tmp_path: Path) -> None:
    """backend = "processes" with one device: the model runs in a worker process, not in
    the daemon, and the WAVs are the bytes the in-process daemon writes."""
    texts = ["One device, one worker process.", "The same bytes as the daemon's own model."]
    alone = run_once(tmp_path / "inproc", texts, "")
    pooled = run_once(tmp_path / "pooled", texts, '[cluster]\nbackend = "processes"\n')
    assert pooled.query("SELECT DISTINCT worker FROM batches") == [(0,)]
    # engine.device = "auto" resolved, as the batch size and the cache key need it
    assert pooled.query("SELECT device FROM workers") == [("cpu",)]
    assert alone.query("SELECT DISTINCT worker FROM batches") == [(None,)]
    for i in (1, 2):
        wav = f"lines/{i:04d}.wav"
        assert (pooled.outbox / wav).read_bytes() == (alone.outbox / wav).read_bytes(), wav


def test_worker_killed_mid_batch_loses_nothing_repeats_nothing(tmp_path: Path) -> None:
    """SIGKILL one worker while it runs a batch: its batch goes back to the queue, the
    worker restarts, the other carries on; every line ends done, synthesized once."""
    site = Site(tmp_path, extra_config=POOL + "[cluster]\nrestart_backoff_s = 0.2\n",
                env=FAULTS)
    site.start()
    site.wait_ready()
    victim = _workers(site)[0]
    lines = [f"Slow line number {i}. {{{{fault:slow:800}}}}" for i in range(12)]
    (site.inbox / "book.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Once the victim has finished a batch it is running the next one (one queued ahead).
    _wait(lambda: _workers(site)[0]["batches"] >= 1, 90, site, "worker 0's first batch")
    os.kill(victim["pid"], signal.SIGKILL)
    _wait(lambda: "worker.died" in site.logs(), 30, site, "the daemon to notice")
    site.wait_files_finished(1)
    _wait(lambda: [w["state"] for w in _workers(site)] == ["ready", "ready"], 60, site,
          "the killed worker to be back")
    after = _workers(site)
    assert site.stop() == 0
    log = site.log.read_text()
    died = [ln for ln in log.splitlines() if '"worker.died"' in ln]
    assert len(died) == 1 and '"worker": 0' in died[0], died
    assert '"batches_requeued": 0' not in died[0], died[0]   # it was mid-batch
    rows = site.query("SELECT state, synth_count, attempts FROM lines")
    assert len(rows) == 12 and all(r[0] == "done" for r in rows), rows
    assert all(r[1] == 1 for r in rows), "a line was synthesized twice"
    assert any(r[2] >= 2 for r in rows), "no line was retried: the kill hit no batch"
    assert len(list((site.outbox / "book").glob("*.wav"))) == 12
    assert after[0]["restarts"] == 1 and after[0]["pid"] != victim["pid"], after
    assert after[0]["state"] == "ready" and after[1]["state"] == "ready", after
    assert after[1]["restarts"] == 0 and after[1]["batches"] >= 1, after
    assert_invariant(site)


def test_line_that_kills_every_worker_fails_alone(tmp_path: Path) -> None:
    """A line that kills the worker running it ({{fault:exit}}) ends failed after
    daemon.max_attempts; its batch neighbours finish. A device failing max_failures
    times is taken out of rotation and reported; the other carries on."""
    site = Site(tmp_path, extra_config=POOL + "[daemon]\nmax_attempts = 3\n[cluster]\n"
                "restart_backoff_s = 0.1\nmax_failures = 2\n", env=FAULTS)
    lines = ["First good line.", "Second good line.", "Poison {{fault:exit}}",
             "Fourth good line.", "Fifth good line.", "Sixth good line."]
    site.start()
    site.wait_ready()
    (site.inbox / "mix.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    site.wait_files_finished(1, timeout=240)
    _wait(lambda: sorted(w["state"] for w in _workers(site)) == ["out", "ready"], 60, site,
          "one device out of rotation, the other ready")
    workers = _workers(site)
    assert site.stop() == 0
    rows = site.query("SELECT number, state, attempts, synth_count, error FROM lines "
                      "ORDER BY number")
    poison = rows[2]
    assert poison[1] == "failed" and poison[2] == 3 and "never finished" in poison[4], poison
    assert all(r[1] == "done" and r[3] == 1 for i, r in enumerate(rows) if i != 2), rows
    # Three deaths over two slots with max_failures = 2: exactly one device is out.
    out = next(w for w in workers if w["state"] == "out")
    assert out["failures"] == 2 and out["last_error"], out
    assert sum(w["failures"] for w in workers) == 3, workers
    assert '"worker.out_of_rotation"' in site.log.read_text()
    assert_invariant(site)


def test_ray_backend_end_to_end(tmp_path: Path) -> None:
    """backend = "ray" on a local Ray instance started by the daemon: two CPU actors do
    the model work; the daemon writes every WAV and row. One actor's process is killed
    mid-batch: Ray restarts it, the daemon requeues its batch, nothing is lost or
    synthesized twice."""
    pytest.importorskip("ray")
    site = Site(tmp_path, extra_config="[batching]\nmax_batch_size = 2\n[cluster]\n"
                'backend = "ray"\naddress = "local"\nworkers = 2\ncpus_per_worker = 1\n'
                "restart_backoff_s = 0.2\n", env=FAULTS)
    site.start()
    site.wait_ready(timeout=180)
    workers = _workers(site)
    assert [w["backend"] for w in workers] == ["ray", "ray"], workers
    assert all(w["state"] == "ready" and w["pid"] != site.proc.pid for w in workers), workers
    victim = workers[0]
    lines = [f"Ray line {i}, on an actor. {{{{fault:slow:600}}}}" for i in range(8)]
    (site.inbox / "r.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _wait(lambda: _workers(site)[0]["batches"] >= 1, 90, site, "actor 0's first batch")
    os.kill(victim["pid"], signal.SIGKILL)
    site.wait_files_finished(1)
    _wait(lambda: [w["state"] for w in _workers(site)] == ["ready", "ready"], 60, site,
          "the killed actor to be back")
    after = _workers(site)
    assert site.stop() == 0
    died = [ln for ln in site.log.read_text().splitlines() if '"worker.died"' in ln]
    assert len(died) == 1 and "Ray actor lost" in died[0], died
    rows = site.query("SELECT state, synth_count FROM lines")
    assert rows == [("done", 1)] * 8, rows
    per_worker = dict(site.query("SELECT worker, COUNT(*) FROM batches GROUP BY worker"))
    assert set(per_worker) == {0, 1}, per_worker
    assert after[0]["restarts"] == 1 and after[0]["pid"] != victim["pid"], after
    for i, text in enumerate(lines, 1):
        _plausible(site.outbox / "r" / f"{i:04d}.wav", text.split(" {{")[0])
    assert_invariant(site)


def test_ray_is_never_imported_without_the_ray_backend() -> None:
    code = ("import sys, ttsd.cli, ttsd.service.daemon, ttsd.service.workers, ttsd.service.status\n"
            "from ttsd.config import Config\n"
            "from ttsd.service import workers\n"
            "assert not workers.pool_wanted(Config())\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0, out.stderr


def test_slot_device_names_read_as_gpu_or_not() -> None:
    """The feeder's batch size and the output's cache key follow from this: a local
    GPU, an indexed one and Ray's GPU actors are GPUs; the CPU and Ray's CPU actors
    are not."""
    from ttsd.service import workers

    assert [workers.is_gpu(d) for d in ("cuda", "cuda:1", "ray:gpu")] == [True] * 3
    assert [workers.is_gpu(d) for d in ("cpu", "ray:cpu", "auto")] == [False] * 3


def test_a_gpu_worker_phonemizes_in_processes_a_cpu_worker_in_itself() -> None:
    """On a GPU, espeak-ng on the worker's reader thread would share the interpreter
    with the thread launching the model's work; the daemon's own engine uses
    phonemizer processes there, and so does a GPU worker. A CPU worker keeps its cores
    for its engine."""
    from ttsd.config import Config
    from ttsd.service import workers

    gpu = workers.worker_options(workers.spec_for(Config(), "cuda:1"))
    cpu = workers.worker_options(workers.spec_for(Config(), "cpu", 2))
    assert (gpu.device, cpu.device) == ("cuda:1", "cpu")
    assert gpu.phonemizer_processes >= 1
    assert cpu.phonemizer_processes == 0


def _engine_pcm16(audio: np.ndarray) -> np.ndarray:
    """What a worker's engine sends for a 16-bit output: its samples clipped and turned
    into int16 on the device (``decode.AudioHalf._to_host``)."""
    import torch

    from ttsd.engine.device import pcm16

    return pcm16(torch.from_numpy(audio).clamp(-1.0, 1.0)).numpy()


def test_int16_wire_gives_the_same_wav_bytes() -> None:
    """Workers send int16; the WAV written from it equals the one written from float32,
    and only a 16-bit output gets int16 (PCM_24/32/FLOAT outputs get float32)."""
    from ttsd.config import Config, OutputConfig
    from ttsd.engine.options import EngineOptions
    from ttsd.output.wav import encode_wav

    rng = np.random.default_rng(7)
    audio = rng.uniform(-1.05, 1.05, 50_000).astype(np.float32)
    audio[:4] = [1.0, -1.0, 0.99999, -0.99999]
    wire = _engine_pcm16(audio)
    assert wire.dtype == np.int16
    assert encode_wav(wire, 22050) == encode_wav(audio, 22050)
    assert EngineOptions.from_config(Config(), device="cpu").pcm16
    assert not EngineOptions.from_config(Config(output=OutputConfig(subtype="PCM_24")),
                                         device="cpu").pcm16


def test_int16_wire_is_exact_for_values_near_zero() -> None:
    """The wire uses libsndfile's rounding, not floor(x × 32768): tiny negatives become
    0 and values just under a step round up, exactly as the written WAV has them."""
    from ttsd.output.wav import encode_wav

    audio = np.array([-1e-10, -(2.0**-33), (65536 - 0.5) / 2**31, -(65536 * 3 + 0.25) / 2**31,
                      -0.0, 0.0, 1.0, -1.0, 2.0**-40], dtype=np.float32)
    wire = _engine_pcm16(audio)
    assert wire.tolist() == [0, 0, 1, -3, 0, 0, 32767, -32768, 0]
    assert encode_wav(wire, 22050) == encode_wav(audio, 22050)
    rng = np.random.default_rng(11)
    small = (rng.standard_normal(200_000) * 2.0**-10).astype(np.float32)
    assert encode_wav(_engine_pcm16(small), 22050) == encode_wav(small, 22050)


@pytest.mark.parametrize("table, needle", [
    ('[engine]\ndevices = ["gpu0"]', "engine.devices"),
    ('[engine]\ndevices = 3', "engine.devices"),
    ('[cluster]\nbackend = "mpi"', "cluster.backend"),
    ('[cluster]\naddress = "nowhere"', "cluster.address"),
    ('[cluster]\nmax_failures = 0', "cluster.max_failures"),
    ('[cluster]\nrestart_backoff_s = 5.0\nrestart_backoff_max_s = 1.0',
     "cluster.restart_backoff_max_s"),
])
def test_config_errors_name_the_key(tmp_path: Path, table: str, needle: str) -> None:
    from ttsd.config import Config
    from ttsd.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text(table + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        Config.load(path)


# ---------------------------------------------------------------------- faults, stop


def _worker_pids(site: Site) -> set[int]:
    """Every worker process the daemon started (its log names each one when ready)."""
    pids = set()
    for ln in site.log.read_text().splitlines():
        if '"worker.ready"' in ln:
            pids.add(json.loads(ln)["pid"])
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too (its parent, the test's daemon, has exited: init reaps it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _assert_no_worker_left(site: Site, timeout: float = 10) -> None:
    pids = _worker_pids(site)
    assert pids, "no worker.ready in the log"
    deadline = time.time() + timeout
    while time.time() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), f"worker processes left behind: " \
        f"{[p for p in pids if not _gone(p)]}"


def test_hung_batch_is_killed_and_the_line_fails_alone(tmp_path: Path) -> None:
    """A batch running past cluster.batch_timeout_s ({{fault:hang}}) gets its worker
    killed and restarted; the hanging line is retried alone and fails after
    daemon.max_attempts; every other line is done, synthesized once."""
    site = Site(tmp_path, extra_config=POOL + "[daemon]\nmax_attempts = 2\n[cluster]\n"
                "batch_timeout_s = 4\nrestart_backoff_s = 0.1\n", env=FAULTS)
    lines = ["First good line.", "Second good line.", "It hangs here {{fault:hang}}",
             "Fourth good line.", "Fifth good line.", "Sixth good line."]
    site.start()
    site.wait_ready()
    (site.inbox / "h.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    site.wait_files_finished(1, timeout=120)
    _wait(lambda: [w["state"] for w in _workers(site)] == ["ready", "ready"], 60, site,
          "both workers ready after the kills")
    workers = _workers(site)
    assert site.stop() == 0
    rows = site.query("SELECT number, state, attempts, synth_count, error FROM lines "
                      "ORDER BY number")
    hung = rows[2]
    assert hung[1] == "failed" and hung[2] == 2 and "never finished" in hung[4], hung
    assert all(r[1] == "done" and r[3] == 1 for i, r in enumerate(rows) if i != 2), rows
    died = [ln for ln in site.log.read_text().splitlines() if '"worker.died"' in ln]
    assert len(died) == 2 and all("hung, killed" in ln for ln in died), died
    # Each kill was one failure and one restart; no device went out of rotation.
    assert sum(w["restarts"] for w in workers) == 2, workers
    assert sum(w["failures"] for w in workers) == 2, workers
    _assert_no_worker_left(site)
    assert_invariant(site)


def test_every_device_out_exits_75_and_loses_nothing(tmp_path: Path) -> None:
    """A line that kills every worker it touches, with max_failures = 1: both devices go
    out of rotation, the daemon exits 75 (DeviceLostError) with every line's state in the
    store and no worker left running. Started again, the poison line fails after
    daemon.max_attempts and the rest finish, each synthesized once."""
    site = Site(tmp_path, extra_config=POOL + "[daemon]\nmax_attempts = 3\n[cluster]\n"
                "restart_backoff_s = 0.1\nmax_failures = 1\n", env=FAULTS)
    lines = ["First good line.", "Second good line.", "Poison {{fault:exit}}",
             "Fourth good line.", "Fifth good line.", "Sixth good line."]
    site.start()
    site.wait_ready()
    (site.inbox / "p.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        rc = site.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        site.proc.kill()
        raise AssertionError(f"the daemon did not exit with every device out:\n"
                             f"{site.logs()}") from None
    assert rc == 75, (rc, site.logs())
    log = site.log.read_text()
    assert "every device is out of rotation" in log, site.logs()
    assert log.count('"worker.out_of_rotation"') == 2, site.logs()
    _assert_no_worker_left(site)
    rows = site.query("SELECT number, state, attempts, synth_count FROM lines ORDER BY number")
    assert [r[0] for r in rows] == list(range(1, 7)), rows      # nothing lost
    assert all(r[1] in ("pending", "done") for r in rows), rows  # nothing left running
    assert rows[2][1:3] == ("pending", 2), rows                  # it killed both workers
    assert all(r[3] == (1 if r[1] == "done" else 0) for r in rows), rows
    before = snapshot(site)
    site.start()
    site.wait_files_finished(1, timeout=120)
    _wait(lambda: sorted(w["state"] for w in _workers(site)) == ["out", "ready"], 60, site,
          "the poison's third victim out, the other worker ready")
    assert site.stop() == 0, site.logs()
    assert_no_redo(before, snapshot(site))
    rows = site.query("SELECT number, state, attempts, synth_count, error FROM lines "
                      "ORDER BY number")
    poison = rows[2]
    assert poison[1] == "failed" and poison[2] == 3 and "never finished" in poison[4], poison
    assert all(r[1] == "done" and r[3] == 1 for i, r in enumerate(rows) if i != 2), rows
    _assert_no_worker_left(site)
    assert_invariant(site)


def test_sigterm_with_batches_queued_on_workers(tmp_path: Path) -> None:
    """SIGTERM while each worker runs a batch and has another queued behind it: only the
    running batches finish; the queued ones (and those waiting in the daemon) go back to
    pending with their attempt undone; exit 0, no worker left. After a restart every line
    is done, and nothing done before the stop is done again."""
    site = Site(tmp_path, extra_config=POOL, env=FAULTS)
    lines = [f"Queued line {i}. {{{{fault:slow:1500}}}}" for i in range(16)]
    site.start()
    site.wait_ready()
    (site.inbox / "q.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # After a worker's first batch, it runs its second with a third queued behind it.
    _wait(lambda: site.query("SELECT COUNT(*) FROM batches")[0][0] >= 2, 90, site,
          "the first batches")
    batches = site.query("SELECT COUNT(*) FROM batches")[0][0]
    assert site.stop() == 0, site.logs()
    after = site.query("SELECT COUNT(*) FROM batches")[0][0]
    # At most the two running batches finished (one more if one ended as we signalled).
    assert after <= batches + 3, (batches, after, site.logs())
    rows = site.query("SELECT state, attempts, synth_count FROM lines")
    assert len(rows) == 16
    assert all(r[0] in ("done", "pending") for r in rows), rows
    assert all(r == ("done", 1, 1) for r in rows if r[0] == "done"), rows
    pending = [r for r in rows if r[0] == "pending"]
    assert len(pending) >= 4, rows                   # the queued batches went back ...
    assert all(r[1] == 0 for r in pending), rows     # ... with their attempt undone
    assert '"daemon.stopped"' in site.log.read_text()
    _assert_no_worker_left(site)
    before = snapshot(site)
    site.start()
    site.wait_files_finished(1, timeout=120)
    assert site.stop() == 0, site.logs()
    assert_no_redo(before, snapshot(site))
    rows = site.query("SELECT state, attempts, synth_count FROM lines")
    assert rows == [("done", 1, 1)] * 16, rows
    assert_invariant(site)


def test_the_tone_model_keeps_the_int16_contract(monkeypatch) -> None:
    """``TTSD_MODEL=tone`` (the pipeline tests' tone model) returns what the real model
    would for a 16-bit output: int16, so workers and the writer see one kind."""
    from ttsd.config import Config
    from ttsd.engine.options import EngineOptions
    from ttsd.engine.records import Request
    from ttsd.engine.runtime import open_engine

    monkeypatch.setenv("TTSD_MODEL", "tone")
    options = EngineOptions.from_config(Config(), device="cpu", phonemizer_processes=0)
    assert options.model == "tone" and options.pcm16
    voice = Config().engine.voice
    got = open_engine(options).synthesize([Request(0, "Hello there.", voice)])[0]
    floats = open_engine(dataclasses.replace(options, pcm16=False)).synthesize(
        [Request(0, "Hello there.", voice)])[0]
    assert got.audio.dtype == np.int16 and len(got.audio) > 0.2 * 22050
    assert np.array_equal(got.audio, _engine_pcm16(floats.audio))
