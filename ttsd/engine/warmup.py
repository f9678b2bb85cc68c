"""The rest of a warm-up, done while the engine has nothing else to do.

A fresh engine runs one line at once (what the first line needs: its kernels loaded,
the smallest shapes set up), and queues the rest: the text half's CUDA graphs, the
bigger batch sizes and the audio half's call shapes (on an H100, 148 shapes and 48
graphs: about 15 s). The daemon's model thread takes one step at a time when no batch
is waiting, so it is ready in seconds, and a batch that comes meanwhile runs at once:
a shape not warmed yet is set up when that batch first uses it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ttsd.errors import DeviceLostError
from ttsd.log import get_logger

log = get_logger(__name__)


class Warmup:
    """Steps (a label and a function each) run one at a time, in order."""

    def __init__(self, voice: str) -> None:
        self.voice = voice
        self.steps: deque[tuple[str, Callable[[], object]]] = deque()
        self.seconds = 0.0
        self.done_steps = 0

    def add(self, label: str, fn: Callable[[], object]) -> None:
        self.steps.append((label, fn))

    def __len__(self) -> int:
        return len(self.steps)

    def step(self, budget_s: float = 0.05) -> bool:
        """Run steps for about ``budget_s`` (at least one); whether any are left. A step
        that fails (out of memory, say) ends the warm-up, logged: what is not warmed is
        set up when first used. A lost device is raised, as from a batch."""
        t0 = time.perf_counter()
        while self.steps:
            label, fn = self.steps.popleft()
            try:
                fn()
            except DeviceLostError:
                raise
            except Exception as exc:  # noqa: BLE001 - the rest is set up when first used
                log.warning("engine.warmup_stopped", voice=self.voice, step=label,
                            error=f"{type(exc).__name__}: {str(exc)[:300]}")
                self.steps.clear()
            self.done_steps += 1
            if time.perf_counter() - t0 >= budget_s:
                break
        self.seconds += time.perf_counter() - t0
        if not self.steps:
            log.info("engine.warm", voice=self.voice, steps=self.done_steps,
                     seconds=round(self.seconds, 2))
        return bool(self.steps)
