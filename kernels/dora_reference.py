"""DoRA in plain PyTorch: the reference every kernel is tested against, and the
path the engine runs wherever the Triton kernels do not apply (CPU, MPS, forced).

Notation: W0 [out, in] frozen base weight, A [r, in], B [out, r], s the LoRA scale
(alpha / r, or alpha / sqrt(r) for RS-LoRA), m the learned magnitude, eps the
normaliser ComfyUI adds (torch.finfo(float32).eps on its fp32 merge path).

    V = W0 + s * B @ A

* input axis (per input column j, ComfyUI's `dora_scale` [1, in]):
      N_j = ||V[:, j]||,   W_dora = V * (m_j / (N_j + eps))  (column scaling)
      y   = W0 (x * g) + s * B (A (x * g)) + bias,   g = m / (N + eps)
* output axis (per output row i, the PEFT / paper convention):
      N_i = ||V[i, :]||,   k = m / (N + eps)
      y   = k * (W0 x) + k * s * B (A x) + bias = y0 + (k - 1)(y0 - bias) + k s B(Ax)

N is detached (DoRA paper, section 4.3): gradients flow to A, B and m through g / k
but not through the norm. Bias is not rescaled (PEFT). The norm never builds the
[out, in] product B @ A:

    input axis:  N_j^2 = ||W0[:, j]||^2 + 2 s (W0^T B)[j] . A[:, j] + s^2 A[:, j]^T (B^T B) A[:, j]
    output axis: N_i^2 = ||W0[i, :]||^2 + 2 s (W0 A^T)[i] . B[i]    + s^2 B[i] (A A^T) B[i]^T

||W0||^2 per column / row depends only on the frozen base, so callers compute it
once with `base_sq_norm` and pass it in. All norm arithmetic is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AXES = ("input", "output")


def base_sq_norm(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """Squared column (input axis, [in]) or row (output axis, [out]) norms of W0, fp32."""
    w = weight.float()
    if axis == "input":
        return w.square().sum(dim=0)
    if axis == "output":
        return w.square().sum(dim=1)
    raise ValueError(f"DoRA axis {axis!r} is not one of {AXES}")


def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    axis: str,
    base_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """||W0 + s B A|| per input column ([in]) or output row ([out]), fp32, no [out, in] product."""
    w = weight.float()
    a = lora_A.float()
    b = lora_B.float()
    if base_sq is None:
        base_sq = base_sq_norm(weight, axis)
    if axis == "input":
        cross = (w.t() @ b).mul(a.t()).sum(dim=1)  # (in,)
        low_rank = (a.t() @ (b.t() @ b)).mul(a.t()).sum(dim=1)  # (in,)
    elif axis == "output":
        cross = (w @ a.t()).mul(b).sum(dim=1)  # (out,)
        low_rank = (b @ (a @ a.t())).mul(b).sum(dim=1)  # (out,)
    else:
        raise ValueError(f"DoRA axis {axis!r} is not one of {AXES}")
    sq = base_sq + 2.0 * scale * cross + (scale * scale) * low_rank
    # Cancellation can push a true zero a hair below 0; a norm is never negative.
    return sq.clamp_min(0.0).sqrt()


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    axis: str,
    eps: float,
    base_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA forward y = W_dora x + bias for x [..., in]; magnitude is [in] or [out]."""
    with torch.no_grad():
        norm = dora_weight_norm(weight, lora_A, lora_B, scale, axis, base_sq)
    factor = magnitude.float() / (norm + eps)  # detached norm, live magnitude
    if axis == "input":
        xs = x * factor.to(x.dtype)
        return F.linear(xs, weight, bias) + scale * F.linear(F.linear(xs, lora_A), lora_B)
    # y0 + (k - 1)(y0 - bias) + k s B(Ax): with k == 1 and B == 0 this returns the
    # base layer's output bit for bit, so a fresh adapter is an exact identity.
    base_out = F.linear(x, weight, bias)
    k = factor.to(base_out.dtype)
    unbiased = base_out if bias is None else base_out - bias
    return base_out + (k - 1.0) * unbiased + k * (scale * F.linear(F.linear(x, lora_A), lora_B))
