"""One LoRA / DoRA adapter on one frozen nn.Linear.

LoRA (Hu et al. 2021):   y = W0 x + b + mult * s * B (A x)
DoRA (Liu et al. 2024):  W_dora = V * m / (||V|| + eps),  V = W0 + s B A, norm detached
                         (see kernels/dora_reference.py for both axes and the norm formula)

s = alpha / r, or alpha / sqrt(r) with RS-LoRA (Kalajdzievski 2023; alpha 0 means sqrt(r)).
Init: A kaiming-uniform (a = sqrt(5), as PEFT and kohya), B zeros, so a new adapter is
an exact identity. The DoRA magnitude starts at ||W0|| + eps (eps as ComfyUI adds it),
which makes m / (||V|| + eps) exactly 1 while B is zero.

`mult` follows ComfyUI's LoraLoader strength: LoRA scales the delta linearly; DoRA
interpolates between the base and the fully re-normalised layer,
y = base + mult * (dora - base). mult 0 returns the base layer's own output.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.dora import base_sq_norm, dora_linear, dora_weight_norm

# ComfyUI adds this to DoRA norms on its fp32 merge path (comfy/weight_adapter/base.py).
DORA_EPS = torch.finfo(torch.float32).eps
ALGOS = ("lora", "dora")
DORA_AXES = ("input", "output")
INITS = ("kaiming", "orthogonal")


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """Adapter scale: alpha / r, or alpha / sqrt(r) for RS-LoRA (alpha 0 -> sqrt(r), i.e. scale 1)."""
    if use_rslora:
        return (alpha if alpha != 0 else math.sqrt(rank)) / math.sqrt(rank)
    return alpha / rank


class LoRAModule(nn.Module):
    """Adapter parameters for one Linear; `forward` replaces the Linear's forward while attached."""

    def __init__(
        self,
        name: str,
        base: nn.Linear,
        rank: int,
        alpha: float,
        algo: str = "lora",
        dora_axis: str = "input",
        use_rslora: bool = False,
        init: str = "kaiming",
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ):
        super().__init__()
        if algo not in ALGOS:
            raise ValueError(f"{name}: algo {algo!r} is not one of {ALGOS}")
        if dora_axis not in DORA_AXES:
            raise ValueError(f"{name}: DoRA axis {dora_axis!r} is not one of {DORA_AXES}")
        out_features, in_features = base.weight.shape
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"{name}: rank {rank} must be between 1 and min(in_dim={in_features}, out_dim={out_features})"
            )
        self.name = name
        self.rank = rank
        self.alpha = float(alpha)
        self.algo = algo
        self.dora_axis = dora_axis
        self.use_rslora = use_rslora
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = 1.0
        self.enabled = True
        self.dora_backend = "auto"
        # Held outside the module tree: the base belongs to the model, not to the adapter's state.
        self._base = [base]
        self._base_forward = base.forward

        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=base.weight.device))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "orthogonal":
            nn.init.orthogonal_(self.lora_A)
        else:
            raise ValueError(f"{name}: init {init!r} is not one of {INITS}")
        self.magnitude = None
        if algo == "dora":
            self.magnitude = nn.Parameter(self.base_norm() + DORA_EPS)

    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)

    def base_sq(self) -> torch.Tensor:
        """||W0||^2 per DoRA axis, cached: the base is frozen, so it is read once.

        The cache key is the weight's storage and in-place version counter, so a
        replaced or modified base weight is picked up.
        """
        weight = self.base.weight
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if getattr(self, "_base_sq_key", None) != key:
            self._base_sq = base_sq_norm(weight.detach(), self.dora_axis)
            self._base_sq_key = key
        return self._base_sq

    def base_norm(self) -> torch.Tensor:
        return self.base_sq().sqrt()

    def dora_norm(self) -> torch.Tensor:
        """||W0 + s B A|| on the DoRA axis, fp32, detached; never builds B @ A."""
        with torch.no_grad():
            return dora_weight_norm(self.base.weight, self.lora_A, self.lora_B, self.scale, self.dora_axis, self.base_sq())

    def delta_weight(self) -> torch.Tensor:
        """Merged weight change W_adapted - W0 at multiplier 1 (fp32); for tests and export."""
        w0 = self.base.weight.float()
        v = w0 + self.scale * (self.lora_B @ self.lora_A)
        if self.algo == "lora":
            return v - w0
        factor = self.magnitude / (self.dora_norm() + DORA_EPS)
        w_dora = v * (factor[None, :] if self.dora_axis == "input" else factor[:, None])
        return w_dora - w0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.multiplier == 0.0:
            return self._base_forward(x)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return self._base_forward(x)
        if self.algo == "dora":
            return self._dora_forward(x)
        return self._base_forward(x) + self.multiplier * self._lora_delta(x)

    def _lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A x) with neuron and rank dropout (train mode only)."""
        hidden = F.linear(x, self.lora_A.to(x.dtype))  # (..., r)
        if self.training and self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            # One keep/drop decision per sample and rank, shared by all its tokens (kohya).
            keep_shape = (hidden.shape[0],) + (1,) * (hidden.dim() - 2) + (self.rank,)
            keep = (torch.rand(keep_shape, device=hidden.device) > self.rank_dropout).to(hidden.dtype)
            hidden = hidden * keep
            scale = scale / (1.0 - self.rank_dropout)
        return scale * F.linear(hidden, self.lora_B.to(x.dtype))

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        dtype = x.dtype
        out = dora_linear(
            x,
            base.weight.to(dtype),
            None if base.bias is None else base.bias.to(dtype),
            self.lora_A.to(dtype),
            self.lora_B.to(dtype),
            self.magnitude,
            self.scale,
            self.dora_axis,
            DORA_EPS,
            base_sq=self.base_sq(),
            backend=self.dora_backend,
        )
        if self.multiplier == 1.0:
            return out
        base_out = self._base_forward(x)
        return base_out + self.multiplier * (out - base_out)

    def attach(self) -> None:
        self.base.forward = self.forward

    def detach_from_base(self) -> None:
        self.base.forward = self._base_forward
