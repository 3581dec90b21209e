"""Initial values of the LoRA factors.

kaiming     A ~ kaiming-uniform (a = sqrt(5), as kohya and PEFT), B = 0: the adapter
            starts as an exact identity.
orthogonal  A with orthonormal rows, B = 0.
pissa       PiSSA (Meng et al. 2024, PEFT's `init_lora_weights="pissa"`): from the
            top-r SVD W0 = U S V^T, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), and
            the base becomes the residual W0 - s B A, so the layer starts unchanged
            while the adapter holds the principal subspace.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

INITS = ("kaiming", "orthogonal", "pissa")


def init_down(lora_A: torch.Tensor, init: str, name: str) -> None:
    """Fill A for kaiming / orthogonal init (B stays zero)."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        elif init == "orthogonal":
            nn.init.orthogonal_(lora_A.view(lora_A.shape[0], -1))
        else:
            raise ValueError(f"{name}: init {init!r} is not one of {INITS}")


def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) fp32 with s * B @ A the best rank-r approximation of weight."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = (s[:rank] / scale).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
