"""Adapter files in the format stock ComfyUI `LoraLoader` applies exactly (the default).

Keys per adapted layer at ComfyUI module path P (details and the other key styles
in export.py; reading any style in importer.py):
    diffusion_model.P.lora_A.weight  [r, in]
    diffusion_model.P.lora_B.weight  [out, r]
    diffusion_model.P.alpha          0-dim; ComfyUI's scale is alpha / r
    diffusion_model.P.dora_scale     DoRA only: [1, in] (input axis) or [out, 1] (output axis, folded)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .export import adapter_metadata, adapter_state_dict, export_adapter
from .importer import ImportReport, load_adapter_into
from .key_names import COMFY_PREFIX as PREFIX
from .network import LoRANetwork
from ..storage import atomic_save_safetensors, read_safetensors

__all__ = [
    "PREFIX",
    "ImportReport",
    "adapter_metadata",
    "adapter_state_dict",
    "atomic_save_safetensors",
    "export_adapter",
    "load_adapter",
    "load_adapter_into",
    "read_safetensors",
    "save_adapter",
]


def save_adapter(
    network: LoRANetwork,
    path: str | os.PathLike,
    base_hash: str = "",
    extra_metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
    style: str = "comfy",
) -> Path:
    """Write the adapter file (ComfyUI keys unless `style` says otherwise), atomically."""
    return export_adapter(network, path, style, base_hash, extra_metadata, dtype)


def load_adapter(network: LoRANetwork, path: str | os.PathLike) -> dict[str, str]:
    """Load an adapter file into the network (any supported key style); returns its metadata."""
    return load_adapter_into(network, path).metadata
