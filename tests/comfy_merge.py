"""Test-side transcription of stock ComfyUI's LoRA / DoRA merge (comfy/weight_adapter).

LoRAAdapter.calculate_weight + weight_decompose, as quoted in the ComfyUI notes
("DoRA at load"): the base weight is copied to float32, the patch applied, then the
strength interpolates W0 + s * (W_patched - W0). Kept independent of the engine on
purpose: the engine is checked against this, never the other way round.
"""

from __future__ import annotations

import torch


def comfy_merge(weight: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str, strength: float) -> torch.Tensor:
    """Merged float32 weight for module key `prefix` (e.g. 'diffusion_model.layers.0.attention.qkv')."""
    weight = weight.float().clone()
    mat1 = tensors[f"{prefix}.lora_B.weight"].float()  # up   [out, r]
    mat2 = tensors[f"{prefix}.lora_A.weight"].float()  # down [r, in]
    alpha_key = f"{prefix}.alpha"
    alpha = tensors[alpha_key].item() / mat2.shape[0] if alpha_key in tensors else 1.0
    dora_scale = tensors.get(f"{prefix}.dora_scale")
    lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    if dora_scale is None:
        return weight + strength * alpha * lora_diff
    # weight_decompose(dora_scale, weight, lora_diff, alpha, strength, intermediate_dtype, function)
    dora_scale = dora_scale.float()
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff.type(weight.dtype)
    wd_on_output_axis = dora_scale.shape[0] == weight_calc.shape[0]
    if wd_on_output_axis:
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (
            weight_calc.transpose(0, 1)
            .reshape(weight_calc.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1))
            .transpose(0, 1)
        )
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        return weight + strength * weight_calc
    return weight_calc
