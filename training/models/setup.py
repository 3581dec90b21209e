"""Load a base for training: storage choice, block swap and compile, as LoadDiT and `[model]` name them."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from .block_compile import compile_blocks
from .block_swap import enable_block_swap
from .loader import load_dit
from .quantization import Float8Linear, quantized_bytes

log = logging.getLogger(__name__)

# Storage name -> (dtype of everything held as floats and of the compute, float8 format or None).
WEIGHT_STORAGE = {
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "fp32": (torch.float32, None),
    "fp8_e4m3fn": (torch.bfloat16, "fp8_e4m3fn"),  # block Linears in float8, one scale per tensor
    "fp8_scaled": (torch.bfloat16, "fp8_scaled"),  # block Linears in float8, one scale per output row
}


def load_base(path: str | os.PathLike, storage: str, attention: str = "auto", blocks_to_swap: int = 0,
              compile: bool = False, option: str = "weight dtype") -> nn.Module:
    """The frozen base of `path`, stored as `storage`, with its attention backend, block swap and compile set."""
    if storage not in WEIGHT_STORAGE:
        raise ValueError(f"{option} {storage!r} is not one of {list(WEIGHT_STORAGE)}")
    if blocks_to_swap < 0:
        raise ValueError(f"blocks_to_swap={blocks_to_swap} must be >= 0 (0 keeps every block on the GPU)")
    dtype, quantize = WEIGHT_STORAGE[storage]
    model = load_dit(path, dtype=dtype, quantize=quantize)
    float8 = sum(isinstance(m, Float8Linear) for m in model.modules())
    if float8:
        stored = ", ".join(model.stored_quantization) or f"quantised while loading ({quantize})"
        log.info("base: %d Linear layers in float8 (%.2f GiB with scales; %s)", float8, quantized_bytes(model) / 2**30,
                 stored)
    model.set_attention_backend(attention)
    enable_block_swap(model, blocks_to_swap)
    if compile:
        compile_blocks(model)
    # The [model] options that made it: a run handed off to the CLI (run.toml) loads the base the same way.
    model.load_settings = {"dtype": storage, "attention": attention, "blocks_to_swap": blocks_to_swap,
                           "compile": compile}
    return model
