"""Duration predictors: the stochastic one (reverse flows over a rational-quadratic
spline, sampling only) and the deterministic one of some exports."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ttsd.engine.vits.layers import LayerNorm, conv_gemm

if TYPE_CHECKING:
    from ttsd.engine.vits.model import VitsArgs


class DDSConv(nn.Module):
    """Dilated depth-separable convolutions."""

    def __init__(self, channels: int, kernel: int, n_layers: int) -> None:
        super().__init__()
        self.convs_sep = nn.ModuleList()
        self.convs_1x1 = nn.ModuleList()
        self.norms_1 = nn.ModuleList()
        self.norms_2 = nn.ModuleList()
        for i in range(n_layers):
            dil = kernel ** i
            self.convs_sep.append(nn.Conv1d(channels, channels, kernel, groups=channels,
                                            dilation=dil, padding=(kernel * dil - dil) // 2))
            self.convs_1x1.append(nn.Conv1d(channels, channels, 1))
            self.norms_1.append(LayerNorm(channels))
            self.norms_2.append(LayerNorm(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None = None):
        if g is not None:
            x = x + g
        for sep, c1, n1, n2 in zip(self.convs_sep, self.convs_1x1, self.norms_1, self.norms_2):
            y = F.gelu(n1(sep(x * mask)))
            y = F.gelu(n2(c1(y)))
            x = x + y
        return x * mask


def _rq_spline_inverse(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, d: torch.Tensor,
                       bound: float) -> torch.Tensor:
    """Inverse of the rational-quadratic spline with linear tails (Durkan et al.).

    x: [...]; w, h: [..., K]; d: [..., K-1] (unnormalized). Returns [...].
    """
    min_w = min_h = min_d = 1e-3
    k = w.size(-1)
    const = math.log(math.exp(1 - min_d) - 1)
    d = F.pad(d, (1, 1), value=const)
    inside = (x >= -bound) & (x <= bound)

    widths = min_w + (1 - min_w * k) * F.softmax(w, dim=-1)
    cumw = F.pad(torch.cumsum(widths, dim=-1), (1, 0))
    cumw = 2 * bound * cumw - bound
    cumw = torch.cat([torch.full_like(cumw[..., :1], -bound), cumw[..., 1:-1],
                      torch.full_like(cumw[..., :1], bound)], dim=-1)
    widths = cumw[..., 1:] - cumw[..., :-1]
    derivs = min_d + F.softplus(d)
    heights = min_h + (1 - min_h * k) * F.softmax(h, dim=-1)
    cumh = F.pad(torch.cumsum(heights, dim=-1), (1, 0))
    cumh = 2 * bound * cumh - bound
    cumh = torch.cat([torch.full_like(cumh[..., :1], -bound), cumh[..., 1:-1],
                      torch.full_like(cumh[..., :1], bound)], dim=-1)
    heights = cumh[..., 1:] - cumh[..., :-1]

    xc = x.clamp(-bound, bound)
    locs = cumh.clone()
    locs[..., -1] += 1e-6
    idx = (torch.sum(xc[..., None] >= locs, dim=-1) - 1).clamp(0, k - 1)[..., None]
    in_cumw = cumw.gather(-1, idx)[..., 0]
    in_w = widths.gather(-1, idx)[..., 0]
    in_cumh = cumh.gather(-1, idx)[..., 0]
    delta = heights / widths
    in_delta = delta.gather(-1, idx)[..., 0]
    in_d = derivs.gather(-1, idx)[..., 0]
    in_d1 = derivs[..., 1:].gather(-1, idx)[..., 0]
    in_h = heights.gather(-1, idx)[..., 0]

    s = in_d + in_d1 - 2 * in_delta
    a = (xc - in_cumh) * s + in_h * (in_delta - in_d)
    b = in_h * in_d - (xc - in_cumh) * s
    c = -in_delta * (xc - in_cumh)
    disc = (b.pow(2) - 4 * a * c).clamp_min(0)
    root = (2 * c) / (-b - torch.sqrt(disc))
    y = root * in_w + in_cumw
    return torch.where(inside, y, x)


class ConvFlow(nn.Module):
    def __init__(self, channels: int, filter_channels: int, kernel: int, n_layers: int,
                 num_bins: int, tail_bound: float) -> None:
        super().__init__()
        self.half = channels // 2
        self.num_bins, self.tail_bound = num_bins, tail_bound
        self.scale = math.sqrt(filter_channels)
        self.pre = nn.Conv1d(self.half, filter_channels, 1)
        self.convs = DDSConv(filter_channels, kernel, n_layers)
        self.proj = nn.Conv1d(filter_channels, self.half * (num_bins * 3 - 1), 1)

    def reverse(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x0, x1 = torch.split(x, [self.half, self.half], 1)
        h = self.convs(self.pre(x0), mask, g=g)
        h = self.proj(h) * mask
        b, c, t = x0.shape
        h = h.reshape(b, c, -1, t).permute(0, 1, 3, 2)  # [B, c, T, 3K-1]
        nb = self.num_bins
        x1 = _rq_spline_inverse(x1, h[..., :nb] / self.scale, h[..., nb:2 * nb] / self.scale,
                                h[..., 2 * nb:], self.tail_bound)
        return torch.cat([x0, x1], 1) * mask


class StochasticDurationPredictor(nn.Module):
    """Only the reverse (sampling) path; flows listed in the order they are applied."""

    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        f = a.hidden
        self.pre = nn.Conv1d(a.hidden, f, 1)
        self.convs = DDSConv(f, a.dp_kernel, a.dp_layers)
        self.proj = nn.Conv1d(f, f, 1)
        if a.gin:
            self.cond = nn.Conv1d(a.gin, f, 1)
        self.flows = nn.ModuleList(
            ConvFlow(2, f, a.dp_kernel, a.dp_layers, a.num_bins, a.tail_bound)
            for _ in range(a.sdp_flows))
        self.affine_m = nn.Parameter(torch.zeros(2, 1))
        self.affine_inv_scale = nn.Parameter(torch.ones(2, 1))  # exp(-logs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None,
                noise: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T]; noise: [B, 2, T] (already scaled) → logw [B, 1, T]
        x = self.pre(x)
        if g is not None:
            x = x + self.cond(g)
        x = self.proj(self.convs(x, mask)) * mask
        z = noise
        for flow in self.flows:
            z = flow.reverse(torch.flip(z, [1]), mask, x)
        z = torch.flip(z, [1])
        z = (z - self.affine_m) * self.affine_inv_scale * mask
        return z[:, :1]


class DurationPredictor(nn.Module):
    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        k = a.dp_kernel
        self.pad = (k // 2, k // 2)
        self.conv_1 = nn.Conv1d(a.hidden, a.dp_filter, k)
        self.norm_1 = LayerNorm(a.dp_filter)
        self.conv_2 = nn.Conv1d(a.dp_filter, a.dp_filter, k)
        self.norm_2 = LayerNorm(a.dp_filter)
        self.proj = nn.Conv1d(a.dp_filter, 1, 1)
        if a.gin:
            self.cond = nn.Conv1d(a.gin, a.hidden, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor | None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        if g is not None:
            x = x + self.cond(g)
        x = self.norm_1(torch.relu(conv_gemm(self.conv_1, x * mask, self.pad)))
        x = self.norm_2(torch.relu(conv_gemm(self.conv_2, x * mask, self.pad)))
        return self.proj(x * mask) * mask
