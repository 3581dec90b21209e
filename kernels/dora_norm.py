"""Triton DoRA weight norm ||W0 + s B A|| per input column or output row, without B @ A in memory.

Reference: `dora_reference.dora_weight_norm` (same arguments, same fp32 result).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import device_guard, dot_precision, is_interpreted, rank_block


@triton.jit
def _dora_norm_kernel(
    W,
    LEFT,
    RIGHT,
    BASE_SQ,
    W_SCALE,
    NORM,
    M,
    K,
    RANK,
    stride_wm,
    stride_wk,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rk,
    scale,
    HAS_BASE_SQ: tl.constexpr,
    HAS_W_SCALE: tl.constexpr,
    SCALE_ALONG_M: tl.constexpr,
    SCALE_ALONG_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """N[m] = sqrt(||W[m, :]||^2 + 2 s <W[m, :], P[m, :]> + s^2 ||P[m, :]||^2), P = LEFT @ RIGHT.

    Both axes are the same computation on different views (the launcher passes strides):
      output axis: m = output row i,   k = input column,  LEFT = B [out, r], RIGHT = A [r, in]
      input axis:  m = input column j, k = output row,    LEFT = A^T [in, r], RIGHT = B^T [r, out]
    so W[m, k] is W0 or W0^T and P[m, k] = (B A)[i, j] in either case.

    One program owns BLOCK_M norms and walks k in BLOCK_K steps. Each step reads a
    [BLOCK_M, BLOCK_K] tile of W0 once, in its storage dtype (fp8 tiles times the
    per-tensor scale, or the per-output-row scales: along m on the output axis, along k
    on the input axis), and rebuilds the matching tile of P = B A in registers with one
    tl.dot over the rank; the tile of P is used and dropped, so B A never reaches memory.
    The cross term <W, P> and the low-rank term ||P||^2 accumulate in fp32, as does
    ||W||^2 when the caller did not pass it (same tile, no extra read of W0). This is
    the reference's expansion N^2 = ||W0||^2 + 2 s (W0 . BA) + s^2 ||BA||^2, with the
    low-rank term summed as squares, so it is never negative.

    No backward: the norm is detached (DoRA paper section 4.3), a constant for autograd.
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < RANK
    # Rows of M beyond the tensor and padded rank columns load as 0 and add nothing.
    left = tl.load(
        LEFT + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    ).to(tl.float32)
    w_rows = offs_m.to(tl.int64)[:, None] * stride_wm
    w_scale = 1.0
    if HAS_W_SCALE:
        if SCALE_ALONG_M:
            w_scale = tl.load(W_SCALE + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        elif not SCALE_ALONG_K:
            w_scale = tl.load(W_SCALE).to(tl.float32)
    cross = tl.zeros([BLOCK_M], dtype=tl.float32)
    low_rank = tl.zeros([BLOCK_M], dtype=tl.float32)
    base = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(
            W + w_rows + offs_k[None, :] * stride_wk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_W_SCALE:
            if SCALE_ALONG_K:
                w = w * tl.load(W_SCALE + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            else:
                w = w * w_scale
        right = tl.load(
            RIGHT + offs_r[:, None] * stride_rr + offs_k[None, :] * stride_rk,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        p = tl.dot(left, right, input_precision=DOT_PRECISION)
        cross += tl.sum(w * p, axis=1)
        low_rank += tl.sum(p * p, axis=1)
        if not HAS_BASE_SQ:
            base += tl.sum(w * w, axis=1)
    if HAS_BASE_SQ:
        base = tl.load(BASE_SQ + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    sq = base + 2.0 * scale * cross + (scale * scale) * low_rank
    # Cancellation can push a true zero a hair below 0; a norm is never negative.
    tl.store(NORM + offs_m, tl.sqrt_rn(tl.maximum(sq, 0.0)), mask=mask_m)


def _blocks(rank_tile: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K). The P tile [BLOCK_R, BLOCK_K] stays at 4096 fp32 values so
    registers hold it at any rank; BLOCK_M = 16 gives out/16 programs (192 for a 3072-wide
    layer, more than an H100's 132 SMs). Untuned: no GPU was available when this was written.
    The interpreter's cost grows with tile area, so it gets the smallest legal tiles."""
    if interpreted:
        return 16, 16
    return 16, max(16, min(256, 4096 // rank_tile))


@torch.library.custom_op("dit_trainer::dora_norm", mutates_args=())
def dora_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_sq: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    scale: float,
    axis: str,
) -> torch.Tensor:
    """||W0 + s B A|| per input column ([in]) or output row ([out]), fp32.

    weight: W0 [out, in], fp32 / fp16 / bf16, or float8_e4m3fn with `weight_scale`, fp32,
    one value or one per output row (W0 = weight * weight_scale, rows scaled). base_sq: ||W0||^2 along the
    axis from `dora_reference.base_sq_norm`; None folds it into this pass. Inputs are
    validated by `kernels.dora`, which is the public entry point.
    """
    n_out, n_in = weight.shape
    rank = lora_A.shape[0]
    if axis == "output":
        m, k = n_out, n_in
        w_strides = (weight.stride(0), weight.stride(1))
        left, l_strides = lora_B, (lora_B.stride(0), lora_B.stride(1))
        right, r_strides = lora_A, (lora_A.stride(0), lora_A.stride(1))
    else:
        m, k = n_in, n_out
        w_strides = (weight.stride(1), weight.stride(0))
        left, l_strides = lora_A, (lora_A.stride(1), lora_A.stride(0))
        right, r_strides = lora_B, (lora_B.stride(1), lora_B.stride(0))
    norm = torch.empty(m, device=weight.device, dtype=torch.float32)
    per_row = weight_scale is not None and weight_scale.numel() > 1
    block_r = rank_block(rank)
    block_m, block_k = _blocks(block_r, is_interpreted(_dora_norm_kernel))
    with device_guard(weight):
        _dora_norm_kernel[(triton.cdiv(m, block_m),)](
            weight,
            left,
            right,
            base_sq,
            weight_scale,
            norm,
            m,
            k,
            rank,
            *w_strides,
            *l_strides,
            *r_strides,
            scale,
            HAS_BASE_SQ=base_sq is not None,
            HAS_W_SCALE=weight_scale is not None,
            SCALE_ALONG_M=per_row and axis == "output",
            SCALE_ALONG_K=per_row and axis == "input",
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            BLOCK_R=block_r,
            DOT_PRECISION=dot_precision(torch.promote_types(lora_A.dtype, lora_B.dtype)),
            num_warps=4,
        )
    return norm


@dora_norm.register_fake
def _(weight, lora_A, lora_B, base_sq, weight_scale, scale, axis):
    m = weight.shape[0] if axis == "output" else weight.shape[1]
    return weight.new_empty(m, dtype=torch.float32)
