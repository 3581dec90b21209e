"""DoRA layer forward + backward: ours vs PEFT's DoRA vs plain LoRA, side by side.

    python -m dit_trainer.benchmarks.dora_layer [--quick] [--dtype bfloat16]

Every implementation wraps the same frozen nn.Linear and trains A, B (and the
magnitude) with x requiring grad, as a layer in the middle of a DiT. Columns: median
fwd+bwd time, its ratio to PEFT's DoRA and to plain LoRA, the activation memory
autograd keeps for the backward (any device), and peak CUDA memory of one step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..kernels import dora
from .common import Setup, parse_setup, peak_mib, ratio, saved_mib, table, time_ms

EPS = torch.finfo(torch.float32).eps

# (label, in_features, out_features, tokens, bias) at 1024x1024: 4096 image + 512 text tokens.
# Flux double blocks give image and text their own weights, so an image-stream layer
# (attn proj, MLP up) sees the 4096 image tokens; Flux single blocks (linear1) and
# Z-Image's blocks run the joint 4608. Flux.2's MLPs are SwiGLU, so its MLP up and the
# MLP part of linear1 hold 2 x mlp_hidden rows (value | gate): klein 4B linear1 is
# q | k | v | 2 x 9216 = 3 * 3072 + 18432, klein 9B MLP up 2 x 12288. Only Flux.1's
# layers have a bias.
FULL_SHAPES = [
    ("Flux.1 attn proj", 3072, 3072, 4096, True),
    ("Flux.1 MLP up", 3072, 12288, 4096, True),
    ("Flux.1 linear1", 3072, 3 * 3072 + 12288, 4608, True),
    ("Flux.2 klein 4B linear1", 3072, 3 * 3072 + 2 * 9216, 4608, False),
    ("Flux.2 klein 9B attn proj", 4096, 4096, 4096, False),
    ("Flux.2 klein 9B MLP up", 4096, 2 * 12288, 4096, False),
    ("Z-Image attn proj", 3840, 3840, 4608, False),
    ("Qwen-Image attn proj", 3072, 3072, 4096, True),
    ("Qwen-Image MLP up", 3072, 12288, 4096, True),
]
FULL_RANKS = (16, 64)
QUICK_SHAPES = [("quick", 256, 192, 256, True)]
QUICK_RANKS = (16,)


class OursDora(nn.Module):
    """The engine's call pattern: base_sq cached once per base weight."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, axis: str, backend: str):
        super().__init__()
        # Buffers, so the memory count knows them as the frozen base.
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        n_out, n_in = self.weight.shape
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.randn(rank, n_in, **like) * n_in**-0.5)
        self.lora_B = nn.Parameter(torch.randn(n_out, rank, **like) * 0.01)
        self.scale, self.axis, self.backend = alpha / rank, axis, backend
        self.register_buffer("base_sq", dora.base_sq_norm(self.weight, axis))
        norm = dora.dora_weight_norm(self.weight, self.lora_A, self.lora_B, self.scale, axis, self.base_sq)
        self.magnitude = nn.Parameter(norm.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dora.dora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude,
            self.scale, self.axis, EPS, self.base_sq, backend=self.backend,
        )


def _peft_layer(linear: nn.Linear, rank: int, alpha: float, use_dora: bool) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_dora=use_dora, target_modules=["0"], init_lora_weights=False)
    # Adapters in the base dtype, like ours (PEFT would otherwise upcast them to fp32).
    return peft.get_peft_model(nn.Sequential(linear), config, autocast_adapter_dtype=False)


def _measure(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, setup: Setup) -> tuple[float, float, float | None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        for p in (*params, x):
            p.grad = None
        module(x).backward(grad)

    frozen = [*module.parameters(), *module.buffers(), x]
    return time_ms(step, setup), saved_mib(step, frozen), peak_mib(step, setup.device)


def run(setup: Setup) -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        peft = None
    shapes, ranks = (QUICK_SHAPES, QUICK_RANKS) if setup.quick else (FULL_SHAPES, FULL_RANKS)
    ours_fast = "triton" if setup.device.type == "cuda" else None
    print(f"DoRA layer, forward + backward  [{setup.describe()}]")
    if peft is None:
        print("  (peft is not installed: PEFT columns are n/a; pip install peft)")
    for label, n_in, n_out, tokens, bias in shapes:
        for rank in ranks:
            torch.manual_seed(0)
            linear = nn.Linear(n_in, n_out, bias=bias, device=setup.device, dtype=setup.dtype).requires_grad_(False)
            x = torch.randn(1, tokens, n_in, device=setup.device, dtype=setup.dtype, requires_grad=True)
            grad = torch.randn(1, tokens, n_out, device=setup.device, dtype=setup.dtype)
            alpha = float(rank)
            results = {}
            if peft is not None:
                results["LoRA (PEFT)"] = _measure(_peft_layer(linear, rank, alpha, False), x, grad, setup)
                results["DoRA output axis (PEFT)"] = _measure(_peft_layer(linear, rank, alpha, True), x, grad, setup)
            for axis in ("output", "input"):
                for backend in ("torch", ours_fast):
                    if backend is not None:
                        module = OursDora(linear, rank, alpha, axis, backend)
                        results[f"DoRA {axis} axis (ours, {backend})"] = _measure(module, x, grad, setup)
            lora = results.get("LoRA (PEFT)", (None,))[0]
            peft_dora = results.get("DoRA output axis (PEFT)", (None,))[0]
            rows = [
                (name, t, ratio(t, peft_dora), ratio(t, lora), saved, peak)
                for name, (t, saved, peak) in results.items()
            ]
            print(f"\n{label}: in={n_in} out={n_out} tokens={tokens} bias={bias} rank={rank}")
            print(table(("implementation", "ms", "vs PEFT DoRA", "vs LoRA", "saved MiB", "peak MiB"), rows))


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_setup(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
