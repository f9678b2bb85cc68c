"""The decoder's residual blocks as fused GPU kernels (Triton).

Each step of a HiFi-GAN residual block is ``x + conv(leaky_relu(x) * mask)``. Run as
torch ops, every step writes and reads its activations in GPU memory several times over
(the activation, the convolution's output, the sum), and at 32-128 channels those
passes, not the arithmetic, set the decoder's speed. Here one kernel does the whole
step for a tile of samples: it loads the input once per tap (the shifted tiles overlap
and come from the cache), applies the activation and the mask as it loads, runs the
taps as matrix products on the tensor cores with float32 accumulation, and adds the
bias and the residual before its one store. The block's last step adds its masked
output straight into the sum of the stage's blocks, scaled on the last block.

Activations are channels-last ``[B, C, 1, T]`` (memory ``[B, T, C]``), 16-bit. Each
output depends only on its own row, so a line's samples do not depend on its batch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
"""The CUDA builds of torch bring Triton; the CPU builds do not. Imported only when a
decoder is fused (``prepare_block``): a start without a GPU need not spend the time."""
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_STEP = None
"""The kernel (``fused_kernel.step``), once ``prepare_block`` has imported it."""


def fusable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels run there: Triton present, a 16-bit decoder on a GPU (any
    device under Triton's interpreter, float32 too, for the tests)."""
    if not HAVE_TRITON:
        return False
    if _INTERPRET:
        return dtype in (torch.bfloat16, torch.float16, torch.float32)
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def fused_input(x: torch.Tensor) -> bool:
    """Whether ``x`` is an activation the kernels take: ``fusable`` there, channels-last
    [B, C, 1, T] with C a multiple of 16 (the tensor cores' smallest step)."""
    return fusable(x.device, x.dtype) and x.dim() == 4 and x.size(1) % 16 == 0 \
        and x.is_contiguous(memory_format=torch.channels_last)


def _tile(channels: int) -> tuple[int, int]:
    """(samples a program, warps) by channel count."""
    return {16: (256, 4), 32: (256, 4), 64: (128, 4), 128: (64, 4)}.get(channels, (64, 4))


def tap_weights(conv: torch.nn.Conv1d) -> torch.Tensor:
    """A Conv1d's weight [Cout, Cin, K] as the kernel reads it: [K, Cin, Cout]."""
    return conv.weight.detach().permute(2, 1, 0).contiguous()


def step(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, lengths: torch.Tensor,
         dilation: int, res: torch.Tensor | None = None, out: torch.Tensor | None = None,
         mode: int = 0, scale: float = 1.0) -> torch.Tensor:
    """``res + conv(leaky_relu(x, 0.1) * mask)`` (mode 0, into a new tensor; no
    ``res``: the convolution alone), or that step's masked output summed into ``out``
    (modes 1-3, see ``fused_kernel.step``). ``lengths``: each row's valid samples [B]
    (int64, on x's device)."""
    b, ch, _, t = x.shape
    k = taps.size(0)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last)
    bt, warps = _tile(ch)
    grid = (-(-t // bt), b)
    _STEP[grid](x, x if res is None else res, taps, bias, lengths, out, t, scale, C=ch,
                K=k, D=dilation, PAD=(k * dilation - dilation) // 2, BT=bt, SLOPE=0.1,
                MODE=mode, RES=res is not None, num_warps=warps)
    return out


def fused_stage(blocks: list, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The mean of a stage's residual blocks (``decoder.ResBlock``) on ``x``, each
    block's output masked, in fused steps; ``blocks`` carry ``fused_steps`` (see
    ``prepare_block``)."""
    out = torch.empty_like(x, memory_format=torch.channels_last)
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        steps = block.fused_steps
        h = x
        for si, (taps, bias, dil, pair) in enumerate(steps):
            final = si == len(steps) - 1
            mode = 0 if not final else 1 if i == 0 else 3 if i == last else 2
            if pair:    # type "1": conv1 alone into a temporary, conv2 adds the input
                y = step(h, taps, bias, lengths, dil)
                taps2, bias2, dil2 = pair
                h = step(y, taps2, bias2, lengths, dil2, res=h,
                         out=out if final else None, mode=mode, scale=1 / len(blocks))
            else:
                h = step(h, taps, bias, lengths, dil, res=h, out=out if final else None,
                         mode=mode, scale=1 / len(blocks))
    return out


def prepare_block(block) -> None:
    """Give a ``decoder.ResBlock`` the fused kernels' form of its weights, in their
    current dtype and device: ``fused_steps``, one (taps, bias, dilation, second conv
    or None) per residual step."""
    global _STEP
    if _STEP is None:
        from ttsd.engine.vits.fused_kernel import step as kernel
        _STEP = kernel

    def parts(conv):
        return tap_weights(conv), conv.bias.detach().contiguous(), conv.dilation[0]
    if block.kind == "1":
        block.fused_steps = [(*parts(c1), parts(c2))
                             for c1, c2 in zip(block.convs1, block.convs2)]
    else:
        block.fused_steps = [(*parts(c), None) for c in block.convs]
