"""Faults on demand: an engine that misbehaves for the lines that ask for it.

A token ``{{fault:NAME}}`` or ``{{fault:NAME:ARG}}`` in a line's text (removed before
phonemizing; the line's request keeps it) makes ``FaultyEngine`` misbehave for it:

- ``oom:K``  — an out-of-memory error whenever an audio call holding the line has more
  than K rows (exercises the halve-and-retry path);
- ``oomtokens`` — an out-of-memory error, every time, while the text half's outputs
  of the line's batch are joined (the batch's lines fail, the engine goes on);
- ``nan``    — the decoder's samples for the line are NaN (not those of the float32
  retry: a half-precision engine on a GPU retries it successfully);
- ``long``   — the line's durations are a thousand times too long (runaway audio);
- ``hang``   — the audio half of its batch starts after ARG seconds (default 3600);
- ``slow``   — ... after ARG milliseconds (default 500);
- ``sticky`` — an "illegal memory access" (a device that must be restarted);
- ``exit``   — the process dies at once with status 137 (like ``kill -9``).

The model's faults come from ``FaultyModel``, a ``VoiceModel`` around the real one; the
rest happen where a batch's audio half starts (``FaultyEngine.finish``). Only the fault
is injected: the engine's own code handles it. The daemons the tests start build this
engine through ``$TTSD_ENGINE_FACTORY`` (``harness.FAULTS``), and so do their worker
processes and Ray actors.

``CrashingPhonemizer`` is a phonemizer process's front end that dies on one text.

Loading this module also arms the crash point ``$TTSD_CRASH_AT`` names (``NAME`` or
``NAME:N``, the N-th visit; ``ttsd.crash``), so a daemon started with
``harness.crash_env(SPEC)`` dies there as ``kill -9`` would.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from ttsd import crash
from ttsd.engine.device import device_errors
from ttsd.engine.model import VoiceModel, load_voice_model
from ttsd.engine.options import EngineOptions
from ttsd.engine.phonemes import Phonemizer
from ttsd.engine.plan import Plan, line_seed
from ttsd.engine.records import Prepared, Request, Result, RunStats, Stream
from ttsd.engine.runtime import Engine
from ttsd.engine.tone import ToneEngine
from ttsd.engine.voice import VoiceInfo

TOKEN = re.compile(r"\{\{fault:([a-z]+)(?::(\d+))?\}\}")

RUNAWAY = 1000
"""``long``: the line's durations times this."""

Fault = tuple[str, "int | None"]

_spec = os.environ.get("TTSD_CRASH_AT", "")
if _spec:
    _name, _, _nth = _spec.partition(":")
    crash.arm(_name, int(_nth) if _nth.isdigit() else 1)


def fault_of(text: str) -> Fault | None:
    """The first fault token of ``text``: (name, argument or None)."""
    m = TOKEN.search(text)
    return (m.group(1), int(m.group(2)) if m.group(2) else None) if m else None


def strip(text: str) -> str:
    """``text`` without its fault tokens, as it is phonemized."""
    return TOKEN.sub("", text).strip() or "fault"


class OutOfMemoryWhenJoined(torch.Tensor):
    """Text-half outputs that cannot be joined: ``torch.cat`` runs out of memory."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        if func is torch.cat:
            raise torch.OutOfMemoryError("CUDA out of memory (injected: oomtokens)")
        return super().__torch_function__(func, types, args, kwargs or {})


class FaultyModel:
    """A ``VoiceModel`` that misbehaves on the rows whose seeds ``faults`` holds."""

    def __init__(self, inner: VoiceModel, faults: dict[int, Fault]) -> None:
        self.inner, self.faults = inner, faults

    @property
    def hop(self) -> int:
        return self.inner.hop

    @property
    def channels(self) -> int:
        return self.inner.channels

    def place(self, device: torch.device, dtype: torch.dtype, keep_float32: bool) -> Any:
        return self.inner.place(device, dtype, keep_float32)

    def __getattr__(self, name: str) -> Any:   # the rest of the model's own (``tone``)
        return getattr(self.inner, name)

    def _rows(self, seeds: torch.Tensor) -> list[Fault | None]:
        return [self.faults.get(s) for s in seeds.tolist()]

    def text_frames(self, ids, lengths, sid, seeds, noise_w, length_scale):
        m, logs, dur, frames = self.inner.text_frames(ids, lengths, sid, seeds, noise_w,
                                                      length_scale)
        rows = self._rows(seeds)
        names = [f[0] if f else None for f in rows]
        if "long" in names:
            scale = torch.tensor([RUNAWAY if n == "long" else 1 for n in names],
                                 device=dur.device)
            dur = dur * scale.unsqueeze(1)
            frames = dur.sum(1).clamp_min(1)
        if "oomtokens" in names:
            m = m.as_subclass(OutOfMemoryWhenJoined)
        return m, logs, dur, frames

    def audio_half(self, m, logs, durations, frames, max_frames, sid, seeds, noise_scale,
                   fallback=None):
        rows = self._rows(seeds)
        if fallback is None:
            for f in rows:
                if f and f[0] == "oom" and m.size(0) > (f[1] if f[1] is not None else 1):
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory (injected: {m.size(0)} rows > {f[1]})")
        out = self.inner.audio_half(m, logs, durations, frames, max_frames, sid, seeds,
                                    noise_scale, fallback)
        nan = [bool(f) and f[0] == "nan" for f in rows]
        if fallback is None and any(nan):
            bad = torch.tensor(nan, device=out.device).unsqueeze(1)
            out = torch.where(bad, torch.nan, out)
        return out


class FaultyEngine(Engine):
    """The engine, with the faults its lines' tokens ask for (see the module)."""

    def __init__(self, options: EngineOptions) -> None:
        self.by_seed: dict[int, Fault] = {}
        """The faulty sentences' noise seeds (``plan.line_seed``) → their fault."""
        super().__init__(options, models=self._model)

    def _model(self, info: VoiceInfo, options: EngineOptions) -> tuple[VoiceModel, str]:
        model, digest = load_voice_model(info, options)
        return FaultyModel(model, self.by_seed), digest

    def prepare(self, requests: Sequence[Request]) -> list[Prepared]:
        out = super().prepare([dataclasses.replace(r, text=strip(r.text))
                               if fault_of(r.text) else r for r in requests])
        for p, r in zip(out, requests):
            p.request = r   # the line as it was given: its seed and cap count the token
            fault = fault_of(r.text)
            if fault:
                for si in range(len(p.sentences)):
                    self.by_seed[line_seed(r.seed, r.text, si)] = fault
        return out

    def finish(self, plan: Plan, stream: Stream | None = None
               ) -> tuple[list[Result], RunStats]:
        for p in plan.prepared:
            name, arg = fault_of(p.request.text) or (None, None)
            if name == "exit":
                os._exit(137)
            if name == "hang":
                time.sleep(arg or 3600)
            if name == "slow":
                time.sleep((arg or 500) / 1000)
            if name == "sticky":
                with device_errors():
                    raise RuntimeError("CUDA error: an illegal memory access was "
                                       "encountered (injected)")
        return super().finish(plan, stream)


class FaultyToneEngine(FaultyEngine, ToneEngine):
    """``FaultyEngine`` over the tone model's engine (its audio half makes no calls of
    the model: ``oom`` and ``nan`` do nothing there)."""


def engine(options: EngineOptions) -> Engine:
    """``$TTSD_ENGINE_FACTORY``'s default: the engine with faults."""
    return FaultyToneEngine(options) if options.model == "tone" else FaultyEngine(options)


def overlapped(options: EngineOptions) -> Engine:
    """The engine with its halves overlapped in the daemon even on the CPU."""
    return Engine(dataclasses.replace(options, overlap_halves="on"))


CRASH_TEXT = "{{fault:phonemizer-crash}}"


class CrashingPhonemizer(Phonemizer):
    """A phonemizer process's front end that dies on ``CRASH_TEXT`` (as espeak-ng's
    segfault would)."""

    def sentences(self, text: str) -> list[list[int]]:
        if text == CRASH_TEXT:
            os._exit(139)
        return super().sentences(text)
