"""The embedded demo's base: a tiny Z-Image-architecture DiT on PixelVAE latents."""

from __future__ import annotations

from pathlib import Path

from ..models.zimage import ZImageConfig, ZImageDiT
from .pixel_vae import PixelVAE
from .text_encoder import DemoTextEncoder

BASE_CHECKPOINT = Path(__file__).with_name("demo_base.safetensors")
TEXT_DIM = 32
MAX_TOKENS = 8

DEMO_CONFIG = ZImageConfig(
    in_channels=PixelVAE.latent_channels,
    patch_size=2,
    dim=96,
    n_layers=4,
    n_refiner_layers=1,
    n_heads=4,
    ffn_dim=256,
    cap_feat_dim=TEXT_DIM,
    t_freq_dim=256,
    t_mid_dim=256,
    axes_dims=[8, 8, 8],
)


def build_demo_model() -> ZImageDiT:
    return ZImageDiT(DEMO_CONFIG)


def demo_text_encoder() -> DemoTextEncoder:
    return DemoTextEncoder(dim=TEXT_DIM, max_tokens=MAX_TOKENS)


def missing_checkpoint_error() -> FileNotFoundError:
    return FileNotFoundError(
        f"the demo base checkpoint {BASE_CHECKPOINT} is missing; "
        "recreate it with `python -m dit_trainer.training.demo.pretrain`"
    )
