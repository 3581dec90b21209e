"""One LoRA / DoRA adapter on one frozen nn.Linear.

LoRA (Hu et al. 2021):   y = W0 x + b + mult * s * B (A x)
DoRA (Liu et al. 2024):  W_dora = V * m / (||V|| + eps),  V = W0 + s B A, norm detached
                         (see kernels/dora_reference.py for both axes and the norm formula)

s = alpha / r, or alpha / sqrt(r) with RS-LoRA (Kalajdzievski 2023; alpha 0 means sqrt(r)).
Init (factor_init.py): A kaiming-uniform or orthogonal and B zeros, so a new adapter is an
exact identity; or PiSSA. The DoRA magnitude starts at ||W0|| + eps of the live,
dequantised base weight (eps as ComfyUI adds it), so m / (||V|| + eps) is exactly 1
while B is zero.

`mult` follows ComfyUI's LoraLoader strength: LoRA scales the delta linearly; DoRA
interpolates between the base and the fully re-normalised layer,
y = base + mult * (dora - base). mult 0 returns the base layer's own output.

Split projections (`split_dims`, kohya's split_qkv): a fused q|k|v Linear gets one
LoRA per row slice, A_p [r, in] and B_p [rows_p, r]. They are held stacked: lora_A is
[parts * r, in] and lora_B keeps [out, r], rows of slice p belonging to A_p. Exported
fused, that is A stacked and B block-diagonal [out, parts * r], with alpha times parts
so that ComfyUI's alpha / rank is unchanged.

PiSSA moves the principal part of W0 into the adapter, so the model's weight holds the
residual while attached; `detach_from_base` puts the original weight back bit for bit.
Exports stay exact against the original checkpoint through PEFT's PiSSA -> LoRA
conversion: A_save = [A; A0], B_save = [B, -B0] (rank 2r, same scale).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.dora import base_sq_norm, dora_linear, dora_weight_norm
from ..models.quantization import FLOAT8_DTYPES, dequantized_weight, weight_scale_of
from .adapter_base import AdapterModule, lora_scale
from .factor_init import INITS, init_down, pissa_factors

# ComfyUI adds this to DoRA norms on its fp32 merge path (comfy/weight_adapter/base.py).
DORA_EPS = torch.finfo(torch.float32).eps
ALGOS = ("lora", "dora")
DORA_AXES = ("input", "output")

__all__ = ["ALGOS", "DORA_AXES", "DORA_EPS", "INITS", "LoRAModule", "lora_scale", "weight_scale_of"]


class LoRAModule(AdapterModule):
    """Adapter parameters for one Linear; `forward` replaces the Linear's forward while attached."""

    kind = "linear"

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
        split_dims: list[int] | None = None,
    ):
        super().__init__(name, base, rank, alpha, use_rslora, dropout, rank_dropout, module_dropout)
        if algo not in ALGOS:
            raise ValueError(f"{name}: algo {algo!r} is not one of {ALGOS}")
        if dora_axis not in DORA_AXES:
            raise ValueError(f"{name}: DoRA axis {dora_axis!r} is not one of {DORA_AXES}")
        if init not in INITS:
            raise ValueError(f"{name}: init {init!r} is not one of {INITS}")
        out_features, in_features = base.weight.shape
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"{name}: rank {rank} must be between 1 and min(in_dim={in_features}, out_dim={out_features})"
            )
        if split_dims is not None and (sum(split_dims) != out_features or min(split_dims) < 1):
            raise ValueError(f"{name}: split_dims {split_dims} must be positive and sum to out_dim={out_features}")
        if algo == "dora" and (dropout or rank_dropout or split_dims):
            # The network disables DoRA on such layers with a logged reason; a direct
            # construction is refused rather than silently computing something else.
            raise ValueError(f"{name}: DoRA cannot be combined with dropout, rank_dropout or split_dims; use algo='lora'")
        is_float8 = base.weight.dtype in FLOAT8_DTYPES
        if init == "pissa" and (algo == "dora" or split_dims or is_float8):
            raise ValueError(
                f"{name}: init='pissa' rewrites the base weight into its SVD residual, which DoRA's magnitude, "
                "split q/k/v slices and float8 bases cannot hold; use init='kaiming'"
            )
        self.algo = algo
        self.dora_axis = dora_axis
        self.init = init
        self.split_dims = list(split_dims) if split_dims else None
        self.dora_backend = "auto"
        parts = len(self.split_dims) if self.split_dims else 1

        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(parts * rank, in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=device))
        self._pissa_original: torch.Tensor | None = None
        if init == "pissa":
            lora_A, lora_B = pissa_factors(dequantized_weight(base, torch.float32), rank, self.scale)
            with torch.no_grad():
                self.lora_A.copy_(lora_A)
                self.lora_B.copy_(lora_B)
            self.register_buffer("pissa_A0", lora_A.clone())
            self.register_buffer("pissa_B0", lora_B.clone())
        else:
            init_down(self.lora_A, init, name)
        self.magnitude = None
        if algo == "dora":
            self.magnitude = nn.Parameter(self.base_norm() + DORA_EPS)

    @property
    def parts(self) -> int:
        return len(self.split_dims) if self.split_dims else 1

    # --- DoRA norms ----------------------------------------------------------------

    def base_sq(self) -> torch.Tensor:
        """||W0||^2 per DoRA axis, fp32, cached: the base is frozen, so it is read once.

        The cache key is the weight's storage and in-place version counter, so a
        replaced or modified base weight is picked up. Inference tensors (a base loaded
        inside torch.inference_mode) have no version counter; outside that mode they
        cannot be changed in place at all, so their storage alone is the key.
        """
        weight = self.base.weight
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.dtype)
        if getattr(self, "_base_sq_key", None) != key:
            self._base_sq = base_sq_norm(weight.detach(), self.dora_axis, weight_scale=weight_scale_of(self.base))
            self._base_sq_key = key
        return self._base_sq

    def base_norm(self) -> torch.Tensor:
        return self.base_sq().sqrt()

    def dora_norm(self) -> torch.Tensor:
        """||W0 + s B A|| on the DoRA axis, fp32, detached; never builds B @ A."""
        with torch.no_grad():
            return dora_weight_norm(
                self.base.weight,
                self.lora_A,
                self.lora_B,
                self.scale,
                self.dora_axis,
                self.base_sq(),
                weight_scale=weight_scale_of(self.base),
            )

    # --- factors -------------------------------------------------------------------

    def fused_B(self) -> torch.Tensor:
        """B as one [out, parts * r] matrix: block-diagonal over the split slices."""
        lora_B = self.lora_B.detach().float()
        if self.parts == 1:
            return lora_B
        fused = lora_B.new_zeros(lora_B.shape[0], self.parts * self.rank)
        row = 0
        for part, rows in enumerate(self.split_dims):
            fused[row : row + rows, part * self.rank : (part + 1) * self.rank] = lora_B[row : row + rows]
            row += rows
        return fused

    @property
    def export_rank(self) -> int:
        """Rank of the factors in exported files (ComfyUI's alpha / rank uses it)."""
        return self.export_factors()[0].shape[0]

    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up), detached fp32, with scale * up @ down the weight change at multiplier 1."""
        down, up = self.lora_A.detach().float(), self.fused_B()
        if self.init == "pissa":
            # PEFT's PiSSA -> LoRA conversion: the change against the ORIGINAL W0 is
            # s (B A - B0 A0), a rank-2r LoRA with the same scale.
            down = torch.cat([down, self.pissa_A0.float()], dim=0)
            up = torch.cat([up, -self.pissa_B0.float()], dim=1)
        return down, up

    def export_alpha(self) -> float:
        """The alpha that makes ComfyUI's alpha / export rank equal this adapter's scale."""
        return self.scale * self.export_rank

    def original_weight(self) -> torch.Tensor:
        """W0 as in the checkpoint, fp32 (PiSSA: before the residual was written)."""
        if self._pissa_original is not None:
            return self._pissa_original.to(self.base.weight.device).float()
        return dequantized_weight(self.base, torch.float32)

    def adapted_weight(self) -> torch.Tensor:
        """The layer's effective weight at multiplier 1, fp32 [out, in]; for tests and export checks."""
        down, up = self.export_factors()
        v = self.original_weight() + self.scale * (up @ down)
        if self.algo == "lora":
            return v
        factor = self.magnitude.detach().float() / (self.dora_norm() + DORA_EPS)
        return v * (factor[None, :] if self.dora_axis == "input" else factor[:, None])

    def delta_weight(self) -> torch.Tensor:
        """Merged weight change against the original W0 at multiplier 1 (fp32)."""
        return self.adapted_weight() - self.original_weight()

    # --- forward -------------------------------------------------------------------

    def _pissa_principal(self, x: torch.Tensor) -> torch.Tensor:
        """s B0 (A0 x): the part of W0 PiSSA lent to the adapter at init."""
        return self.scale * F.linear(F.linear(x, self.pissa_A0.to(x.dtype)), self.pissa_B0.to(x.dtype))

    def _unadapted(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        return out if self.init != "pissa" else out + self._pissa_principal(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.multiplier == 0.0 or self.skips_this_forward():
            return self._unadapted(x)
        if self.algo == "dora":
            return self._dora_forward(x)
        out = self._base_forward(x) + self.multiplier * self._lora_delta(x)
        if self.init == "pissa" and self.multiplier != 1.0:
            # W0 + mult * s (B A - B0 A0), written on the residual base.
            out = out + (1.0 - self.multiplier) * self._pissa_principal(x)
        return out

    def _lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A x) with neuron and rank dropout (train mode only)."""
        hidden = F.linear(x, self.lora_A.to(x.dtype))  # (..., parts * r)
        hidden, scale = self.rank_space_dropouts(hidden, channel_dim=-1)
        lora_B = self.lora_B.to(x.dtype)
        if self.parts == 1:
            return scale * F.linear(hidden, lora_B)
        slices, row = [], 0
        for part, rows in enumerate(self.split_dims):
            part_hidden = hidden[..., part * self.rank : (part + 1) * self.rank]
            slices.append(F.linear(part_hidden, lora_B[row : row + rows]))
            row += rows
        return scale * torch.cat(slices, dim=-1)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        dtype = x.dtype
        out = dora_linear(
            x,
            dequantized_weight(base, dtype),
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

    # --- attaching -----------------------------------------------------------------

    @torch.no_grad()
    def attach(self) -> None:
        if self.init == "pissa" and self._pissa_original is None:
            weight = self.base.weight
            # Kept on CPU so that detaching restores the checkpoint's weight bit for bit.
            self._pissa_original = weight.detach().to("cpu", copy=True)
            residual = weight.float() - self.scale * (self.pissa_B0 @ self.pissa_A0)
            weight.copy_(residual.to(weight.dtype))
        super().attach()

    @torch.no_grad()
    def detach_from_base(self) -> None:
        super().detach_from_base()
        if self._pissa_original is not None:
            self.base.weight.copy_(self._pissa_original.to(self.base.weight.device))
            self._pissa_original = None
