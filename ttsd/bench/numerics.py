"""How close reduced precision comes to float32 (STFT magnitudes), and the roofline
of the model on this device."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from ttsd.output.wav import int16_floats

H100_SXM = {"name": "H100 SXM", "bf16_tflops": 989.0, "fp16_tflops": 989.0,
            "tf32_tflops": 494.0, "fp32_tflops": 67.0, "hbm_tb_s": 3.35}
"""Dense peak numbers from NVIDIA's H100 SXM datasheet (no sparsity)."""


def stft_mag(a: np.ndarray, n_fft: int = 1024, hop: int = 256) -> np.ndarray:
    if len(a) < n_fft:
        a = np.pad(a, (0, n_fft - len(a)))
    frames = np.lib.stride_tricks.sliding_window_view(a, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1))


def floats(audio: np.ndarray) -> np.ndarray:
    """The engine's int16 PCM (``pcm16``) as the floats it stands for."""
    return int16_floats(audio) if audio.dtype == np.int16 else audio


def quality(ref: list, other: list) -> dict[str, Any]:
    same_len = sum(len(a.audio) == len(b.audio) for a, b in zip(ref, other)
                   if a.audio is not None and b.audio is not None)
    errs = []
    for a, b in zip(ref, other):
        if a.audio is None or b.audio is None or len(a.audio) != len(b.audio):
            continue
        ma, mb = stft_mag(floats(a.audio)), stft_mag(floats(b.audio))
        errs.append(float(np.linalg.norm(ma - mb) / max(np.linalg.norm(ma), 1e-9)))
    return {"lines": len(ref), "same_length": same_len,
            "stft_rel_error_mean": round(statistics.fmean(errs), 5) if errs else None,
            "stft_rel_error_max": round(max(errs), 5) if errs else None}


def roofline(model, sample_rate: int, tokens_per_audio_s: float, dtype: str,
             peak: dict[str, float] = H100_SXM) -> dict[str, Any]:
    """FLOPs and activation bytes per second of audio, counted from the layer shapes,
    and the x-realtime limit they imply on ``peak``. Bytes are the floor of a fully
    fused model: each convolution reads its input and writes its output once."""
    a = model.args
    frames_s = sample_rate / a.hop
    act = 2 if dtype in ("float16", "bfloat16") else 4

    def conv(cin, cout, k, t_in, t_out):   # (flops, bytes) per second of audio
        return 2 * cin * cout * k * t_out, (cin * t_in + cout * t_out)

    dec_f = dec_b = 0.0
    ch, rate = a.upsample_initial, frames_s
    f, b = conv(a.inter, ch, 7, rate, rate)
    dec_f, dec_b = dec_f + f, dec_b + b
    for i, (k, st, _p) in enumerate(a.ups):
        cin, cout = ch // 2 ** i, ch // 2 ** (i + 1)
        f, b = conv(cin, cout, k / st, rate, rate * st)   # transposed: k/s taps per output
        dec_f, dec_b = dec_f + f, dec_b + b
        rate *= st
        for rk, rd in zip(a.rb_kernels, a.rb_dilations):
            n = len(rd) * (2 if a.resblock == "1" else 1)
            f, b = conv(cout, cout, rk, rate, rate)
            dec_f, dec_b = dec_f + n * f, dec_b + n * b
    f, b = conv(ch // 2 ** len(a.ups), 1, 7, rate, rate)
    dec_f, dec_b = dec_f + f, dec_b + b
    h, half = a.hidden, a.inter // 2
    per_layer = 2 * half * h + sum(2 * h * 2 * h * a.wn_kernel + 2 * h * 2 * h
                                   for _ in a.wn_dilations) + 2 * h * half
    flow_f = a.n_flows * per_layer * frames_s
    flow_b = a.n_flows * (len(a.wn_dilations) * 6 * h + 2 * a.inter) * frames_s * 4
    enc_tok = a.n_layers * 2 * (4 * h * h + 2 * a.ffn_kernel * h * a.filter)
    text_f = enc_tok * tokens_per_audio_s
    flops = dec_f + flow_f + text_f
    bytes_ = dec_b * act + flow_b + a.n_layers * 10 * h * 4 * tokens_per_audio_s
    peak_dec = peak["bf16_tflops" if act == 2 else "tf32_tflops"] * 1e12
    t_compute = dec_f / peak_dec + flow_f / (peak["tf32_tflops"] * 1e12) + \
        text_f / (peak["fp32_tflops"] * 1e12)
    t_memory = bytes_ / (peak["hbm_tb_s"] * 1e12)
    return {"gflop_per_audio_s": {"decoder": round(dec_f / 1e9, 3),
                                  "flows": round(flow_f / 1e9, 3),
                                  "text": round(text_f / 1e9, 3),
                                  "total": round(flops / 1e9, 3)},
            "activation_mb_per_audio_s": round(bytes_ / 1e6, 2),
            "peak": peak,
            "x_realtime_limit_compute": round(1 / t_compute),
            "x_realtime_limit_memory": round(1 / t_memory),
            "x_realtime_limit": round(1 / max(t_compute, t_memory))}
