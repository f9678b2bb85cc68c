"""VITS inference in PyTorch: batched, padded and masked, for Piper voices.

Shapes: B = batch, T = phonemes, F = frames (hop-sized), S = samples. Every module
masks its inputs so that a line inside a padded batch gives the same result as the
line alone. Noise is drawn per line from a counter hash of (line seed, channel,
position), so it never depends on batch-mates or device.

The model (``model.Vits``) has two halves with one data-dependent step between them:
``text_half`` (``encoder`` + ``durations`` → durations) and ``audio_half`` (expand →
``flow`` → ``decoder`` → waveform). The caller reads the lengths in between.
"""

from ttsd.engine.vits.decoder import Generator
from ttsd.engine.vits.model import Vits, VitsArgs

__all__ = ["Generator", "Vits", "VitsArgs"]
