"""The HiFi-GAN decoder (``Generator``): frames → waveform, with its transposed
convolutions in polyphase form and the channels-last layout the engine runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ttsd.engine.vits.fused import fusable, fused_input, fused_stage, prepare_block
from ttsd.engine.vits.layers import sequence_mask

if TYPE_CHECKING:
    from ttsd.engine.vits.model import VitsArgs

LRELU_SLOPE = 0.1


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
        self.fused = False

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

    def fuse(self) -> bool:
        """On a GPU with Triton, after ``optimize`` and once on its device and in its
        dtype: run each stage's residual blocks as fused kernels (``fused.fused_stage``).
        Returns whether it will."""
        w = self.conv_pre.weight
        if not (self.channels_last and fusable(w.device, w.dtype)):
            return False
        for block in self.resblocks:
            prepare_block(block)
        self.fused = True
        return True

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
            if self.fused and fused_input(x):
                x = fused_stage(list(blocks), x, length)
                continue
            xs = blocks[0](x, mask)
            for block in blocks[1:]:
                xs = xs + block(x, mask)
            x = xs / self.num_kernels
        x = _conv(self.conv_post, F.leaky_relu(x) * mask)
        x = torch.tanh(x)
        return x[:, 0, 0] if x.dim() == 4 else x[:, 0]
