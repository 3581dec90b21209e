"""The transformer blocks of each architecture, in the order a forward pass runs them.

fp8 storage quantises the Linear layers inside these blocks (embedders and the final
layer stay in the load dtype: they are small and sit at the ends, where errors show most),
block swap keeps the last N of them in host memory, and per-block compile wraps each one.
"""

from __future__ import annotations

import torch.nn as nn

# Block lists in execution order (Z-Image runs its refiners before the main layers).
BLOCK_STACKS = {
    "zimage": ("noise_refiner", "context_refiner", "layers"),
    "flux": ("double_blocks", "single_blocks"),
    "flux2": ("double_blocks", "single_blocks"),
    "qwen_image": ("transformer_blocks",),
}


def block_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's transformer blocks, in forward order."""
    architecture = getattr(model, "architecture", None)
    if architecture not in BLOCK_STACKS:
        raise ValueError(f"no transformer block list is known for architecture {architecture!r}; "
                         f"known: {sorted(BLOCK_STACKS)}")
    return [f"{stack}.{index}" for stack in BLOCK_STACKS[architecture]
            for index in range(len(getattr(model, stack)))]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in forward order."""
    return [model.get_submodule(name) for name in block_names(model)]


def block_linear_names(model: nn.Module) -> list[str]:
    """Dotted names of every nn.Linear inside the transformer blocks (what fp8 storage quantises)."""
    return [f"{block}.{name}" for block in block_names(model)
            for name, module in model.get_submodule(block).named_modules() if isinstance(module, nn.Linear)]
