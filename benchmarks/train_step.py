"""A full adapter training step of DiT-shaped slices: LoRA vs DoRA, one table per model.

    python -m dit_trainer.benchmarks.train_step [--quick] [--dtype bfloat16]

Random weights at each model's real width, a slice of its blocks (the ratio per block
is what the real model repeats, so the slice keeps the LoRA / DoRA ratio at a
fraction of the memory):

  Z-Image          3840 wide, 30 heads, SwiGLU 10240, Qwen3 2560 text states;
                   4 of 30 main blocks (+ 1 refiner block each)
  Flux.1-dev       3072 wide, 24 heads, GELU MLP 4x, T5-XXL 4096 text states, CLIP-L
                   768 pooled vector, guidance; 2 + 4 of 19 double + 38 single blocks
  Flux.2 klein 4B  3072 wide, 24 heads, SwiGLU mlp_ratio 3, 7680-wide text states
                   (Qwen3-4B, 3 layers), no pooled vector, no guidance; 2 + 4 of 5
                   double + 20 single blocks
  Flux.2 klein 9B  4096 wide, 32 heads, SwiGLU mlp_ratio 3, 12288-wide text states
                   (Qwen3-8B, 3 layers); 2 + 4 of 8 double + 24 single blocks
  Qwen-Image       3072 wide, 24 heads, GELU MLP 4x, Qwen2.5-VL 3584 text states;
                   4 of 60 dual-stream blocks

Each gets one 1024x1024 image (4096 image tokens) and a 512-token caption; every model
is called the same way, with the engine's conditioning record (`model(x, sigma,
**cond.model_inputs(model))`). One step is forward, backward and an AdamW update of the
adapter, through the engine's own network on the architecture's default targets.
Columns: median step time, its ratio to the LoRA step, and peak CUDA memory (n/a on
CPU). Quick mode runs a tiny config of each family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..training.conditioning import Conditioning
from ..training.models.flux import FluxConfig, FluxDiT
from ..training.models.qwen_image import QwenImageConfig, QwenImageDiT
from ..training.models.zimage import ZImageConfig, ZImageDiT
from ..training.network.network import LoRANetwork, NetworkConfig
from .common import Setup, parse_setup, peak_mib, ratio, table, time_ms

GUIDANCE = 3.5  # Flux.1-dev's usual distilled-guidance value


@dataclass(frozen=True)
class ModelShape:
    """One table: a model slice and the inputs of one training sample."""

    title: str
    config: ZImageConfig | FluxConfig | QwenImageConfig
    real_depth: tuple[int, ...]  # the released model's blocks: (main,) for Z-Image / Qwen, (double, single) for Flux
    latent: tuple[int, int]  # (channels, side) of the model-space latent
    text: tuple[int, int]  # (tokens, width) of the caption's text states
    pooled: int = 0  # pooled-vector width (Flux.1: CLIP-L 768); 0 = none
    guidance: float | None = None  # distilled-guidance value; None = the model has no guidance input
    rank: int = 32

    def build(self) -> nn.Module:
        model_class = {ZImageConfig: ZImageDiT, FluxConfig: FluxDiT, QwenImageConfig: QwenImageDiT}[type(self.config)]
        return model_class(self.config)

    def blocks(self) -> str:
        """The slice's blocks and the released model's, e.g. '2 + 4 of 19 double + 38 single blocks'."""
        if isinstance(self.config, ZImageConfig):
            return f"{self.config.n_layers} of {self.real_depth[0]} main blocks"
        if isinstance(self.config, QwenImageConfig):
            return f"{self.config.num_layers} of {self.real_depth[0]} dual-stream blocks"
        double, single = self.real_depth
        return f"{self.config.depth} + {self.config.depth_single_blocks} of {double} double + {single} single blocks"

    def width(self) -> int:
        if isinstance(self.config, QwenImageConfig):
            return self.config.num_heads * self.config.head_dim
        return self.config.dim if isinstance(self.config, ZImageConfig) else self.config.hidden_size

    def image_tokens(self) -> int:
        return (self.latent[1] // self.config.patch_size) ** 2


def _flux2(hidden_size: int, num_heads: int, context_in_dim: int, **overrides) -> FluxConfig:
    """A Flux.2 klein config (SwiGLU 3x, no biases, no pooled vector, no guidance) of 2 + 4 blocks."""
    values = dict(family="flux2", in_channels=128, patch_size=1, hidden_size=hidden_size, num_heads=num_heads,
                  depth=2, depth_single_blocks=4, mlp_ratio=3.0, context_in_dim=context_in_dim, vec_in_dim=0,
                  guidance_embed=False, axes_dim=[32, 32, 32, 32], theta=2000, qkv_bias=False)
    return FluxConfig(**{**values, **overrides})


# 1024x1024: Z-Image and Flux.1 latents are 16 x 128 x 128 (1/8, 2x2 patches), Flux.2's
# 128 x 64 x 64 (1/16, already patchified by its VAE, patch 1): 4096 image tokens each.
FULL = [
    ModelShape("Z-Image", ZImageConfig(n_layers=4, n_refiner_layers=1), (30,), latent=(16, 128), text=(512, 2560)),
    ModelShape("Flux.1-dev", FluxConfig(depth=2, depth_single_blocks=4), (19, 38), latent=(16, 128),
               text=(512, 4096), pooled=768, guidance=GUIDANCE),
    ModelShape("Flux.2 klein 4B", _flux2(3072, 24, 7680), (5, 20), latent=(128, 64), text=(512, 7680)),
    ModelShape("Flux.2 klein 9B", _flux2(4096, 32, 12288), (8, 24), latent=(128, 64), text=(512, 12288)),
    ModelShape("Qwen-Image", QwenImageConfig(num_layers=4), (60,), latent=(16, 128), text=(512, 3584)),
]
# One tiny config per family, so the CPU check stays fast.
QUICK = [
    ModelShape("Z-Image (tiny)", ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, ffn_dim=128,
                                              cap_feat_dim=32, t_mid_dim=64, axes_dims=[8, 12, 12]),
               (30,), latent=(16, 16), text=(16, 32), rank=8),
    ModelShape("Flux.1-dev (tiny)", FluxConfig(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                                               context_in_dim=32, vec_in_dim=16, axes_dim=[8, 12, 12]),
               (19, 38), latent=(16, 16), text=(16, 32), pooled=16, guidance=GUIDANCE, rank=8),
    ModelShape("Flux.2 klein (tiny)", _flux2(64, 2, 32, in_channels=16, depth=1, depth_single_blocks=1,
                                             axes_dim=[8, 8, 8, 8]),
               (5, 20), latent=(16, 8), text=(16, 32), rank=8),
    ModelShape("Qwen-Image (tiny)", QwenImageConfig(num_layers=1, num_heads=2, head_dim=32, joint_attention_dim=32,
                                                    axes_dim=[8, 12, 12]),
               (60,), latent=(16, 16), text=(16, 32), rank=8),
]


def _variants(cuda: bool, rank: int) -> list[tuple[str, NetworkConfig, str]]:
    """(label, network options, DoRA backend) for each row; alpha = rank."""
    rows = [("LoRA", NetworkConfig(algo="lora", rank=rank, alpha=rank), "auto")]
    for axis in ("input", "output"):
        for backend in ("torch", "triton") if cuda else ("torch",):
            options = NetworkConfig(algo="dora", dora_axis=axis, rank=rank, alpha=rank)
            rows.append((f"DoRA {axis} axis ({backend})", options, backend))
    return rows


def _sample(shape: ModelShape, setup: Setup) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Noisy latents (1, C, side, side), sigma (1,) and the caption's conditioning record."""
    channels, side = shape.latent
    tokens, width = shape.text
    with setup.device:
        x = torch.randn(1, channels, side, side, dtype=setup.dtype)
        cond = Conditioning(
            context=torch.randn(1, tokens, width, dtype=setup.dtype),
            context_lens=torch.tensor([tokens]),
            pooled=torch.randn(1, shape.pooled, dtype=setup.dtype) if shape.pooled else None,
            guidance=None if shape.guidance is None else torch.tensor([shape.guidance]),
        )
        sigma = torch.tensor([0.5])
    return x, sigma, cond


def model_and_sample(shape: ModelShape, setup: Setup) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    """The frozen model slice (seeded weights) and one sample's (x, sigma, model inputs)."""
    torch.manual_seed(0)
    with setup.device:
        model = shape.build().to(setup.dtype).requires_grad_(False)
    x, sigma, cond = _sample(shape, setup)
    return model, x, sigma, cond.model_inputs(model)


def run_model(shape: ModelShape, setup: Setup) -> None:
    """Print one model's table: a training step per adapter variant."""
    print(f"Training step, {shape.title} ({shape.blocks()}, width {shape.width()}, "
          f"{shape.image_tokens()} image + {shape.text[0]} text tokens, rank {shape.rank})  [{setup.describe()}]")
    model, x, sigma, inputs = model_and_sample(shape, setup)
    results = {}
    for label, options, backend in _variants(setup.device.type == "cuda", shape.rank):
        network = LoRANetwork(model, model.architecture, options).attach()
        for adapter in network.adapters:
            adapter.dora_backend = backend
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x, sigma, **inputs).float().square().mean().backward()
            optimizer.step()

        results[label] = (time_ms(step, setup), peak_mib(step, setup.device))
        network.detach_from_model()
    lora = results["LoRA"][0]
    print(table(("adapter", "ms / step", "vs LoRA", "peak MiB"),
                [(name, t, ratio(t, lora), peak) for name, (t, peak) in results.items()]))


def run_tables(shapes: Sequence[ModelShape], run_model: Callable[[ModelShape, Setup], None], setup: Setup) -> None:
    """One table per model shape, a blank line between them."""
    for i, shape in enumerate(shapes):
        if i:
            print()
        run_model(shape, setup)


def run(setup: Setup) -> None:
    run_tables(QUICK if setup.quick else FULL, run_model, setup)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_setup(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
