"""The Triton kernel of ``fused``: one residual step of a HiFi-GAN block for a tile of
samples of one row. Imported only where a decoder is fused (it imports Triton)."""

import triton
import triton.language as tl


@triton.jit
def step(x_ptr, res_ptr, w_ptr, b_ptr, len_ptr, out_ptr, T, scale,
         C: tl.constexpr, K: tl.constexpr, D: tl.constexpr, PAD: tl.constexpr,
         BT: tl.constexpr, SLOPE: tl.constexpr, MODE: tl.constexpr,
         RES: tl.constexpr):
    """One residual step for BT samples of one row: y = [res] + bias + Σ_j W_j ·
    act(x[t + j·D − PAD]), act = leaky ReLU then the row's mask. MODE 0: out = y;
    1: out = y · mask (the stage's first block); 2: out += y · mask; 3: out = (out +
    y · mask) · scale (its last)."""
    pid_t = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n = tl.load(len_ptr + row)
    t = pid_t * BT + tl.arange(0, BT)
    c = tl.arange(0, C)
    base = row * T * C
    inside = t < T
    if pid_t * BT >= n:   # past the row's end: the sums are zero there, the rest unread
        if MODE != 0:
            zero = tl.zeros((BT, C), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + base + t[:, None] * C + c[None, :], zero,
                     mask=inside[:, None])
    else:
        acc = tl.zeros((BT, C), dtype=tl.float32)
        for j in tl.static_range(K):
            s = t + (j * D - PAD)
            ok = (s >= 0) & (s < n)
            a = tl.load(x_ptr + base + s[:, None] * C + c[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
            a = tl.where(a > 0, a, a * SLOPE).to(x_ptr.dtype.element_ty)
            w = tl.load(w_ptr + j * C * C + c[:, None] * C + c[None, :])
            acc += tl.dot(a, w)
        here = base + t[:, None] * C + c[None, :]
        acc += tl.load(b_ptr + c).to(tl.float32)[None, :]
        if RES:
            acc += tl.load(res_ptr + here, mask=inside[:, None], other=0.0).to(tl.float32)
        if MODE != 0:
            acc = tl.where((t < n)[:, None], acc, 0.0)
        if MODE >= 2:
            acc += tl.load(out_ptr + here, mask=inside[:, None], other=0.0).to(tl.float32)
        if MODE == 3:
            acc = acc * scale
        tl.store(out_ptr + here, acc.to(out_ptr.dtype.element_ty), mask=inside[:, None])
