"""The text encoder: phoneme ids → hidden states and the prior's means and log-scales."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ttsd.engine.vits.layers import LayerNorm, conv_gemm

if TYPE_CHECKING:
    from ttsd.engine.vits.model import VitsArgs


class RelAttention(nn.Module):
    """Multi-head self-attention with relative positions (window), shared across heads."""

    def __init__(self, channels: int, n_heads: int, window: int) -> None:
        super().__init__()
        self.n_heads, self.k = n_heads, channels // n_heads
        self.window = window
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        self.emb_rel_k = nn.Parameter(torch.zeros(1, 2 * window + 1, self.k))
        self.emb_rel_v = nn.Parameter(torch.zeros(1, 2 * window + 1, self.k))

    def _rel(self, emb: torch.Tensor, length: int) -> torch.Tensor:
        pad = max(length - (self.window + 1), 0)
        start = max((self.window + 1) - length, 0)
        if pad > 0:
            emb = F.pad(emb, (0, 0, pad, pad, 0, 0))
        return emb[:, start:start + 2 * length - 1]

    @staticmethod
    def _rel_to_abs(x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, L, 2L-1] → [B, H, L, L]
        b, h, length, _ = x.shape
        x = F.pad(x, (0, 1)).view(b, h, length * 2 * length)
        x = F.pad(x, (0, length - 1)).view(b, h, length + 1, 2 * length - 1)
        return x[:, :, :length, length - 1:]

    @staticmethod
    def _abs_to_rel(x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, L, L] → [B, H, L, 2L-1]
        b, h, length, _ = x.shape
        x = F.pad(x, (0, length - 1)).view(b, h, length * length + length * (length - 1))
        x = F.pad(x, (length, 0)).view(b, h, length, 2 * length)
        return x[:, :, :, 1:]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T]; attn_mask: [B, 1, T, T]
        b, c, t = x.shape
        q = self.conv_q(x).view(b, self.n_heads, self.k, t).transpose(2, 3)
        k = self.conv_k(x).view(b, self.n_heads, self.k, t).transpose(2, 3)
        v = self.conv_v(x).view(b, self.n_heads, self.k, t).transpose(2, 3)
        q = q / math.sqrt(self.k)
        scores = torch.matmul(q, k.transpose(-2, -1))
        rel_logits = torch.matmul(q, self._rel(self.emb_rel_k, t).unsqueeze(0).transpose(-2, -1))
        scores = scores + self._rel_to_abs(rel_logits)
        scores = scores.masked_fill(attn_mask == 0, -1e4)
        p = F.softmax(scores, dim=-1)
        out = torch.matmul(p, v)
        out = out + torch.matmul(self._abs_to_rel(p), self._rel(self.emb_rel_v, t).unsqueeze(0))
        out = out.transpose(2, 3).contiguous().view(b, c, t)
        return self.conv_o(out)


class FFN(nn.Module):
    def __init__(self, channels: int, filter_channels: int, kernel: int) -> None:
        super().__init__()
        self.pad = ((kernel - 1) // 2, kernel // 2)
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.relu(conv_gemm(self.conv_1, x * mask, self.pad))
        return conv_gemm(self.conv_2, x * mask, self.pad) * mask


class Encoder(nn.Module):
    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        self.attn_layers = nn.ModuleList(
            RelAttention(a.hidden, a.n_heads, a.window) for _ in range(a.n_layers))
        self.norm_layers_1 = nn.ModuleList(LayerNorm(a.hidden) for _ in range(a.n_layers))
        self.ffn_layers = nn.ModuleList(
            FFN(a.hidden, a.filter, a.ffn_kernel) for _ in range(a.n_layers))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(a.hidden) for _ in range(a.n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)
        x = x * mask
        for attn, n1, ffn, n2 in zip(self.attn_layers, self.norm_layers_1,
                                     self.ffn_layers, self.norm_layers_2):
            x = n1(x + attn(x, attn_mask))
            x = n2(x + ffn(x, mask))
        return x * mask


class TextEncoder(nn.Module):
    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        self.hidden, self.inter = a.hidden, a.inter
        self.emb = nn.Embedding(a.n_vocab, a.hidden)
        self.encoder = Encoder(a)
        self.proj = nn.Conv1d(a.hidden, a.inter * 2, 1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor):
        # ids: [B, T] → x [B, H, T], m/logs [B, inter, T]
        x = (self.emb(ids) * math.sqrt(self.hidden)).transpose(1, -1)
        x = self.encoder(x * mask, mask)
        stats = self.proj(x) * mask
        m, logs = torch.split(stats, self.inter, dim=1)
        return x, m, logs
