"""The model step: runs a prepared batch through the engine.

Both halves one after the other, or (``overlap_halves``, the default on a GPU) only the
audio half, the feeder having run the text half (``Engine.plan``, on a side stream)
beside the previous batch's audio half.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ttsd.engine.records import Result
from ttsd.engine.runtime import Engine
from ttsd.pipeline.batcher import Batch


class Synth:
    """Runs prepared batches through the engine (the only thread touching the GPU)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, batch: Batch, emit: Callable[[Batch], None] | None = None) -> Batch:
        """Both halves, or the audio half of a batch the feeder planned; ``model_ms``
        counts both halves either way. ``emit``: called with each piece of the batch
        (``Batch.piece``) whose lines are complete before the batch is, so that the sink
        writes them while the model runs the rest; the returned batch holds the rest.
        A piece is sent when the next one is ready, so the last call's lines come with
        the batch itself (one transaction, not an extra one for the stats alone)."""
        if batch.prepared:
            t0 = time.perf_counter()
            held: list[Result] = []

            def stream(results: list[Result]) -> None:
                nonlocal held
                if held:
                    emit(batch.piece(held))
                held = results

            use = stream if emit is not None else None
            if batch.plan is not None:
                results, batch.stats = self.engine.finish(batch.plan, use)
                batch.plan = None   # frees the text half's tensors
                text_ms = batch.stats.text_ms
            else:
                results, batch.stats = self.engine.run(batch.prepared, use)
                text_ms = 0.0
            batch.results = held + results
            if self.engine.device.type == "cuda":
                import torch
                torch.cuda.synchronize(self.engine.device)
            batch.model_ms = (time.perf_counter() - t0) * 1000 + text_ms
        return batch
