"""torch.compile per transformer block, with dynamic sequence lengths.

Each block's `forward` is compiled, not the module call: the module's hooks (block swap)
stay eager Python, and the adapters attached inside the block are traced with it. Blocks
are compiled with `dynamic=True`, so one graph per block serves every bucket's sequence
length: a static compile would recompile at each new bucket shape and again once its
recompile limit is hit, which with aspect-ratio buckets is nearly every step. The first
step pays the compile time once (logged).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .blocks import transformer_blocks

log = logging.getLogger(__name__)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every transformer block of `model` (once; again is a no-op). Returns the blocks compiled."""
    if getattr(model, "compiled_blocks", None):
        return 0
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, dynamic=True)
    model.compiled_blocks = backend
    log.info("torch.compile (%s, dynamic sequence lengths) wraps %d transformer blocks; the first step "
             "compiles them once", backend, len(blocks))
    return len(blocks)
