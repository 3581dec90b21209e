"""LoRA on a frozen Conv layer (kohya's conv_dim / conv_alpha; LoRA only, DoRA is Linear-only).

    y = conv(x; W0) + mult * s * up(down(x))

down is a Conv with the base's kernel, stride, padding and dilation ([r, in, *k]);
up is a 1x1 Conv ([out, r, 1, ...]). ComfyUI merges it as
W0 + s * (up.flatten(1) @ down.flatten(1)).reshape(W0.shape), which is this layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter_base import AdapterModule
from .factor_init import init_down

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAConvModule(AdapterModule):
    kind = "conv"
    algo = "lora"
    magnitude = None
    split_dims = None
    parts = 1

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        use_rslora: bool = False,
        init: str = "kaiming",
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ):
        super().__init__(name, base, rank, alpha, use_rslora, dropout, rank_dropout, module_dropout)
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(
                f"{name}: conv LoRA needs groups=1 and zero padding (has groups={base.groups}, "
                f"padding_mode={base.padding_mode!r}); exclude it with exclude_patterns"
            )
        if init == "pissa":
            raise ValueError(f"{name}: init='pissa' is for Linear layers; use init='kaiming' (or exclude this Conv)")
        out_channels, in_channels, *kernel = base.weight.shape
        max_rank = min(out_channels, in_channels * math.prod(kernel))
        if not 1 <= rank <= max_rank:
            raise ValueError(f"{name}: conv rank {rank} must be between 1 and {max_rank} (out_channels, in_channels * kernel)")
        self.init = init
        self.spatial_dims = len(kernel)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_channels, *kernel, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_channels, rank, *[1] * len(kernel), dtype=torch.float32, device=device))
        init_down(self.lora_A, init, name)

    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.detach().float(), self.lora_B.detach().float()

    def export_alpha(self) -> float:
        return self.scale * self.rank

    def original_weight(self) -> torch.Tensor:
        return self.base.weight.float()

    def adapted_weight(self) -> torch.Tensor:
        down, up = self.export_factors()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(self.base.weight.shape)
        return self.original_weight() + self.scale * delta

    def delta_weight(self) -> torch.Tensor:
        return self.adapted_weight() - self.original_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if not self.enabled or self.multiplier == 0.0 or self.skips_this_forward():
            return out
        base = self.base
        hidden = base._conv_forward(x, self.lora_A.to(x.dtype), None)  # (B, r, *spatial)
        hidden, scale = self.rank_space_dropouts(hidden, channel_dim=1)
        delta = _CONV_FUNCTIONS[self.spatial_dims](hidden, self.lora_B.to(x.dtype))
        return out + self.multiplier * scale * delta
