"""Fault injection for tests: off unless the environment variable TTSD_FAULTS is set.

With ``TTSD_FAULTS=1``, a token ``{{fault:NAME}}`` or ``{{fault:NAME:ARG}}`` in a
line's text (removed before phonemizing) makes the engine misbehave for that line:

- ``oom:K``  — a fake CUDA out-of-memory error whenever a sub-batch holding the line
  has more than K items (exercises the halve-and-retry path);
- ``oomtokens`` — a fake out-of-memory error, every time, while the text half's
  outputs of the line's batch are joined (the batch's lines fail, the engine goes on);
- ``nan``    — the decoder's output for the line holds NaN;
- ``long``   — the line predicts runaway audio (over its cap);
- ``hang``   — the model call sleeps for ARG seconds (default 3600);
- ``slow``   — the model call sleeps ARG milliseconds (default 500);
- ``sticky`` — a fake "illegal memory access" (a device that must be restarted);
- ``exit``   — the process dies at once with status 137 (like ``kill -9``).

``TTSD_FAULTS=fast`` additionally replaces the neural model with a fast stand-in
(a quiet tone whose length follows the text) for pipeline load tests.
When the variable is unset, ``from_env()`` returns None and nothing here runs.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

TOKEN = re.compile(r"\{\{fault:([a-z]+)(?::(\d+))?\}\}")


class Faults:
    def __init__(self, fast: bool = False) -> None:
        self.fast = fast

    def strip(self, text: str) -> tuple[str, str | None]:
        m = TOKEN.search(text)
        if not m:
            return text, None
        arg = f":{m.group(2)}" if m.group(2) else ""
        return TOKEN.sub("", text).strip() or "fault", m.group(1) + arg

    @staticmethod
    def _kind(fault: str | None) -> tuple[str | None, int | None]:
        if not fault:
            return None, None
        name, _, arg = fault.partition(":")
        return name, int(arg) if arg else None

    def before_run(self, prepared: Sequence[Any]) -> None:
        for p in prepared:
            name, arg = self._kind(p.fault)
            if name == "exit":
                os._exit(137)
            if name == "hang":
                time.sleep(arg or 3600)
            if name == "slow":
                time.sleep((arg or 500) / 1000)
            if name == "sticky":
                raise RuntimeError("CUDA error: an illegal memory access was encountered "
                                   "(injected by TTSD_FAULTS)")
        # "nan" and "long" take effect inside Engine (decoder output, runaway guard).

    def check(self, prepared: Sequence[Any], chunk: Sequence[Any], stage: str) -> None:
        if stage == "tokens":
            if any(prepared[it.line].fault == "oomtokens" for it in chunk):
                raise torch.OutOfMemoryError("CUDA out of memory (injected: oomtokens)")
            return
        if stage != "audio":
            return
        for it in chunk:
            name, arg = self._kind(prepared[it.line].fault)
            if name == "oom" and len(chunk) > (arg if arg is not None else 1):
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (injected: {len(chunk)} items > {arg})")


def from_env() -> Faults | None:
    value = os.environ.get("TTSD_FAULTS", "")
    if not value or value == "0":
        return None
    return Faults(fast=value == "fast")


def stand_in_audio(text: str, sample_rate: int):
    """The fast stand-in model's output: a quiet 220 Hz tone, 60 ms per character."""
    import numpy as np

    n = max(1, int(0.06 * len(text) * sample_rate))
    t = np.arange(n, dtype=np.float32) / sample_rate
    return (0.1 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
