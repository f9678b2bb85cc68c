"""Pieces the VITS halves share: per-line noise, length masks, channel LayerNorm, and
the convolution the strict-float32 text half runs as a matrix product."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_M32 = 0xFFFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash in int64 arithmetic (products stay below 2**63)."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x2C1B3C6D) & _M32
    h = h ^ (h >> 13)
    h = (h * 0x297A2D39) & _M32
    h = h ^ (h >> 16)
    return h


def hash_normal(seeds: torch.Tensor, channels: int, length: int, stream: int) -> torch.Tensor:
    """Standard normal noise [B, C, L] that depends only on (seed, stream, c, t).

    seeds: [B] int64 in [0, 2**31). Box-Muller over two hashed uniforms.
    """
    dev = seeds.device
    c = torch.arange(channels, device=dev, dtype=torch.int64).view(1, channels, 1)
    t = torch.arange(length, device=dev, dtype=torch.int64).view(1, 1, length)
    base = _mix(seeds.view(-1, 1, 1) * 0x9E3779B1 + stream * 0x7F4A7C15)
    k = _mix(base + c * 0x01000193) ^ (t * 0x27D4EB2F)
    u1 = (_mix(k).to(torch.float32) + 0.5) * (1.0 / 4294967296.0)
    u2 = (_mix(k ^ 0x5BD1E995).to(torch.float32) + 0.5) * (1.0 / 4294967296.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def sequence_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] → [B, 1, max_len] float mask."""
    pos = torch.arange(max_len, device=lengths.device)
    return (pos.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).float()


class LayerNorm(nn.Module):
    """LayerNorm over channels of [B, C, T]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.transpose(1, -1), (x.size(1),), self.gamma, self.beta, 1e-5)
        return x.transpose(1, -1)


def conv_gemm(conv: nn.Conv1d, x: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """``conv(F.pad(x, pad))`` as unfold + one matrix product.

    For the text half, which runs in strict float32: cuDNN's heuristics (benchmark off,
    TF32 off) pick an FFT algorithm for these kernel-3 convolutions that took 35 ms a
    call at batch 64 on an H100; a plain float32 GEMM takes well under 1 ms."""
    k = conv.kernel_size[0]
    if k == 1:
        return conv(F.pad(x, pad) if any(pad) else x)
    cols = F.pad(x, pad).unfold(2, k, 1)                     # [B, C, T, k]
    b, c, t, _ = cols.shape
    cols = cols.permute(0, 2, 1, 3).reshape(b, t, c * k)      # [B, T, C*k]
    w = conv.weight.reshape(conv.out_channels, c * k)
    y = torch.matmul(cols, w.t())
    if conv.bias is not None:
        y = y + conv.bias
    return y.transpose(1, 2)
