"""A line's audio as the output asks for it: its rate (soxr), its loudness (ITU-R BS.1770-4)
under a true-peak ceiling, and a plain gain.

The engine gives each sentence at its own peak (as Piper does), so lines and sentences
differ in loudness. With ``output.loudness_lufs`` every line is brought to that
integrated loudness, and a look-ahead limiter keeps its true peak (4x oversampled, as
BS.1770 measures it) under ``output.true_peak_dbtp``, so lines of one file and of
different files play at the same level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ttsd.output.wav import int16_floats

BLOCK_S = 0.4
"""BS.1770's gating block: a shorter line is measured over copies of itself."""
HOLD_S = 0.005
"""The limiter's gain steps: each 5 ms block takes the smallest gain of itself and its
neighbours, then the gain is interpolated between block centres (no step, no click)."""


@dataclass(frozen=True)
class Rendered:
    samples: np.ndarray
    """float32 in [-1, 1], or the engine's int16 PCM when nothing was changed."""
    sample_rate: int
    lufs: float | None
    """The integrated loudness measured after rendering (only with a loudness target)."""

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class Levels:
    """What happens to a line's samples between the engine and the encoder."""

    sample_rate: int = 0
    """0: the voice's own rate."""
    loudness_lufs: float = 0.0
    """0: off (each sentence at its own peak, as the voice gives it)."""
    true_peak_dbtp: float = -1.0
    volume: float = 1.0

    @property
    def plain(self) -> bool:
        """Nothing to change: the samples go to the encoder as they are."""
        return not self.sample_rate and not self.loudness_lufs and self.volume == 1.0

    def key(self) -> str:
        """This part of a line's cache key."""
        loud = (f"lufs={self.loudness_lufs!r}/tp={self.true_peak_dbtp!r}"
                if self.loudness_lufs else "lufs=off")
        return f"rate={self.sample_rate}|{loud}|volume={self.volume!r}"

    def render(self, samples: np.ndarray, rate: int, out_rate: int) -> Rendered:
        """``samples`` at ``rate`` brought to ``out_rate`` and the loudness and volume
        asked for."""
        if self.plain and out_rate == rate:
            return Rendered(samples, rate, None)
        audio = int16_floats(samples) if samples.dtype == np.int16 \
            else np.asarray(samples, dtype=np.float32)
        if out_rate != rate:
            audio = resample(audio, rate, out_rate)
        lufs = None
        if self.loudness_lufs:
            audio, lufs = normalize(audio, out_rate, self.loudness_lufs, self.true_peak_dbtp)
        if self.volume != 1.0:
            audio = audio * np.float32(self.volume)
            if lufs is not None:
                lufs += 20 * math.log10(self.volume)
        return Rendered(np.clip(audio, -1.0, 1.0), out_rate, lufs)


def resample(audio: np.ndarray, rate: int, out_rate: int) -> np.ndarray:
    """soxr at its high quality ("HQ"): 4,000x realtime 22.05 → 48 kHz on one core."""
    import soxr
    return soxr.resample(audio, rate, out_rate, quality="HQ").astype(np.float32, copy=False)


def loudness(audio: np.ndarray, rate: int) -> float:
    """Integrated loudness in LUFS per ITU-R BS.1770-4 (K-weighting, 400 ms blocks every
    100 ms, -70 LUFS and -10 LU gates); -inf for silence. pyloudnorm, the reference the
    tests hold it to (within 0.1 LU), loops over the blocks in Python: 250x realtime,
    against this one's thousands. A line shorter than one block is measured over copies
    of itself end to end."""
    from scipy.signal import lfilter
    if len(audio) < BLOCK_S * rate:
        audio = np.tile(audio, math.ceil(BLOCK_S * rate / max(1, len(audio))) + 1)
    b, a = _k_weighting(rate)
    z = lfilter(b, a, audio.astype(np.float64))
    sums = np.concatenate(([0.0], np.cumsum(z * z)))
    n = round((len(audio) / rate - BLOCK_S) / (BLOCK_S * 0.25)) + 1
    j = np.arange(n)
    starts = (BLOCK_S * 0.25 * j * rate).astype(np.int64)
    ends = np.minimum((BLOCK_S * (0.25 * j + 1) * rate).astype(np.int64), len(audio))
    energy = (sums[ends] - sums[starts]) / (BLOCK_S * rate)
    with np.errstate(divide="ignore"):
        block = -0.691 + 10 * np.log10(energy)
    kept = energy[block >= -70.0]
    if not kept.size:
        return -math.inf
    relative = -0.691 + 10 * math.log10(kept.mean()) - 10
    kept = energy[(block >= -70.0) & (block > relative)]
    return -0.691 + 10 * math.log10(kept.mean()) if kept.size else -math.inf


def _k_weighting(rate: int) -> tuple[np.ndarray, np.ndarray]:
    """BS.1770's two K-weighting stages (the high shelf, then the high pass) for
    ``rate``, as one filter: the standard's 48 kHz coefficients re-derived for any
    rate (libebur128's formulas)."""
    k = math.tan(math.pi * 1681.974450955533 / rate)
    q, vh = 0.7071752369554196, 10 ** (3.999843853973347 / 20)
    vb = vh ** 0.4996667741545416
    a0 = 1 + k / q + k * k
    shelf_b = [(vh + vb * k / q + k * k) / a0, 2 * (k * k - vh) / a0,
               (vh - vb * k / q + k * k) / a0]
    shelf_a = [1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]
    k = math.tan(math.pi * 38.13547087602444 / rate)
    q = 0.5003270373238773
    a0 = 1 + k / q + k * k
    pass_a = [1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]
    return np.convolve(shelf_b, [1.0, -2.0, 1.0]), np.convolve(shelf_a, pass_a)


def true_peak(audio: np.ndarray, rate: int) -> np.ndarray:
    """|samples| 4x oversampled (BS.1770-4 Annex 2), as an array at 4x the rate."""
    import soxr
    return np.abs(soxr.resample(audio, rate, 4 * rate, quality="HQ"))


def normalize(audio: np.ndarray, rate: int, target: float, ceiling_dbtp: float
              ) -> tuple[np.ndarray, float | None]:
    """``audio`` at ``target`` LUFS with its true peak under ``ceiling_dbtp``; returns it
    and its loudness measured after. Silence stays silence (None)."""
    measured = loudness(audio, rate)
    if not math.isfinite(measured):
        return audio, None
    out = audio * np.float32(10 ** ((target - measured) / 20))
    ceiling = 10 ** (ceiling_dbtp / 20)
    for _ in range(2):   # the limiter takes a little loudness: make it up once
        out = limit(out, rate, ceiling)
        after = loudness(out, rate)
        if abs(after - target) < 0.1 or not math.isfinite(after):
            break
        out = out * np.float32(10 ** ((target - after) / 20))
    out = limit(out, rate, ceiling)
    return out, loudness(out, rate)


def limit(audio: np.ndarray, rate: int, ceiling: float) -> np.ndarray:
    """A look-ahead limiter: the gain of each 5 ms block brings its true peak to the
    ceiling, held over its neighbours and ramped linearly between block centres, so a
    peak is turned down from one block before it to one after it."""
    peaks = true_peak(audio, rate)
    if peaks.max(initial=0.0) <= ceiling:
        return audio
    block = max(1, int(HOLD_S * rate))
    n = math.ceil(len(audio) / block)
    over = np.zeros(n * block * 4, dtype=np.float32)
    over[:len(peaks)] = peaks[:n * block * 4]
    gain = np.minimum(1.0, ceiling / np.maximum(over.reshape(n, -1).max(axis=1), 1e-9))
    held = gain.copy()
    held[1:] = np.minimum(held[1:], gain[:-1])
    held[:-1] = np.minimum(held[:-1], gain[1:])
    # a block's own gain also bounds its edges: the ramp never rises above it inside it
    centres = (np.arange(n) + 0.5) * block
    g = np.interp(np.arange(len(audio)), centres, held).astype(np.float32)
    g = np.minimum(g, np.repeat(held, block)[:len(audio)])
    return audio * g
