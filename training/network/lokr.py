"""LoKr (Edalati et al. 2022, KronA; LyCORIS `lokr`): a Kronecker product of a small and a large factor.

    dW = kron(w1, w2),   w1 [a, c] full,   w2 [b, d * kernel] = w2_a @ w2_b or full

out = a * b and in = c * d come from LyCORIS's `factorization(dim, factor)` (a <= b,
a = factor when it divides the dimension; factor -1 picks the most balanced split).
w2 is decomposed at rank r (w2_a [b, r], w2_b [r, d * kernel]) unless r >= max(b, d) / 2
or `full_matrix`, as LyCORIS decides. Scale: alpha / r with a decomposed w2; 1 when both
factors are full, which is what ComfyUI applies (comfy/weight_adapter/lokr.py divides
alpha by the rank of a decomposed factor only). A Conv's w2 is kept and written 2-D,
which ComfyUI reshapes to the weight (the same entries as LyCORIS's [b, d, *kernel]).
Init as LyCORIS: w1 and w2_a kaiming-uniform, w2_b (or the full w2) zero: a no-op.

Linear forward without building dW: with x viewed as X [c, d],
kron(w1, w2) x = vec(w1 X w2^T).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .product_base import ProductAdapter


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when it divides, else the split closest to
    `factor` from below (factor -1: the most balanced one). LyCORIS's rule, so files get its shapes."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrModule(ProductAdapter):
    algo = "lokr"

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, use_rslora: bool = False,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 factor: int = -1, full_matrix: bool = False):
        super().__init__(name, base, rank, alpha, use_rslora, dropout, rank_dropout, module_dropout)
        if rank < 1:
            raise ValueError(f"{name}: LoKr rank {rank} must be at least 1")
        out_dim, in_dim, *kernel = base.weight.shape
        self.kernel = math.prod(kernel)
        a, b = factorization(out_dim, factor)
        c, d = factorization(in_dim, factor)
        self.factor = factor
        self.full_w2 = full_matrix or rank >= max(b, d) / 2
        device = base.weight.device
        self.lokr_w1 = nn.Parameter(torch.empty(a, c, dtype=torch.float32, device=device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
            if self.full_w2:
                self.lokr_w2 = nn.Parameter(torch.zeros(b, d * self.kernel, dtype=torch.float32, device=device))
            else:
                self.lokr_w2_a = nn.Parameter(torch.empty(b, rank, dtype=torch.float32, device=device))
                self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * self.kernel, dtype=torch.float32, device=device))
                nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        self.FILE_KEYS = ("lokr_w1", "lokr_w2") if self.full_w2 else ("lokr_w1", "lokr_w2_a", "lokr_w2_b")

    @property
    def scale(self) -> float:
        return 1.0 if self.full_w2 else super().scale

    def export_alpha(self) -> float:
        # Both factors full: ComfyUI ignores alpha (scale 1); LyCORIS writes alpha = rank then.
        return float(self.rank) if self.full_w2 else super().export_alpha()

    def w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b

    def diff_weight(self) -> torch.Tensor:
        return torch.kron(self.lokr_w1, self.w2())

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "linear":
            return super().delta_output(x)
        w1, w2 = self.lokr_w1.to(x.dtype), self.w2().to(x.dtype)
        blocks = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])  # X [..., c, d]
        out = w1 @ (blocks @ w2.t())  # w1 X w2^T: [..., a, b]
        return out.reshape(*x.shape[:-1], self.out_dim)
