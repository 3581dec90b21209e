"""What every adapter shares: scale, multiplier, enable flag, dropouts, attaching.

An adapter replaces its frozen base layer's `forward` while attached (kohya's
`apply_to`), so the model keeps its own modules and state-dict keys.

Dropouts follow kohya sd-scripts (`networks/lora.py`), train mode only:
* network (neuron) dropout: `F.dropout` on the rank-space activations A x;
* rank dropout: one keep/drop draw per (sample, rank channel), shared by all tokens,
  mask shape [batch, r], and the scale multiplied by 1 / (1 - p);
* module dropout: with probability p the whole adapter is skipped for that forward.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """Adapter scale: alpha / r, or alpha / sqrt(r) for RS-LoRA (alpha 0 -> sqrt(r), i.e. scale 1)."""
    if use_rslora:
        return (alpha if alpha != 0 else math.sqrt(rank)) / math.sqrt(rank)
    return alpha / rank


def check_probability(name: str, option: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: {option}={value} must be in [0, 1)")


class AdapterModule(nn.Module, ABC):
    """Base of the LoRA, LoHa and LoKr adapters. Subclasses define `forward` and `delta_weight`."""

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        use_rslora: bool,
        dropout: float,
        rank_dropout: float,
        module_dropout: float,
    ):
        super().__init__()
        for option, value in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            check_probability(name, option, value)
        self.name = name
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = 1.0
        self.enabled = True
        # Held outside the module tree: the base belongs to the model, not to the adapter's state.
        self._base = [base]
        self._base_forward = base.forward

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """Merged weight change against the original base weight at multiplier 1 (fp32)."""

    def skips_this_forward(self) -> bool:
        """Module dropout: skip the whole adapter with probability module_dropout (train mode)."""
        return bool(self.training and self.module_dropout and torch.rand(()) < self.module_dropout)

    def rank_space_dropouts(self, hidden: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, float]:
        """Neuron and rank dropout on A x (train mode); returns it with the scale to use."""
        scale = self.scale
        if not self.training:
            return hidden, scale
        if self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)
        if self.rank_dropout:
            # One keep/drop decision per sample and rank channel, shared by all its tokens (kohya).
            keep_shape = [1] * hidden.dim()
            keep_shape[0] = hidden.shape[0]
            keep_shape[channel_dim] = hidden.shape[channel_dim]
            keep = (torch.rand(keep_shape, device=hidden.device) > self.rank_dropout).to(hidden.dtype)
            hidden = hidden * keep
            scale = scale / (1.0 - self.rank_dropout)
        return hidden, scale

    def attach(self) -> None:
        self.base.forward = self.forward

    def detach_from_base(self) -> None:
        self.base.forward = self._base_forward
