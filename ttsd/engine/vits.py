"""VITS inference in PyTorch: batched, padded and masked, for Piper voices.

One args dataclass plus ``nn.Module``s. Shapes: B = batch, T = phonemes, F = frames
(hop-sized), S = samples. Every module masks its inputs so that a line inside a padded
batch gives the same result as the line alone. Noise is drawn per line from a counter
hash of (line seed, channel, position), so it never depends on batch-mates or device.

The model has two halves with one data-dependent step between them:
``text_half`` (encoder + duration predictor → durations) and ``audio_half``
(expand → flows → decoder → waveform). The caller reads the lengths in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.1


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


# --------------------------------------------------------------------------- noise

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


# --------------------------------------------------------------------------- text encoder


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


# --------------------------------------------------------------------------- durations


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


# --------------------------------------------------------------------------- flows


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


# --------------------------------------------------------------------------- decoder


def _conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` on [B, C, T], or on [B, C, 1, T] channels-last (the optimized decoder,
    with the 2-D weight ``conv.w4`` made by ``Generator.optimize``)."""
    if x.dim() == 3:
        return conv(x)
    return F.conv2d(x, conv.w4, conv.bias, stride=(1, conv.stride[0]),
                    padding=(0, conv.padding[0]), dilation=(1, conv.dilation[0]))


def _mask_like(lengths: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mask = sequence_mask(lengths, x.size(-1)).to(x.dtype)
    return mask.unsqueeze(2) if x.dim() == 4 else mask


class ResBlock(nn.Module):
    """HiFi-GAN residual block; type "1" (convs1 + convs2) or "2" (convs)."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...], kind: str):
        super().__init__()
        self.kind = kind

        def conv(d: int) -> nn.Conv1d:
            return nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2)

        if kind == "1":
            self.convs1 = nn.ModuleList(conv(d) for d in dilations)
            self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        else:
            self.convs = nn.ModuleList(conv(d) for d in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "1":
            for c1, c2 in zip(self.convs1, self.convs2):
                xt = _conv(c1, F.leaky_relu(x, LRELU_SLOPE) * mask)
                xt = _conv(c2, F.leaky_relu(xt, LRELU_SLOPE) * mask)
                x = xt + x
        else:
            for c in self.convs:
                x = _conv(c, F.leaky_relu(x, LRELU_SLOPE) * mask) + x
        return x * mask


def polyphase_weight(w: torch.Tensor, stride: int, padding: int) -> tuple[torch.Tensor, int]:
    """A ConvTranspose1d weight [Cin, Cout, K] as one ordinary conv1d weight
    [stride*Cout, Cin, M] whose output channel ``r*Cout + o`` is output phase ``r``
    (sample ``q*stride + r``), reading inputs ``q + m0 .. q + m0 + M - 1``.

    Output sample n = q*s + r gets x[i]·W[k] for every n + p = i*s + k, i.e.
    i = q + m with k = r + p - m*s. Returns (weight, m0)."""
    cin, cout, k = w.shape
    taps = {}  # (r, m) → k
    for r in range(stride):
        for kk in range(k):
            m, rem = divmod(r + padding - kk, stride)
            if rem == 0:
                taps[(r, m)] = kk
    ms = [m for _, m in taps]
    m0, size = min(ms), max(ms) - min(ms) + 1
    out = w.new_zeros(stride, cout, cin, size)
    for (r, m), kk in taps.items():
        out[r, :, :, m - m0] = w[:, :, kk].t()
    return out.reshape(stride * cout, cin, size), m0


class PolyphaseUp(nn.Module):
    """ConvTranspose1d run as one dense convolution + interleave: cuDNN's transposed
    convolutions ran several times slower on an H100. In the channels-last layout the
    interleave is free: channel ``r*Cout + o`` at step q is already sample q*s + r."""

    def __init__(self, up: nn.ConvTranspose1d) -> None:
        super().__init__()
        (k,), (s,), (p,) = up.kernel_size, up.stride, up.padding
        w, self.m0 = polyphase_weight(up.weight.detach(), s, p)
        self.stride, self.k, self.p = s, k, p
        self.cout = up.out_channels
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(up.bias.detach().repeat(s), requires_grad=False)
        self.register_buffer("w4", w.unsqueeze(2).contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(-1)
        n = (t - 1) * self.stride - 2 * self.p + self.k
        q = -(-n // self.stride)
        size = self.weight.size(-1)
        # Symmetric zero padding P, then keep the windows starting at q + m0.
        pad = max(0, -self.m0, q - 1 + self.m0 + size - t)
        start = self.m0 + pad
        b = x.size(0)
        if x.dim() == 3:
            y = F.conv1d(x, self.weight, self.bias, padding=pad)[:, :, start:start + q]
            y = y.reshape(b, self.stride, self.cout, q).permute(0, 2, 3, 1)
            return y.reshape(b, self.cout, q * self.stride)[:, :, :n]
        y = F.conv2d(x, self.w4, self.bias, padding=(0, pad))[:, :, :, start:start + q]
        y = y.permute(0, 2, 3, 1).reshape(b, 1, q * self.stride, self.cout)
        return y.permute(0, 3, 1, 2)[:, :, :, :n]


class Generator(nn.Module):
    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        ch = a.upsample_initial
        self.conv_pre = nn.Conv1d(a.inter, ch, 7, 1, padding=3)
        if a.gin:
            self.cond = nn.Conv1d(a.gin, ch, 1)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        self.strides = [s for _, s, _ in a.ups]
        for i, (k, s, p) in enumerate(a.ups):
            self.ups.append(nn.ConvTranspose1d(ch // 2 ** i, ch // 2 ** (i + 1), k, s, padding=p))
            for rk, rd in zip(a.rb_kernels, a.rb_dilations):
                self.resblocks.append(ResBlock(ch // 2 ** (i + 1), rk, rd, a.resblock))
        self.num_kernels = len(a.rb_kernels)
        self.conv_post = nn.Conv1d(ch // 2 ** len(a.ups), 1, 7, 1, padding=3, bias=False)
        self.channels_last = False

    def optimize(self) -> None:
        """After loading: transposed convolutions in polyphase form, and every
        activation in the channels-last layout [B, C, 1, T] (cuDNN's native layout for
        16-bit convolutions: no NCHW↔NHWC transposes around each call)."""
        self.ups = nn.ModuleList(u if isinstance(u, PolyphaseUp) else PolyphaseUp(u)
                                 for u in self.ups)
        for m in self.modules():
            if isinstance(m, nn.Conv1d) and not hasattr(m, "w4"):
                m.register_buffer("w4", m.weight.detach().unsqueeze(2).contiguous(
                    memory_format=torch.channels_last))
        self.channels_last = True

    def forward(self, z: torch.Tensor, frames: torch.Tensor, g: torch.Tensor | None):
        # z: [B, inter, F] (zero past each line's end); frames: [B] → audio [B, S]
        if self.channels_last:
            z = z.unsqueeze(2).contiguous(memory_format=torch.channels_last)
            g = g.unsqueeze(2) if g is not None else None
        mask = _mask_like(frames, z)
        x = _conv(self.conv_pre, z * mask)
        if g is not None:
            x = x + _conv(self.cond, g)
        length = frames
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE) * mask)
            length = length * self.strides[i]
            mask = _mask_like(length, x)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            xs = blocks[0](x, mask)
            for block in blocks[1:]:
                xs = xs + block(x, mask)
            x = xs / self.num_kernels
        x = _conv(self.conv_post, F.leaky_relu(x) * mask)
        x = torch.tanh(x)
        return x[:, 0, 0] if x.dim() == 4 else x[:, 0]


# --------------------------------------------------------------------------- model


class Vits(nn.Module):
    """The whole voice. ``text_half`` then ``audio_half``; ``forward`` does both."""

    def __init__(self, a: VitsArgs) -> None:
        super().__init__()
        self.args = a
        self.enc_p = TextEncoder(a)
        self.dp = StochasticDurationPredictor(a) if a.use_sdp else DurationPredictor(a)
        self.flow = Flow(a)
        self.dec = Generator(a)
        if a.n_speakers > 1:
            self.emb_g = nn.Embedding(a.n_speakers, a.gin)

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
                   dec: Generator | None = None) -> torch.Tensor:
        """Expand by durations, flows (float32), decoder (``dec``, default ``self.dec``,
        in its own dtype) → audio [B, max_frames*hop] float32."""
        dec = self.dec if dec is None else dec
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
