"""Triton DoRA layer, output axis (PEFT / paper convention): one magnitude per output row.

Forward, with k = m / (N + eps) per output feature (N the detached row norm of
W0 + s B A, from `dora_norm`), u = A x and y0 = W0 x + bias:

    y = y0 + (k - 1)(y0 - bias) + k s B u          (= bias + k z,  z = W0 x + s B u)

Reference: `dora_reference.dora_linear(..., axis="output")`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_utils import device_guard, dora_factor, dot_precision, rank_block, token_feature_blocks


@triton.jit
def _output_fwd_kernel(
    Y0,
    U,
    B,
    K,
    BIAS,
    Y,
    Z,
    T,
    N,
    RANK,
    stride_y0,
    stride_u,
    stride_bn,
    stride_br,
    stride_y,
    stride_z,
    scale,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Epilogue on one [BLOCK_T, BLOCK_N] tile of the base output y0 = W0 x + bias:

        l = s * (u @ B^T)                      (tl.dot over the rank; B u never hits memory)
        y = y0 + (k - 1) * (y0 - bias) + k * l
        z = (y0 - bias) + l                    (saved: dk = sum_t gy * z in the backward)

    y uses the reference's formula rather than bias + k z, so k == 1 with B == 0 returns
    y0 unchanged and a fresh adapter stays an exact identity. Eager PyTorch spends one
    [T, out] round trip per operator here; this reads y0 and writes y and z once.
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_n = offs_n < N
    mask_r = offs_r < RANK
    mask_tn = mask_t[:, None] & mask_n[None, :]
    rows = offs_t.to(tl.int64)[:, None]

    y0 = tl.load(Y0 + rows * stride_y0 + offs_n[None, :], mask=mask_tn, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + offs_r[None, :], mask=mask_t[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    b_t = tl.load(
        B + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    lora = scale * tl.dot(u, b_t, input_precision=DOT_PRECISION)
    k = tl.load(K + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    unbiased = y0
    if HAS_BIAS:
        unbiased = y0 - tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y0 + (k - 1.0) * unbiased + k * lora
    tl.store(Y + rows * stride_y + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask_tn)
    tl.store(Z + rows * stride_z + offs_n[None, :], (unbiased + lora).to(Z.dtype.element_ty), mask=mask_tn)


@triton.jit
def _output_bwd_kernel(
    GY,
    Z,
    K,
    B,
    GZ,
    DU,
    DK_PART,
    T,
    N,
    RANK,
    stride_gyt,
    stride_gyn,
    stride_z,
    stride_bn,
    stride_br,
    stride_gz,
    stride_du,
    scale,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward of y = bias + k z for one BLOCK_T slab of tokens, walking all outputs.

    With gy = dL/dy and k constant per output column:
        gz  = k * gy                      dL/dz, also dL/dy0 (the base path)  -> GZ
        du  = s * gz @ B                  dL/du, u = A x (reduced over out)    -> DU
        dk  = sum_t gy * z                per-slab partial sums                -> DK_PART
    The caller sums DK_PART over slabs (deterministic, no atomics) and finishes with
    GEMMs: dx = gz W0 + du A, dA = du^T x, dB = s gz^T u, dm = dk / (N + eps).
    gz is rounded to the activation dtype before the dot, as autograd would hold it.
    """
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < RANK
    rows = offs_t.to(tl.int64)[:, None]
    du = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_tn = mask_t[:, None] & mask_n[None, :]
        gy = tl.load(GY + rows * stride_gyt + offs_n[None, :] * stride_gyn, mask=mask_tn, other=0.0).to(tl.float32)
        z = tl.load(Z + rows * stride_z + offs_n[None, :], mask=mask_tn, other=0.0).to(tl.float32)
        k = tl.load(K + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        gz = (gy * k).to(GZ.dtype.element_ty)
        tl.store(GZ + rows * stride_gz + offs_n[None, :], gz, mask=mask_tn)
        b = tl.load(
            B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        ).to(tl.float32)
        du += tl.dot(gz.to(tl.float32), b, input_precision=DOT_PRECISION)
        tl.store(DK_PART + pid * N + offs_n, tl.sum(gy * z, axis=0), mask=mask_n)
    tl.store(
        DU + rows * stride_du + offs_r[None, :],
        (scale * du).to(DU.dtype.element_ty),
        mask=mask_t[:, None] & mask_r[None, :],
    )


@torch.library.custom_op("dit_trainer::dora_linear_output", mutates_args=())
def dora_linear_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output-axis DoRA forward; returns (y, z, u), z and u kept for the backward.

    x [..., in]; weight, bias, lora_A, lora_B in x's dtype; magnitude and the detached
    norm are [out]. The two GEMMs stay in cuBLAS (W0 x with the bias in its epilogue, and
    the rank-r A x); the Triton kernel fuses everything after them. Inputs are validated
    by `kernels.dora`, the public entry point.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n_out, rank = lora_B.shape
    base = F.linear(x2, weight, bias)
    u = F.linear(x2, lora_A)
    k = dora_factor(magnitude, norm, eps, x.dtype)
    y = torch.empty_like(base)
    # z overwrites the base output in place (each tile is read before it is written):
    # one [T, out] buffer fewer at the forward's peak.
    z = base
    n_tok = base.shape[0]
    block_r = rank_block(rank)
    block_t, block_n = token_feature_blocks(block_r, _output_fwd_kernel)
    with device_guard(x):
        _output_fwd_kernel[(triton.cdiv(n_tok, block_t), triton.cdiv(n_out, block_n))](
            base,
            u,
            lora_B,
            k,
            bias,
            y,
            z,
            n_tok,
            n_out,
            rank,
            base.stride(0),
            u.stride(0),
            lora_B.stride(0),
            lora_B.stride(1),
            y.stride(0),
            z.stride(0),
            scale,
            HAS_BIAS=bias is not None,
            BLOCK_T=block_t,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            DOT_PRECISION=dot_precision(x.dtype),
            num_warps=4,
        )
    return y.view(*lead, n_out), z.view(*lead, n_out), u.view(*lead, rank)


@dora_linear_output.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, eps):
    lead = x.shape[:-1]
    out = x.new_empty(*lead, lora_B.shape[0])
    return out, torch.empty_like(out), x.new_empty(*lead, lora_A.shape[0])


@torch.library.custom_op("dit_trainer::dora_linear_output_backward", mutates_args=())
def dora_linear_output_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dA, dB, dm) of the output-axis DoRA layer; see _output_bwd_kernel."""
    x2 = x.reshape(-1, x.shape[-1])
    u2 = u.reshape(-1, u.shape[-1])
    n_out, rank = lora_B.shape
    gy = grad_y.reshape(-1, n_out)
    z2 = z.reshape(-1, n_out)
    n_tok = gy.shape[0]
    k = dora_factor(magnitude, norm, eps, x.dtype)
    block_r = rank_block(rank)
    block_t, block_n = token_feature_blocks(block_r, _output_bwd_kernel)
    n_slabs = triton.cdiv(n_tok, block_t)
    gz = torch.empty_like(z2)
    du = torch.empty_like(u2)
    dk_part = torch.empty(n_slabs, n_out, device=x.device, dtype=torch.float32)
    with device_guard(x):
        _output_bwd_kernel[(n_slabs,)](
            gy,
            z2,
            k,
            lora_B,
            gz,
            du,
            dk_part,
            n_tok,
            n_out,
            rank,
            gy.stride(0),
            gy.stride(1),
            z2.stride(0),
            lora_B.stride(0),
            lora_B.stride(1),
            gz.stride(0),
            du.stride(0),
            scale,
            BLOCK_T=block_t,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            DOT_PRECISION=dot_precision(x.dtype),
            num_warps=4,
        )
    dx = torch.mm(gz, weight).addmm_(du, lora_A)
    grad_A = du.t() @ x2
    grad_B = (gz.t() @ u2).mul_(scale)
    grad_m = (dk_part.sum(0) / (norm + eps)).to(magnitude.dtype)
    return dx.view(x.shape), grad_A, grad_B, grad_m


@dora_linear_output_backward.register_fake
def _(grad_y, x, weight, lora_A, lora_B, magnitude, norm, z, u, scale, eps):
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude)


class DoraOutputFunction(torch.autograd.Function):
    """Autograd for `dit_trainer::dora_linear_output` (also registered on the op, so
    torch.compile traces forward and backward as two opaque nodes without a graph break).

    Backward derivation, with gy = dL/dy, k per output column, N detached:
        y = bias + k (W0 x + s B u),   u = A x
        dL/dbias = sum_t gy                  (the bias is not rescaled)
        dL/dk    = sum_t gy * z,  z = W0 x + s B u   ->  dL/dm = dL/dk / (N + eps)
        gz = k * gy:  dL/dx = gz W0 + (s gz B) A,  dL/dA = (s gz B)^T x,  dL/dB = s gz^T u
    The base weight is frozen (`kernels.dora` routes a trainable one to the reference).
    """

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, eps):
        return dora_linear_output(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, magnitude, norm, scale, eps = inputs
        _, z, u = output
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, norm, z, u)
        ctx.scale = scale
        ctx.eps = eps
        ctx.mark_non_differentiable(z, u)
        # z and u are internal: never build zero gradients for them.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y, _grad_z, _grad_u):
        if grad_y is None:
            return (None,) * 9
        x, weight, lora_A, lora_B, magnitude, norm, z, u = ctx.saved_tensors
        dx, grad_A, grad_B, grad_m = dora_linear_output_backward(
            grad_y, x, weight, lora_A, lora_B, magnitude, norm, z, u, ctx.scale, ctx.eps
        )
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, grad_bias, grad_A, grad_B, grad_m, None, None, None


torch.library.register_autograd(
    "dit_trainer::dora_linear_output",
    DoraOutputFunction.backward,
    setup_context=DoraOutputFunction.setup_context,
)
