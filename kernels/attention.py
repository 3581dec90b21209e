"""Attention entry point used by every model in the engine.

Layout contract: q, k, v are [batch, tokens, heads, head_dim]; the result has the
same layout. `key_mask` is an optional [batch, tokens] bool tensor, True where a key
may be attended to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention over [B, L, H, D] tensors."""
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    )  # (B, H, L, D)
    return out.transpose(1, 2)
