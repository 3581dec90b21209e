"""Triton DoRA layer, input axis (ComfyUI's `dora_scale` [1, in]): one magnitude per input column.

Forward, with g = m / (N + eps) per input feature (N the detached column norm of
W0 + s B A, from `dora_norm`). Scaling the columns of W0 + s B A is scaling the input:

    xs = x * g,    u = A xs,    y = W0 xs + s B u + bias

Reference: `dora_reference.dora_linear(..., axis="input")`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_utils import device_guard, dora_factor, dot_precision, rank_block, token_feature_blocks


@triton.jit
def _input_fwd_kernel(
    X,
    G,
    A,
    XS,
    U,
    T,
    N_IN,
    RANK,
    stride_xt,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_xs,
    stride_u,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Prologue for one BLOCK_T slab of tokens, walking the input features:

        xs = x * g                  rounded to the activation dtype     -> XS (for W0 xs)
        u  = xs @ A^T               tl.dot, accumulated over in, fp32   -> U
    x is read once; eager PyTorch reads x, writes xs, then reads xs again for A xs.
    u is built from the rounded xs, the same input the base GEMM sees.
    """
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < RANK
    rows = offs_t.to(tl.int64)[:, None]
    u = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, N_IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < N_IN
        mask_tk = mask_t[:, None] & mask_k[None, :]
        x = tl.load(X + rows * stride_xt + offs_k[None, :] * stride_xk, mask=mask_tk, other=0.0).to(tl.float32)
        g = tl.load(G + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        xs = (x * g).to(XS.dtype.element_ty)
        tl.store(XS + rows * stride_xs + offs_k[None, :], xs, mask=mask_tk)
        a_t = tl.load(
            A + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        ).to(tl.float32)
        u += tl.dot(xs.to(tl.float32), a_t, input_precision=DOT_PRECISION)
    tl.store(U + rows * stride_u + offs_r[None, :], u.to(U.dtype.element_ty), mask=mask_t[:, None] & mask_r[None, :])


@triton.jit
def _input_bwd_kernel(
    GXS,
    X,
    G,
    DX,
    XS,
    DG_PART,
    T,
    N_IN,
    stride_gxs,
    stride_xt,
    stride_xk,
    stride_dx,
    stride_xs,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Elementwise part of the backward on one [BLOCK_T, BLOCK_K] tile, given
    gxs = dL/dxs = gy W0 + (s gy B) A from cuBLAS:

        dx = gxs * g                                      -> DX
        dg = sum_t gxs * x       per-slab partial sums    -> DG_PART
        xs = x * g               recomputed, not saved    -> XS (may alias GXS: each
                                                             tile is read before written)
    The caller sums DG_PART over slabs and forms dA = (s gy B)^T xs with cuBLAS.
    """
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < N_IN
    mask_tk = (offs_t < T)[:, None] & mask_k[None, :]
    rows = offs_t.to(tl.int64)[:, None]
    gxs = tl.load(GXS + rows * stride_gxs + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
    x = tl.load(X + rows * stride_xt + offs_k[None, :] * stride_xk, mask=mask_tk, other=0.0).to(tl.float32)
    g = tl.load(G + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    tl.store(DX + rows * stride_dx + offs_k[None, :], (gxs * g).to(DX.dtype.element_ty), mask=mask_tk)
    tl.store(DG_PART + pid_t * N_IN + offs_k, tl.sum(gxs * x, axis=0), mask=mask_k)
    tl.store(XS + rows * stride_xs + offs_k[None, :], (x * g).to(XS.dtype.element_ty), mask=mask_tk)


@torch.library.custom_op("dit_trainer::dora_linear_input", mutates_args=())
def dora_linear_input(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-axis DoRA forward; returns (y, u), u kept for the backward.

    x [..., in]; weight, bias, lora_A, lora_B in x's dtype; magnitude and the detached
    norm are [in]. The Triton prologue makes xs and u in one pass over x; W0 xs (+ bias)
    and the rank-r update y += s u B^T are cuBLAS calls, the second accumulating in place.
    Inputs are validated by `kernels.dora`, the public entry point.
    """
    lead = x.shape[:-1]
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    n_tok = x2.shape[0]
    rank = lora_A.shape[0]
    g = dora_factor(magnitude, norm, eps, x.dtype)
    xs = torch.empty(n_tok, n_in, device=x.device, dtype=x.dtype)
    u = torch.empty(n_tok, rank, device=x.device, dtype=x.dtype)
    block_r = rank_block(rank)
    block_t, block_k = token_feature_blocks(block_r, _input_fwd_kernel)
    with device_guard(x):
        _input_fwd_kernel[(triton.cdiv(n_tok, block_t),)](
            x2,
            g,
            lora_A,
            xs,
            u,
            n_tok,
            n_in,
            rank,
            x2.stride(0),
            x2.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            xs.stride(0),
            u.stride(0),
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            BLOCK_R=block_r,
            DOT_PRECISION=dot_precision(x.dtype),
            num_warps=4,
        )
    y = F.linear(xs, weight, bias).addmm_(u, lora_B.t(), alpha=scale)
    return y.view(*lead, y.shape[-1]), u.view(*lead, rank)


@dora_linear_input.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, eps):
    lead = x.shape[:-1]
    return x.new_empty(*lead, lora_B.shape[0]), x.new_empty(*lead, lora_A.shape[0])


@torch.library.custom_op("dit_trainer::dora_linear_input_backward", mutates_args=())
def dora_linear_input_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    u: torch.Tensor,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dA, dB, dm) of the input-axis DoRA layer; see DoraInputFunction."""
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    u2 = u.reshape(-1, u.shape[-1])
    gy = grad_y.reshape(-1, lora_B.shape[0])
    n_tok = x2.shape[0]
    g = dora_factor(magnitude, norm, eps, x.dtype)
    grad_u = torch.mm(gy, lora_B).mul_(scale)
    gxs = torch.mm(gy, weight).addmm_(grad_u, lora_A)
    dx = torch.empty_like(gxs)
    # Elementwise: no rank tile, so the widest block.
    block_t, block_k = token_feature_blocks(16, _input_bwd_kernel)
    n_slabs = triton.cdiv(n_tok, block_t)
    dg_part = torch.empty(n_slabs, n_in, device=x.device, dtype=torch.float32)
    # xs overwrites gxs in place: gxs is dead once dx and dg are formed from it.
    xs = gxs
    with device_guard(x):
        _input_bwd_kernel[(n_slabs, triton.cdiv(n_in, block_k))](
            gxs,
            x2,
            g,
            dx,
            xs,
            dg_part,
            n_tok,
            n_in,
            gxs.stride(0),
            x2.stride(0),
            x2.stride(1),
            dx.stride(0),
            xs.stride(0),
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            num_warps=4,
        )
    grad_A = grad_u.t() @ xs
    grad_B = (gy.t() @ u2).mul_(scale)
    grad_m = (dg_part.sum(0) / (norm + eps)).to(magnitude.dtype)
    return dx.view(x.shape), grad_A, grad_B, grad_m


@dora_linear_input_backward.register_fake
def _(grad_y, x, weight, lora_A, lora_B, magnitude, norm, u, scale, eps):
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude)


class DoraInputFunction(torch.autograd.Function):
    """Autograd for `dit_trainer::dora_linear_input` (also registered on the op, so
    torch.compile traces forward and backward as two opaque nodes without a graph break).

    Backward derivation, with gy = dL/dy, g per input column, N detached:
        y = W0 xs + s B u + bias,   u = A xs,   xs = x * g
        dL/dbias = sum_t gy
        dL/du  = s gy B                      ->  dL/dA = (s gy B)^T xs,  dL/dB = s gy^T u
        dL/dxs = gy W0 + (s gy B) A  =: gxs  ->  dL/dx = gxs * g
        dL/dg  = sum_t gxs * x               ->  dL/dm = dL/dg / (N + eps)
    Only x and u are saved; xs is recomputed in the backward kernel (saves a [T, in]
    activation per layer). The base weight is frozen (`kernels.dora` routes a trainable
    one to the reference).
    """

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, eps):
        return dora_linear_input(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, magnitude, norm, scale, eps = inputs
        _, u = output
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, norm, u)
        ctx.scale = scale
        ctx.eps = eps
        ctx.mark_non_differentiable(u)
        # u is internal: never build a zero gradient for it.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y, _grad_u):
        if grad_y is None:
            return (None,) * 9
        x, weight, lora_A, lora_B, magnitude, norm, u = ctx.saved_tensors
        dx, grad_A, grad_B, grad_m = dora_linear_input_backward(
            grad_y, x, weight, lora_A, lora_B, magnitude, norm, u, ctx.scale, ctx.eps
        )
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, grad_bias, grad_A, grad_B, grad_m, None, None, None


torch.library.register_autograd(
    "dit_trainer::dora_linear_input",
    DoraInputFunction.backward,
    setup_context=DoraInputFunction.setup_context,
)
