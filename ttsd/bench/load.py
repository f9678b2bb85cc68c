"""Load benchmark (docs/reliability.md: one-big-file and burst-of-files): the real daemon
under a big input.

``run_load`` starts ``ttsd run`` as a subprocess on a temporary site with the fast
tone model (``TTSD_MODEL=tone``: a tone whose length follows the text, so the
numbers measure the pipeline - watch, claim, parse, store, batch, write - not the
voice), drops either one file of ``lines`` lines or ``files`` files of ``lines`` lines
each at once, and while it runs samples:

- the daemon's RSS (psutil, every ``sample_s``): peak and the RSS once the model was
  loaded, before the drop (the baseline the input adds to);
- time from the drop to the first WAV, and to the last line recorded;
- lines per second through the pipeline (done rows / time from drop to last commit);
- ``ttsd status --json`` response time, called in a loop (p50, max).

Nothing here is mocked: real files, real SQLite, the daemon's own threads.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from ttsd.errors import ConfigError
from ttsd.store.errors import OperationalError
from ttsd.store.journal import Store

T = TypeVar("T")

CONFIG = """[input]
settle_s = 0.2
rescan_s = 2.0
[engine]
device = "cpu"
dtype = "float32"
warmup = false
[batching]
max_batch_size = {batch}
max_wait_ms = 5
[daemon]
heartbeat_s = 0.5
"""


def _write_inputs(staging: Path, lines: int, files: int) -> int:
    """One file of ``lines`` lines (files == 0) or ``files`` files of ``lines`` each."""
    staging.mkdir(parents=True, exist_ok=True)
    count = max(1, files)
    for f in range(count):
        name = "big.txt" if files == 0 else f"f{f:05d}.txt"
        with open(staging / name, "w", encoding="utf-8") as out:
            out.writelines(f"File {f} line {i}: the quick brown fox, number {i * 7 % 1000}.\n"
                           for i in range(lines))
    return count * lines


def _read(db: Path, read: Callable[[Store], T]) -> T:
    """One read of the daemon's journal through a read-only connection of its own
    (ConfigError while the journal does not exist yet)."""
    store = Store(db, readonly=True)
    try:
        return read(store)
    finally:
        store.close()


def _wait_started(log: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while "daemon.started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"daemon did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _tree_rss(ps: psutil.Process) -> int:
    """RSS of the daemon plus its children (the phonemizer processes)."""
    total = ps.memory_info().rss
    for child in ps.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:   # a recycled process exiting
            pass
    return total


def run_load(lines: int = 10_000, files: int = 0, *, batch: int = 32, root: Path | None = None,
             sample_s: float = 0.05, status_every_s: float = 0.5, timeout_s: float = 1800,
             keep: bool = False) -> dict[str, Any]:
    """Run one load and return its numbers (see the module docstring)."""
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="ttsd-load-")) if root is None else Path(root)
    try:
        return _run(root, lines, files, batch, sample_s, status_every_s, timeout_s)
    finally:
        if own and not keep:
            shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, lines: int, files: int, batch: int, sample_s: float,
         status_every_s: float, timeout_s: float) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.toml"
    cfg.write_text(CONFIG.format(batch=batch), encoding="utf-8")
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    total = _write_inputs(root / "staging", lines, files)
    db = root / "state" / "ttsd.db"
    log = root / "daemon.log"
    env = {**os.environ, "TTSD_MODEL": "tone"}
    cmd = [sys.executable, "-m", "ttsd.cli", "--config", str(cfg)]
    with open(log, "w") as err:
        proc = subprocess.Popen([*cmd, "run"], cwd=root, stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
    try:
        _wait_started(log, proc, 120)
        ps = psutil.Process(proc.pid)
        rss_idle = _tree_rss(ps)
        samples: list[tuple[float, int]] = []
        status_ms: list[float] = []
        status_fail = 0
        stop = threading.Event()

        def status_loop() -> None:
            nonlocal status_fail
            while not stop.is_set():
                t0 = time.perf_counter()
                out = subprocess.run([*cmd, "status", "--json"], cwd=root, env=env,
                                     capture_output=True, timeout=60, check=False)
                status_ms.append((time.perf_counter() - t0) * 1000)
                status_fail += out.returncode != 0
                stop.wait(status_every_s)

        poller = threading.Thread(target=status_loop, daemon=True)
        t_drop = time.perf_counter()
        for p in sorted((root / "staging").iterdir()):
            os.rename(p, root / "inbox" / p.name)
        poller.start()
        first_wav = None
        still_parsing = 0
        finished = None
        deadline = time.time() + timeout_s
        last_check = 0.0
        while time.time() < deadline:
            now = time.perf_counter()
            samples.append((now - t_drop, _tree_rss(ps)))
            if first_wav is None and any((root / "outbox").rglob("*.wav")):
                first_wav = now - t_drop
                still_parsing = _read(db, lambda s: s.file_states().parsing)
            if now - last_check > 0.5:
                last_check = now
                try:
                    states = _read(db, Store.file_states)
                    n = states.done + states.failed
                except (ConfigError, OperationalError):   # no journal, or no tables yet
                    n = 0
                if n >= max(1, files):
                    finished = now - t_drop
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{log.read_text()[-3000:]}")
            time.sleep(sample_s)
        stop.set()
        poller.join(timeout=60)
        if finished is None:
            raise RuntimeError(f"not finished in {timeout_s}s")
        lines_by_state = _read(db, Store.line_states)
        done, failed = lines_by_state.done, lines_by_state.failed
        t_last = _read(db, Store.work_span)
        peak = max(r for _t, r in samples)
        return {
            "lines": total, "files": max(1, files), "batch": batch,
            "done": done, "failed": failed,
            "rss_idle_mb": round(rss_idle / 2**20, 1),
            "rss_peak_mb": round(peak / 2**20, 1),
            "rss_growth_mb": round((peak - rss_idle) / 2**20, 1),
            "first_wav_s": round(first_wav, 3) if first_wav is not None else None,
            "first_wav_while_parsing": bool(still_parsing),
            "finished_s": round(finished, 2),
            "lines_per_s": round(done / t_last, 1) if t_last else None,
            "status_calls": len(status_ms), "status_failures": status_fail,
            "status_p50_ms": round(statistics.median(status_ms), 1) if status_ms else None,
            "status_max_ms": round(max(status_ms), 1) if status_ms else None,
            "rss_timeline_mb": [(round(t, 2), round(r / 2**20, 1))
                                for t, r in samples[:: max(1, len(samples) // 40)]],
        }
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def render(r: dict[str, Any]) -> str:
    return (f"{r['lines']:,} lines in {r['files']:,} file(s): {r['done']:,} done, "
            f"{r['failed']:,} failed in {r['finished_s']} s\n"
            f"  peak RSS {r['rss_peak_mb']} MB (idle {r['rss_idle_mb']} MB, "
            f"+{r['rss_growth_mb']} MB)\n"
            f"  first WAV after {r['first_wav_s']} s; {r['lines_per_s']:,} lines/s "
            f"(fast stand-in model)\n"
            f"  ttsd status: p50 {r['status_p50_ms']} ms, max {r['status_max_ms']} ms "
            f"over {r['status_calls']} calls ({r['status_failures']} failed)")


if __name__ == "__main__":  # python -m ttsd.bench.load LINES [FILES]
    import json
    args = [int(a) for a in sys.argv[1:]]
    res = run_load(*args) if args else run_load()
    print(render(res))
    print(json.dumps({k: v for k, v in res.items() if k != "rss_timeline_mb"}))
