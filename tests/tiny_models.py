"""Tiny random models of every architecture, their inputs and their training data (fp8, block swap tests)."""

from __future__ import annotations

import torch

from dit_trainer.training.conditioning import Conditioning
from dit_trainer.training.data.latents import LatentDataset
from dit_trainer.training.models.flux import FluxConfig, FluxDiT
from dit_trainer.training.models.qwen_image import QwenImageConfig, QwenImageDiT
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT

TEXT_DIM, POOLED_DIM = 24, 12
CONFIGS = {
    "zimage": lambda: ZImageDiT(ZImageConfig(in_channels=4, dim=32, n_layers=3, n_refiner_layers=1, n_heads=2,
                                             ffn_dim=64, cap_feat_dim=TEXT_DIM, t_mid_dim=32, axes_dims=[4, 6, 6])),
    "flux": lambda: FluxDiT(FluxConfig(family="flux1", in_channels=4, patch_size=2, hidden_size=32, num_heads=2,
                                       depth=2, depth_single_blocks=2, context_in_dim=TEXT_DIM,
                                       vec_in_dim=POOLED_DIM, guidance_embed=True, axes_dim=[4, 6, 6])),
    "qwen_image": lambda: QwenImageDiT(QwenImageConfig(in_channels=4, num_layers=3, num_heads=2, head_dim=16,
                                                       joint_attention_dim=TEXT_DIM, axes_dim=[4, 6, 6])),
}
ARCHITECTURES = tuple(CONFIGS)


def tiny_model(architecture: str, seed: int = 0) -> torch.nn.Module:
    """A frozen fp32 model with every weight away from its init (fan-in scaled), so every path matters."""
    model = CONFIGS[architecture]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_gain = param.ndim == 1 and ("norm" in name or name.endswith(".scale"))
            param.copy_(1.0 + 0.1 * noise if is_gain else noise * min(0.2, param.shape[-1] ** -0.5))
    return model.requires_grad_(False).eval()


def tiny_conditioning(model: torch.nn.Module, n: int, seed: int = 2) -> Conditioning:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor([3, 5, 2, 5, 4, 1][:n])
    context = torch.randn(n, 5, TEXT_DIM, generator=gen) * (torch.arange(5)[None, :, None] < lens[:, None, None])
    pooled = torch.randn(n, POOLED_DIM, generator=gen) if "pooled" in model.conditioning_fields else None
    cond = Conditioning(context, lens, pooled)
    return cond.with_guidance(3.5) if "guidance" in model.conditioning_fields else cond


def tiny_inputs(model: torch.nn.Module, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, sigma, keyword inputs) for one forward of `model`."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, model.cfg.in_channels, 8, 8, generator=gen)
    sigma = torch.linspace(0.2, 0.8, n)
    return x, sigma, tiny_conditioning(model, n).model_inputs(model)


def tiny_data(model: torch.nn.Module, n: int = 5) -> LatentDataset:
    gen = torch.Generator().manual_seed(3)
    return LatentDataset(torch.randn(n, model.cfg.in_channels, 8, 8, generator=gen), tiny_conditioning(model, n))
