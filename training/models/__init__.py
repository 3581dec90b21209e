"""Diffusion-transformer base models and their checkpoint loader."""

from .loader import (
    ARCHITECTURES,
    detect_architecture,
    infer_zimage_config,
    load_dit,
    save_dit,
    strip_prefix,
    to_comfy_layout_zimage,
    to_split_layout_zimage,
    weights_hash,
)
from .zimage import ZImageConfig, ZImageDiT

__all__ = [
    "ARCHITECTURES",
    "ZImageConfig",
    "ZImageDiT",
    "detect_architecture",
    "infer_zimage_config",
    "load_dit",
    "save_dit",
    "strip_prefix",
    "to_comfy_layout_zimage",
    "to_split_layout_zimage",
    "weights_hash",
]
