"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS `loha`): a Hadamard product of two low-rank matrices.

    dW = (w1_a @ w1_b) * (w2_a @ w2_b),   scale alpha / rank (RS-LoRA: alpha / sqrt(rank))

w*_a [out, r], w*_b [r, in * kernel]: ComfyUI's `hada_w1_a` ... `hada_w2_b`
(comfy/weight_adapter/loha.py), which reshapes dW to a Conv's weight shape. The rank of
dW can reach r^2, which is why LoHa needs a lower rank than LoRA for the same capacity.
Init as LyCORIS: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0, so a new adapter is an
exact no-op. Tucker Conv factors (hada_t1 / hada_t2) are not trained here.

dW is rebuilt in each forward. Its autograd keeps only the four factors and rebuilds the
two [out, in] products in the backward pass (as ComfyUI's and LyCORIS's HadaWeight), so a
layer holds one dW for the backward instead of three.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .product_base import ProductAdapter


class _HadamardWeight(torch.autograd.Function):
    """(w1_a @ w1_b) * (w2_a @ w2_b), saving the factors instead of the products."""

    @staticmethod
    def forward(ctx, w1_a, w1_b, w2_a, w2_b):
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        return (w1_a @ w1_b) * (w2_a @ w2_b)

    @staticmethod
    def backward(ctx, grad):
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        grad_1 = grad * (w2_a @ w2_b)  # d dW / d (w1_a @ w1_b)
        grad_2 = grad * (w1_a @ w1_b)
        return grad_1 @ w1_b.t(), w1_a.t() @ grad_1, grad_2 @ w2_b.t(), w2_a.t() @ grad_2


class LoHaModule(ProductAdapter):
    algo = "loha"
    FILE_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, use_rslora: bool = False,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__(name, base, rank, alpha, use_rslora, dropout, rank_dropout, module_dropout)
        if rank < 1:
            raise ValueError(f"{name}: LoHa rank {rank} must be at least 1")
        device = base.weight.device
        shapes = {"hada_w1_a": (self.out_dim, rank), "hada_w1_b": (rank, self.in_flat),
                  "hada_w2_a": (self.out_dim, rank), "hada_w2_b": (rank, self.in_flat)}
        for key, shape in shapes.items():
            setattr(self, key, nn.Parameter(torch.empty(shape, dtype=torch.float32, device=device)))
        with torch.no_grad():
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)

    def diff_weight(self) -> torch.Tensor:
        return _HadamardWeight.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
