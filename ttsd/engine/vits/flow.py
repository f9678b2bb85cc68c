"""The normalizing flow of the audio half (reverse direction): WaveNet-style coupling
layers that turn the prior's sample into the decoder's input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ttsd.engine.vits.model import VitsArgs


class WN(nn.Module):
    def __init__(self, hidden: int, kernel: int, dilations: tuple[int, ...], gin: int) -> None:
        super().__init__()
        self.hidden = hidden
        n = len(dilations)
        self.in_layers = nn.ModuleList(
            nn.Conv1d(hidden, 2 * hidden, kernel, dilation=d, padding=(kernel * d - d) // 2)
            for d in dilations)
        self.res_skip_layers = nn.ModuleList(
            nn.Conv1d(hidden, 2 * hidden if i < n - 1 else hidden, 1) for i in range(n))
        if gin:
            self.cond_layer = nn.Conv1d(gin, 2 * hidden * n, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None):
        h = self.hidden
        out = torch.zeros_like(x)
        if g is not None:
            g = self.cond_layer(g)
        n = len(self.in_layers)
        for i, (inl, rs) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            xin = inl(x)
            if g is not None:
                xin = xin + g[:, i * 2 * h:(i + 1) * 2 * h]
            acts = torch.tanh(xin[:, :h]) * torch.sigmoid(xin[:, h:])
            rs_out = rs(acts)
            if i < n - 1:
                x = (x + rs_out[:, :h]) * mask
                out = out + rs_out[:, h:]
            else:
                out = out + rs_out
        return out * mask


class CouplingLayer(nn.Module):
    """Mean-only residual coupling layer, reverse direction."""

    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        self.half = a.inter // 2
        self.pre = nn.Conv1d(self.half, a.hidden, 1)
        self.enc = WN(a.hidden, a.wn_kernel, a.wn_dilations, a.gin)
        self.post = nn.Conv1d(a.hidden, self.half, 1)

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None):
        x0, x1 = torch.split(x, [self.half, self.half], 1)
        h = self.enc(self.pre(x0) * mask, mask, g)
        m = self.post(h) * mask
        return torch.cat([x0, (x1 - m) * mask], 1)


class Flow(nn.Module):
    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        self.flows = nn.ModuleList(CouplingLayer(a) for _ in range(a.n_flows))

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None):
        for layer in reversed(self.flows):
            x = layer.reverse(torch.flip(x, [1]), mask, g)
        return x
