"""A full adapter training step of a Z-Image-shaped DiT: LoRA vs DoRA, side by side.

    python -m dit_trainer.benchmarks.train_step [--quick] [--dtype bfloat16]

Random weights at the real width (3840 hidden, 30 heads, 10240 FFN, Qwen3 text states),
a slice of 4 main blocks (the ratio per block is what a 30-block model repeats), one
1024x1024 image (4096 image tokens) and a 512-token caption. One step is forward,
backward and an AdamW update of the adapter, through the engine's own network on
every main-block Linear. Columns: median step time, its ratio to the LoRA step, and
peak CUDA memory (n/a on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..training.models.zimage import ZImageConfig, ZImageDiT
from ..training.network.network import LoRANetwork, NetworkConfig
from .common import Setup, parse_setup, peak_mib, ratio, table, time_ms

FULL = (ZImageConfig(n_layers=4, n_refiner_layers=1), 128, 512, 32)  # config, latent side, caption tokens, rank
QUICK = (ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, ffn_dim=128, cap_feat_dim=32,
                      t_mid_dim=64, axes_dims=[8, 12, 12]), 16, 16, 8)


def _variants(cuda: bool, rank: int) -> list[tuple[str, NetworkConfig, str]]:
    """(label, network options, DoRA backend) for each row; alpha = rank."""
    rows = [("LoRA", NetworkConfig(algo="lora", rank=rank, alpha=rank), "auto")]
    for axis in ("input", "output"):
        for backend in ("torch", "triton") if cuda else ("torch",):
            options = NetworkConfig(algo="dora", dora_axis=axis, rank=rank, alpha=rank)
            rows.append((f"DoRA {axis} axis ({backend})", options, backend))
    return rows


def run(setup: Setup) -> None:
    config, side, caption, rank = QUICK if setup.quick else FULL
    print(f"Training step, Z-Image-shaped DiT ({config.n_layers} main blocks, dim {config.dim}, "
          f"{(side // 2) ** 2} image + {caption} text tokens, rank {rank})  [{setup.describe()}]")
    torch.manual_seed(0)
    with setup.device:
        model = ZImageDiT(config).to(setup.dtype).requires_grad_(False)
        x = torch.randn(1, config.in_channels, side, side, dtype=setup.dtype)
        context = torch.randn(1, caption, config.cap_feat_dim, dtype=setup.dtype)
        lens, sigma = torch.tensor([caption]), torch.tensor([0.5])
    results = {}
    for label, options, backend in _variants(setup.device.type == "cuda", rank):
        network = LoRANetwork(model, "zimage", options).attach()
        for adapter in network.adapters:
            adapter.dora_backend = backend
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x, sigma, context, lens).float().square().mean().backward()
            optimizer.step()

        results[label] = (time_ms(step, setup), peak_mib(step, setup.device))
        network.detach_from_model()
    lora = results["LoRA"][0]
    print(table(("adapter", "ms / step", "vs LoRA", "peak MiB"),
                [(name, t, ratio(t, lora), peak) for name, (t, peak) in results.items()]))


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_setup(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
