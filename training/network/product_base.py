"""What LoHa and LoKr share: a weight change rebuilt from its factors, applied beside the base layer.

    y = base(x) + mult * op(x, s * dW)        op: the layer's own linear / conv

This is ComfyUI's merge W0 + strength * (alpha / rank) * dW read as a forward, so
strength 1 and 0.5 give the same layer outputs as the merged file. The parameters hold
the file's tensors themselves (ComfyUI / LyCORIS names), so export and import copy.

Dropouts follow LyCORIS (`lycoris/modules/loha.py`, `lokr.py`): network dropout is not
defined for these algorithms (refused); rank dropout drops whole output rows of dW, one
draw per forward, rescaled by 1 / (1 - p) like this pack's LoRA rank dropout; module
dropout skips the adapter.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter_base import AdapterModule

_CONV_KINDS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ProductAdapter(AdapterModule):
    """Base of LoHa / LoKr. Subclasses set `algo`, FILE_KEYS, and define `diff_weight` (dW, with grad)."""

    magnitude = None
    split_dims = None
    parts = 1
    init = "kaiming"
    FILE_KEYS: tuple[str, ...] = ()

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, use_rslora: bool,
                 dropout: float, rank_dropout: float, module_dropout: float):
        super().__init__(name, base, rank, alpha, use_rslora, dropout, rank_dropout, module_dropout)
        if dropout:
            raise ValueError(
                f"{name}: network dropout is not defined for {self.algo} (its change is a rebuilt weight, not a "
                "rank-space activation; LyCORIS does not implement it either); use rank_dropout or module_dropout"
            )
        if isinstance(base, _CONV_KINDS) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError(
                f"{name}: {self.algo} on a Conv needs groups=1 and zero padding (has groups={base.groups}, "
                f"padding_mode={base.padding_mode!r}); exclude it with exclude_patterns"
            )
        self.kind = "linear" if isinstance(base, nn.Linear) else "conv"
        weight_shape = base.weight.shape
        self.out_dim = weight_shape[0]
        self.in_flat = weight_shape[1:].numel()  # in_channels * kernel for a Conv (LyCORIS non-Tucker layout)

    @abstractmethod
    def diff_weight(self) -> torch.Tensor:
        """dW at scale 1, fp32, shaped [out, in * kernel]; differentiable."""

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters under ComfyUI's key suffixes (detached fp32)."""
        return {key: getattr(self, key).detach().float() for key in self.FILE_KEYS}

    def export_alpha(self) -> float:
        """The alpha that makes ComfyUI's alpha / rank this adapter's scale."""
        return self.scale * self.rank

    def original_weight(self) -> torch.Tensor:
        return self.base.weight.float()

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """Merged weight change at multiplier 1, fp32, in the base weight's shape."""
        return (self.scale * self.diff_weight()).reshape(self.base.weight.shape)

    def adapted_weight(self) -> torch.Tensor:
        return self.original_weight() + self.delta_weight()

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """op(x, dW) at scale 1; LoKr overrides it for Linear layers with a cheaper product."""
        delta = self.diff_weight().reshape(self.base.weight.shape).to(x.dtype)
        if self.kind == "linear":
            return F.linear(x, delta)
        return self.base._conv_forward(x, delta, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if not self.enabled or self.multiplier == 0.0 or self.skips_this_forward():
            return out
        delta = self.delta_output(x)
        scale = self.scale
        if self.training and self.rank_dropout:
            # LyCORIS: whole output rows of dW kept or dropped, one draw per forward.
            channel_dim = -1 if self.kind == "linear" else 1
            keep_shape = [1] * delta.dim()
            keep_shape[channel_dim] = self.out_dim
            keep = (torch.rand(self.out_dim, device=delta.device) > self.rank_dropout).to(delta.dtype)
            delta = delta * keep.view(keep_shape)
            scale = scale / (1.0 - self.rank_dropout)
        return out + (self.multiplier * scale) * delta
