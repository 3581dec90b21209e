"""Diffusion-transformer base models and their checkpoint loader."""

from .flux import FluxConfig, FluxDiT
from .flux_layouts import flux_variant, to_comfy_layout_flux
from .loader import (
    ARCHITECTURES,
    detect_architecture,
    infer_flux_config,
    infer_qwen_config,
    infer_zimage_config,
    load_dit,
    save_dit,
    strip_prefix,
    to_comfy_layout_zimage,
    to_split_layout_zimage,
    weights_hash,
)
from .qwen_image import QwenImageConfig, QwenImageDiT
from .qwen_layouts import qwen_variant
from .zimage import ZImageConfig, ZImageDiT

__all__ = [
    "ARCHITECTURES",
    "FluxConfig",
    "FluxDiT",
    "QwenImageConfig",
    "QwenImageDiT",
    "ZImageConfig",
    "ZImageDiT",
    "detect_architecture",
    "flux_variant",
    "infer_flux_config",
    "infer_qwen_config",
    "infer_zimage_config",
    "load_dit",
    "qwen_variant",
    "save_dit",
    "strip_prefix",
    "to_comfy_layout_flux",
    "to_comfy_layout_zimage",
    "to_split_layout_zimage",
    "weights_hash",
]
