"""Flow-matching losses with optional per-pixel weights.

With weights w [B, 1, H, W] (from masks: w = m^gamma (1 - mu) + mu), the loss is the
weighted mean sum(L * w) / (C * sum(w)), so zero-weight regions add no gradient and the
scale does not depend on how much of the image is masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("l2", "huber", "smooth_l1")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.1) -> torch.Tensor:
    if kind == "l2":
        return (pred - target).square()
    if kind == "huber":
        # Pseudo-Huber (kohya): 2c (sqrt((p - t)^2 + c^2) - c), L2-like near 0, L1-like far out.
        return 2.0 * huber_c * (torch.sqrt((pred - target).square() + huber_c**2) - huber_c)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=huber_c)
    raise ValueError(f"loss {kind!r} is not one of {LOSSES}")


def flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    kind: str = "l2",
    huber_c: float = 0.1,
) -> torch.Tensor:
    """Mean loss over (B, C, H, W); weights (B, 1, H, W) make it the weighted mean."""
    loss = elementwise_loss(pred.float(), target.float(), kind, huber_c)
    if weights is None:
        return loss.mean()
    weights = weights.to(loss.dtype)
    return (loss * weights).sum() / (loss.shape[1] * weights.sum().clamp_min(1e-8))
