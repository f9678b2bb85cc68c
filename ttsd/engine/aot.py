"""A voice's two halves compiled ahead of time (AOTInductor), once per machine.

``torch.compile`` traces the model again in every new process: on an H100 a warm
restart (its kernels in the compile cache) spent 44 of its 70 s tracing and compiling
the halves before the first batch (2026-12-07). Instead, the first start exports each
half with dynamic rows, tokens and frames and compiles it into a package
(``torch._inductor.aoti_compile_and_package``); every later start loads the package
(a shared library and its weights) and runs it without tracing anything.

Packages live in the per-user cache beside the converted voices (``compiled/``), named
by a key of everything that makes them valid: the voice file's digest, the half, the
dtype, the GPU and its compute capability, the torch and CUDA versions and the source
of the model code. A change to any of them is a new file; an unreadable file is built
again; one not loaded for 30 days is removed when another is built. Building takes a
lock, so that workers of one host build each package once. Any failure is logged and
the caller compiles just in time as before.

A failure can also be a crash inside torch's native loader, which no ``except`` can
catch: on an H100 with torch 2.11 (CUDA 13.0) loading the audio package killed the
process with SIGSEGV, so a daemon set to "ahead" died at every start (2026-12-07). So
a package is first loaded by a short-lived child process; only one that loaded there
is loaded by the engine, and the verdict is kept beside the package (``.NAME.ok`` or
``.NAME.crashed``), so each package is tried once per machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ttsd.log import get_logger

log = get_logger(__name__)

AOT_VERSION = 1
"""Bump when what is exported (the wrappers below, their inputs) changes."""


@functools.cache
def _source_digest() -> str:
    """The model code a package is compiled from (``ttsd/engine/vits``), hashed."""
    h = hashlib.sha256(str(AOT_VERSION).encode())
    for f in sorted((Path(__file__).parent / "vits").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def package_key(digest: str, half: str, device: torch.device, dtype: torch.dtype) -> str:
    """The name of a package: what it was compiled for, hashed."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        where = f"{p.name} sm{p.major}{p.minor} cuda{torch.version.cuda}"
    else:
        where = "cpu"
    facts = [digest, half, str(dtype), where, torch.__version__, _source_digest()]
    return f"{half}-{hashlib.sha256(chr(10).join(facts).encode()).hexdigest()[:32]}"


class _Half(torch.nn.Module):
    """One half of a VITS model, to export: only the submodules it runs (``parts``, and
    the speaker table when there is one), and the model's methods it calls bound to it,
    so that the package holds that half's weights and no others."""

    def __init__(self, model: Any, parts: tuple[str, ...], methods: tuple[str, ...]) -> None:
        super().__init__()
        self.args = model.args
        for name in (*parts, "emb_g"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        for name in ("speaker", *methods):
            setattr(self, name, getattr(type(model), name).__get__(self))


class _Audio(_Half):
    """The audio half with ``max_frames`` carried as the length of ``axis`` (an export
    takes tensors, whose sizes may vary; an int would be fixed at its example value)."""

    def __init__(self, model: Any) -> None:
        super().__init__(model, ("flow", "dec"), ("audio_half",))

    def forward(self, m_p, logs_p, durations, frames, axis, sid, seeds, noise_scale):
        return self.audio_half(m_p, logs_p, durations, frames, axis.size(0), sid, seeds,
                               noise_scale)


class _Text(_Half):
    """The text half (``text_frames``): the encoder and the duration predictor."""

    def __init__(self, model: Any) -> None:
        super().__init__(model, ("enc_p", "dp"), ("text_half", "text_frames"))

    def forward(self, ids, lengths, sid, seeds, noise_w, length_scale):
        return self.text_frames(ids, lengths, sid, seeds, noise_w, length_scale)


def _examples(half: str, model: Any, device: torch.device) -> tuple[tuple, tuple]:
    """Example inputs (sizes ≥ 2, as export wants) and the dynamic size of each axis."""
    from torch.export import Dim

    rows, tokens, frames = Dim("rows", min=1, max=8192), Dim("tokens", min=1, max=1 << 16), \
        Dim("frames", min=1, max=1 << 20)
    b = 4
    long = {"dtype": torch.long, "device": device}
    if half == "audio":
        c, t, f = model.channels, 16, 128
        args = (torch.zeros(b, c, t, device=device), torch.zeros(b, c, t, device=device),
                torch.full((b, t), f // t, **long), torch.full((b,), f, **long),
                torch.empty(f, dtype=torch.uint8, device=device), torch.zeros(b, **long),
                torch.arange(b, device=device), torch.full((b,), 0.667, device=device))
        dims = ({0: rows, 2: tokens}, {0: rows, 2: tokens}, {0: rows, 1: tokens}, {0: rows},
                {0: frames}, {0: rows}, {0: rows}, {0: rows})
        return args, dims
    # The encoder's relative attention needs more tokens than its window on either
    # side to trace one graph; the engine pads the text half's tokens to 16 or more.
    tokens = Dim("text_tokens", min=16, max=1 << 16)
    t = 48
    ids = torch.randint(1, 50, (b, t), **long)
    args = (ids, torch.tensor([t, t - 8, t - 16, t - 24], **long), torch.zeros(b, **long),
            torch.arange(b, device=device), torch.full((b,), 0.8, device=device),
            torch.ones(b, device=device))
    return args, ({0: rows, 1: tokens}, {0: rows}, {0: rows}, {0: rows}, {0: rows}, {0: rows})


def _build(half: str, model: Any, device: torch.device, path: Path) -> None:
    module = (_Audio if half == "audio" else _Text)(model).eval()
    # The engine loads voices inside inference mode, whose tensors export refuses.
    with torch.inference_mode(False), torch.no_grad():
        args, dims = _examples(half, model, device)
        program = torch.export.export(module, args, dynamic_shapes=dims, strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")   # must end in .pt2
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
            os.replace(tmp, path)
            for old in _verdicts(path):
                old.unlink(missing_ok=True)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _load(path: Path, device: torch.device) -> Any:
    from torch._inductor.package import load_package

    # Single-threaded: each half is run by one thread at a time, and replays inside
    # the engine's CUDA graphs (the runner's own locking does not belong in a capture).
    return load_package(str(path), run_single_threaded=True,
                        device_index=device.index if device.index is not None else -1)


def compiled_half(half: str, model: Any, digest: str, device: torch.device,
                  dtype: torch.dtype, folder: Path) -> Callable[..., Any] | None:
    """The ``half`` ("audio" or "text") of ``model`` (placed on ``device``) as a loaded
    package, built first if this machine has none; a function with the signature of
    ``model.audio_half`` / ``model.text_frames``. None if it cannot be had (logged)."""
    path = folder / f"{package_key(digest, half, device, dtype)}.pt2"
    t0 = time.perf_counter()
    built = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        runner = None
        if path.is_file() and _verdicts(path)[0].is_file():   # loaded by a child before
            runner = _try_load(path, device)
        if runner is None:
            with open(folder / f".{path.stem}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)   # another process may be building it
                if path.is_file():
                    runner = _try_load(path, device)
                if runner is None:
                    _build(half, model, device, path)
                    built = True
                    _probe(path, device)
                    runner = _load(path, device)
    except Exception as exc:  # noqa: BLE001 - any failure: compiled just in time instead
        log.warning("engine.aot_unavailable", half=half, package=str(path),
                    error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return None
    log.info("engine.aot_loaded", half=half, built=built,
             seconds=round(time.perf_counter() - t0, 2))
    with contextlib.suppress(OSError):
        os.utime(path)   # in use: kept by ``_remove_stale``
    if built:
        _remove_stale(folder)
    if half == "text":
        return runner
    axis = torch.empty(0, dtype=torch.uint8, device=device)

    def audio_half(m_p, logs_p, durations, frames, max_frames, sid, seeds, noise_scale):
        nonlocal axis
        if axis.numel() < max_frames:   # grows outside graph captures: warm-up sizes it
            axis = torch.empty(max(max_frames, 2 * axis.numel()), dtype=torch.uint8,
                               device=device)
        return runner(m_p, logs_p, durations, frames, axis[:max_frames], sid, seeds,
                      noise_scale)
    return audio_half


STALE_S = 30 * 86400
"""A package not loaded for this long (another torch, another model source, a GPU no
longer here) is removed when a new one is built, with its lock file."""


def _remove_stale(folder: Path) -> None:
    cutoff = time.time() - STALE_S
    for f in folder.glob("*.pt2"):
        with contextlib.suppress(OSError):
            if f.stat().st_mtime < cutoff:
                f.unlink()
                for kept in (folder / f".{f.stem}.lock", *_verdicts(f)):
                    kept.unlink(missing_ok=True)


def _try_load(path: Path, device: torch.device) -> Any:
    """A package loaded (after a child process loaded it: ``_probe``), or None after
    removing one that cannot be (damaged, or made by another build of the same
    versions). PackageCrashed: the package crashes the loader; building it again would
    make the same package."""
    try:
        _probe(path, device)
        return _load(path, device)
    except PackageCrashed:
        raise
    except Exception as exc:  # noqa: BLE001 - built again by the caller
        log.warning("engine.aot_rebuild", package=str(path), error=str(exc)[:300])
        with contextlib.suppress(OSError):
            path.unlink()
        return None


class PackageCrashed(RuntimeError):
    """A package killed (or hung) the process that loaded it."""


PROBE_TIMEOUT_S = 300.0
LOAD_FAILED = 3
"""The probe's exit status when loading raised an exception (a damaged package)."""


def _verdicts(path: Path) -> tuple[Path, Path]:
    """The markers of a package that loaded in a child process, or crashed it."""
    return path.with_name(f".{path.stem}.ok"), path.with_name(f".{path.stem}.crashed")


def _probe(path: Path, device: torch.device) -> None:
    """Load the package in a child process first, once per package: the loader's
    native code can crash where an exception was due. PackageCrashed if it died or
    hung (kept: later starts skip the package at once); RuntimeError (the caller
    builds it again) if loading raised an exception."""
    ok, crashed = _verdicts(path)
    if ok.is_file():
        return
    if crashed.is_file():
        raise PackageCrashed(crashed.read_text(encoding="utf-8", errors="replace").strip())
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [src, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", "ttsd.engine.aot", str(path), str(device)],
                              capture_output=True, text=True, env=env, check=False,
                              timeout=PROBE_TIMEOUT_S)
        rc, tail = done.returncode, (done.stderr.strip().splitlines() or [""])[-1][:300]
    except subprocess.TimeoutExpired:
        rc, tail = None, ""
    if rc == 0:
        ok.touch()
        return
    if rc == LOAD_FAILED:
        raise RuntimeError(tail)
    why = (f"loading it hung a test process for {PROBE_TIMEOUT_S:.0f} s" if rc is None else
           f"loading it killed a test process ({_signal_name(-rc)})" if rc < 0 else
           f"loading it ended a test process with exit status {rc}") + \
        f" (torch {torch.__version__}); compiled just in time instead"
    crashed.write_text(why + (f": {tail}" if tail else "") + "\n", encoding="utf-8")
    raise PackageCrashed(why)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _probe_main(path: str, device: str) -> int:
    try:
        _load(Path(path), torch.device(device))
    except Exception as exc:  # noqa: BLE001 - reported to the parent by the exit status
        print(f"{type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return LOAD_FAILED
    return 0


if __name__ == "__main__":   # the probe: python -m ttsd.engine.aot PACKAGE DEVICE
    sys.exit(_probe_main(*sys.argv[1:3]))
