"""Running the real daemon as a subprocess on a temporary folder, and checking the
invariant: every input line ends as exactly one WAV + one done row, or one failed row
with a reason; no temporary file is left; nothing stays in the work folder."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent

FAULTS = {"TTSD_ENGINE_FACTORY": str(ROOT / "tests" / "faults.py")}
"""A daemon's environment: its engine misbehaves for the lines holding a fault token
(tests/faults.py)."""
TONE = {**FAULTS, "TTSD_MODEL": "tone"}
"""A daemon's environment: the tone model (``ttsd.engine.tone``) instead of the voice's
network, faults as with ``FAULTS``."""


def crash_env(spec: str) -> dict[str, str]:
    """A daemon's environment: it dies as ``kill -9`` would at the crash point ``spec``
    names (``NAME`` or ``NAME:N``, the N-th visit; armed by tests/faults.py)."""
    return {**FAULTS, "TTSD_CRASH_AT": spec}

TEST_CACHE = Path(tempfile.gettempdir()) / f"ttsd-test-cache-{os.getuid()}"
"""$XDG_CACHE_HOME of the daemons and commands the tests start (unless a test sets its
own): they share one converted voice, converted once instead of once per site, and
never touch the user's own ~/.cache."""


def subprocess_env(*layers: dict[str, str] | None) -> dict[str, str]:
    """This process's environment with $XDG_CACHE_HOME at ``TEST_CACHE``, then each of
    ``layers`` over it (a layer's own XDG_CACHE_HOME wins)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(TEST_CACHE)}
    for layer in layers:
        env.update(layer or {})
    return env


@dataclass
class Site:
    root: Path
    extra_config: str = ""
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def write_config(self) -> None:
        """Test defaults (CPU, float32, fast settle) overridden key by key by extra_config."""
        sections: dict[str, dict[str, str]] = {
            "input": {"settle_s": "0.3", "rescan_s": "1.0"},
            "engine": {"device": '"cpu"', "dtype": '"float32"', "warmup": "false"},
            "batching": {"max_batch_size": "4", "max_wait_ms": "20"},
            "daemon": {"heartbeat_s": "0.5", "stop_timeout_s": "30"},
        }
        section = None
        for line in self.extra_config.splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line[1:-1]
            elif "=" in line and section:
                key, value = (x.strip() for x in line.split("=", 1))
                sections.setdefault(section, {})[key] = value
        text = "".join(f"[{sec}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) + "\n"
                       for sec, kv in sections.items())
        self.config.write_text(text, encoding="utf-8")

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def db(self) -> Path:
        return self.root / "state" / "ttsd.db"

    def cli(self, *args: str, timeout: float = 120, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ttsd.cli", "--config", str(self.config),
                               *args], cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, env=subprocess_env(self.env, env))

    def start(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        self.write_config()
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.log = self.root / f"daemon-{time.time_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ttsd.cli", "--config", str(self.config), "run", *args],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
            env=subprocess_env({"PYTHONPATH": str(ROOT)}, self.env, env))
        return self.proc

    def wait_ready(self, timeout: float = 90) -> None:
        """Until the daemon logged daemon.started (model loaded, start-up scan done)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.log and "daemon.started" in self.log.read_text(errors="replace"):
                return
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.logs()}")
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"daemon did not stop in {timeout}s:\n{self.logs()}") from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def wait_files_finished(self, n: int, timeout: float = 180) -> None:
        """Until ``n`` files are done or failed (and their inputs left the work folder)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.db.exists():
                try:
                    got = self.query("SELECT COUNT(*) FROM files WHERE state IN "
                                     "('done','failed')")[0][0]
                except sqlite3.OperationalError:
                    got = 0
                if got >= n:
                    return
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited:\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"only some files finished in {timeout}s:\n{self.logs()}")

    def status(self) -> dict:
        out = self.cli("status", "--json", timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")


def assert_invariant(site: Site) -> None:
    """Every line: one audio file (of any format ttsd writes) + done row, or one failed
    row with a reason; no leftovers."""
    rows = site.query("SELECT l.id, l.state, l.error, l.wav, l.out_name, f.out_dir "
                      "FROM lines l JOIN files f ON f.id = l.file_id")
    for _id, state, error, wav, out_name, out_dir in rows:
        assert state in ("done", "failed"), f"line {_id} left {state}"
        if state == "done":
            path = Path(wav)
            assert path.exists(), f"line {_id}: {wav} missing"
            assert path.suffix in AUDIO_SUFFIXES, path
            assert path == Path(out_dir) / f"{out_name}{path.suffix}"
            info = sf.info(str(path))
            assert info.frames > 0
        else:
            assert error, f"failed line {_id} has no reason"
    wavs = [p for p in site.outbox.glob("*/*") if p.suffix in AUDIO_SUFFIXES]
    done = [r for r in rows if r[1] == "done"]
    # The done totals ttsd status shows are counters kept beside the rows: equal to the
    # rows' own sums, whatever crashed and restarted on the way.
    (audio, cached), = site.query("SELECT COALESCE(SUM(seconds), 0), COALESCE(SUM(cached), 0) "
                                  "FROM lines WHERE state = 'done'")
    totals = dict(site.query("SELECT name, value FROM counters WHERE name IN "
                             "('done_audio_us', 'done_cached')"))
    assert totals.get("done_cached") == cached, (totals, cached)
    assert abs(totals.get("done_audio_us", -1e12) / 1e6 - audio) <= 1e-6 * (len(done) + 1), \
        (totals, audio)
    assert len(wavs) == len(done), f"{len(wavs)} WAVs for {len(done)} done lines"
    leftovers = [p for p in site.root.rglob("*.tmp")]
    assert not leftovers, f"temporary files left: {leftovers}"
    work = site.root / "state" / "work"
    assert not work.exists() or not any(work.iterdir()), f"work folder not empty: {list(work.iterdir())}"


def run_once(root: Path, texts: list[str], extra_config: str,
             name: str = "lines.txt", env: dict[str, str] | None = None) -> Site:
    """The real daemon (``run --once``) on one file of ``texts`` with a config
    fragment (and ``env``); it must exit 0 with every line accounted for."""
    site = Site(root, extra_config=extra_config, env=env or {})
    site.inbox.mkdir(parents=True)
    (site.inbox / name).write_text("\n".join(texts) + "\n", encoding="utf-8")
    site.start("--once")
    assert site.proc.wait(timeout=300) == 0, site.logs()
    assert_invariant(site)
    return site


# ------------------------------------------------------------------ crash recovery


def restart_until_finished(site: Site, files: int, *, max_runs: int = 5,
                           after_exit=None) -> list[int]:
    """Start the daemon again each time it dies on its own (as systemd's Restart= would)
    until ``files`` files are finished, then stop it (exit 0 expected). Returns the exit
    statuses of the runs that died; ``after_exit(site)`` checks the state after each."""
    exits: list[int] = []
    for _run in range(max_runs):
        site.start()
        try:
            site.wait_files_finished(files, timeout=90)
        except AssertionError:
            exits.append(site.proc.wait(timeout=30))
            if after_exit is not None:
                after_exit(site)
            continue
        assert site.stop() == 0, site.logs()
        return exits
    raise AssertionError(f"not finished after {max_runs} runs (exits {exits}):\n{site.logs()}")


@dataclass
class Snapshot:
    """What the store and the outbox show at one moment (between two daemon runs)."""

    lines: dict[int, tuple[str, int, int, str | None]]
    """line id → (state, attempts, synth_count, wav)"""
    wavs: dict[str, tuple[int, int]]
    """every complete WAV under the outbox → (inode, mtime_ns)"""
    temps: list[Path]


def snapshot(site: Site) -> Snapshot:
    rows = site.query("SELECT id, state, attempts, synth_count, wav FROM lines") \
        if site.db.exists() else []
    wavs = {}
    for p in site.outbox.rglob("*.wav") if site.outbox.exists() else ():
        st = p.stat()
        wavs[str(p)] = (st.st_ino, st.st_mtime_ns)
    temps = list(site.root.rglob("*.tmp"))
    return Snapshot({r[0]: tuple(r[1:]) for r in rows}, wavs, temps)


def assert_no_redo(before: Snapshot, after: Snapshot) -> None:
    """Nothing finished before a kill was done again after the restart.

    The store shows it: ``attempts`` is raised (and committed) each time a line is
    taken for synthesis, ``synth_count`` when a synthesized WAV is committed as done.
    A line done before the kill keeps both, and its WAV (same inode, same mtime) was
    never rewritten; a WAV renamed into place but not yet committed is adopted as it is.
    Between two starts of the daemon a line is taken at most once more (a crash suspect
    runs alone), and no line is ever counted as synthesized twice.
    """
    for lid, (state, attempts, synth, wav) in before.lines.items():
        now = after.lines.get(lid)
        assert now is not None, f"line {lid} vanished"
        if state == "done":
            assert now == (state, attempts, synth, wav), \
                f"line {lid} was done before the kill, changed after: {(state, attempts, synth)} → {now}"
        assert now[1] - attempts <= 1, f"line {lid} taken {now[1] - attempts} times in one run"
    for path, ident in before.wavs.items():
        assert after.wavs.get(path) == ident, f"{path} was rewritten or removed after the kill"
    for lid, (state, _attempts, synth, _wav) in after.lines.items():
        assert synth <= 1, f"line {lid} synthesized {synth} times"


def helpers_left_after_kill(script: Path, body: str) -> list[int]:
    """Write ``body`` (a program that starts helper processes, then prints "ready" and
    sleeps) to ``script``, run it, kill it with SIGKILL once ready, and return the pids
    of its spawned helpers still running 10 s later (killed before returning, so a
    failing test leaves none behind). At least one helper must have been running."""
    import psutil

    script.write_text(body, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        kids = psutil.Process(proc.pid).children(recursive=True)
        helpers = [k for k in kids if "spawn_main" in " ".join(k.cmdline())]
        assert helpers, [k.cmdline() for k in kids]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(h.is_running() and h.status() != "zombie"
                                              for h in helpers):
        time.sleep(0.2)
    left = [h.pid for h in helpers if h.is_running() and h.status() != "zombie"]
    for pid in left:
        psutil.Process(pid).kill()
    return left

