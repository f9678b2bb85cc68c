"""The whole VITS voice: its hyper-parameters and the two halves the engine runs."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ttsd.engine.vits.decoder import Generator
from ttsd.engine.vits.durations import DurationPredictor, StochasticDurationPredictor
from ttsd.engine.vits.encoder import TextEncoder
from ttsd.engine.vits.flow import Flow
from ttsd.engine.vits.layers import hash_normal, sequence_mask


@dataclass(frozen=True)
class VitsArgs:
    n_vocab: int
    hidden: int
    inter: int
    filter: int
    n_heads: int
    n_layers: int
    ffn_kernel: int
    window: int
    n_speakers: int
    gin: int
    use_sdp: bool
    dp_kernel: int
    dp_layers: int
    dp_filter: int
    sdp_flows: int
    num_bins: int
    n_flows: int
    wn_kernel: int
    wn_dilations: tuple[int, ...]
    upsample_initial: int
    ups: tuple[tuple[int, int, int], ...]
    """(kernel, stride, padding) of each transposed convolution."""
    resblock: str
    rb_kernels: tuple[int, ...]
    rb_dilations: tuple[tuple[int, ...], ...]
    tail_bound: float = 5.0

    @property
    def hop(self) -> int:
        return math.prod(s for _, s, _ in self.ups)


class Vits(nn.Module):
    """The whole voice (a ``ttsd.engine.model.VoiceModel``). ``text_half`` then
    ``audio_half``; ``forward`` does both."""

    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        self.args = a
        self.enc_p = TextEncoder(a)
        self.dp = StochasticDurationPredictor(a) if a.use_sdp else DurationPredictor(a)
        self.flow = Flow(a)
        self.dec = Generator(a)
        if a.n_speakers > 1:
            self.emb_g = nn.Embedding(a.n_speakers, a.gin)

    @property
    def hop(self) -> int:
        return self.args.hop

    @property
    def channels(self) -> int:
        return self.args.inter

    def place(self, device: torch.device, dtype: torch.dtype, keep_float32: bool
              ) -> Generator | None:
        """On ``device``, the decoder optimized (``Generator.optimize``) and in ``dtype``;
        with ``keep_float32``, a float32 copy of it is returned for the retries of rows
        whose half-precision samples were not finite."""
        self.to(device)
        self.dec.optimize()
        dec32 = None
        if dtype != torch.float32:
            if keep_float32:
                dec32 = copy.deepcopy(self.dec)
            self.dec.to(dtype)
        return dec32

    def fuse(self) -> bool:
        """The decoder's residual blocks as fused kernels (``Generator.fuse``)."""
        return self.dec.fuse()

    def speaker(self, sid: torch.Tensor) -> torch.Tensor | None:
        return self.emb_g(sid).unsqueeze(-1) if self.args.n_speakers > 1 else None

    def text_half(self, ids: torch.Tensor, lengths: torch.Tensor, sid: torch.Tensor,
                  seeds: torch.Tensor, noise_w: torch.Tensor, length_scale: torch.Tensor):
        """ids [B, T], lengths/sid/seeds [B], noise_w/length_scale [B] →
        (m_p, logs_p [B, inter, T], durations [B, T] int64)."""
        mask = sequence_mask(lengths, ids.size(1))
        g = self.speaker(sid)
        x, m_p, logs_p = self.enc_p(ids, mask)
        noise = hash_normal(seeds, 2, ids.size(1), stream=1) * noise_w.view(-1, 1, 1)
        logw = self.dp(x, mask, g, noise)
        w = torch.exp(logw) * mask * length_scale.view(-1, 1, 1)
        return m_p, logs_p, torch.ceil(w)[:, 0].long()

    def text_frames(self, ids: torch.Tensor, lengths: torch.Tensor, sid: torch.Tensor,
                    seeds: torch.Tensor, noise_w: torch.Tensor, length_scale: torch.Tensor):
        """``text_half`` plus each row's frame count [B] (what the caller reads between
        the halves): the function the engine's CUDA graphs capture and its compiler
        compiles."""
        m, logs, dur = self.text_half(ids, lengths, sid, seeds, noise_w, length_scale)
        return m, logs, dur, dur.sum(1).clamp_min(1)

    def audio_half(self, m_p: torch.Tensor, logs_p: torch.Tensor, durations: torch.Tensor,
                   frames: torch.Tensor, max_frames: int, sid: torch.Tensor,
                   seeds: torch.Tensor, noise_scale: torch.Tensor,
                   fallback: Generator | None = None) -> torch.Tensor:
        """Expand by durations, flows (float32), decoder (``fallback``, default
        ``self.dec``, in its own dtype) → audio [B, max_frames*hop] float32."""
        dec = self.dec if fallback is None else fallback
        g = self.speaker(sid)
        cum = torch.cumsum(durations, dim=1)  # [B, T]
        pos = torch.arange(max_frames, device=m_p.device).unsqueeze(0).expand(cum.size(0), -1)
        idx = torch.searchsorted(cum, pos.contiguous(), right=True).clamp_max(cum.size(1) - 1)
        idx = idx.unsqueeze(1).expand(-1, m_p.size(1), -1)
        y_mask = sequence_mask(frames, max_frames)
        m = torch.gather(m_p, 2, idx) * y_mask
        logs = torch.gather(logs_p, 2, idx) * y_mask
        eps = hash_normal(seeds, m.size(1), max_frames, stream=2)
        z_p = m + eps * torch.exp(logs) * noise_scale.view(-1, 1, 1)
        z = self.flow.reverse(z_p, y_mask, g) * y_mask
        dec_dtype = dec.conv_pre.weight.dtype
        gd = g.to(dec_dtype) if g is not None else None
        return dec(z.to(dec_dtype), frames, gd).float()

    def forward(self, ids, lengths, sid, seeds, noise_scale, noise_w, length_scale):
        m_p, logs_p, dur = self.text_half(ids, lengths, sid, seeds, noise_w, length_scale)
        frames = dur.sum(1).clamp_min(1)
        return self.audio_half(m_p, logs_p, dur, frames, int(frames.max()), sid, seeds,
                               noise_scale), frames * self.args.hop
