"""Helpers shared by the test_data_* files: tiny image folders and call-counting encoders.

Holds no tests itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit_trainer.training.data.config import DataConfig
from dit_trainer.training.data.folder_dataset import FolderDataset
from dit_trainer.training.demo.pixel_vae import PixelVAE
from dit_trainer.training.demo.text_encoder import DemoTextEncoder

LATENT_DOWNSCALE = PixelVAE.downscale


def small_config(**overrides) -> DataConfig:
    """Buckets for tiny images: area 32², sides 16..64 in steps of 8 (a multiple of downscale 2 x patch 2)."""
    return DataConfig(**{"resolution": 32, "bucket_step": 8, "min_side": 16, "max_side": 64, **overrides})


def write_image(path: Path, width: int, height: int, seed: int = 0, alpha: np.ndarray | None = None) -> Path:
    """Random RGB pixels (unique per seed), or RGBA when `alpha` [height, width] uint8 is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if alpha is not None:
        pixels = np.concatenate([pixels, alpha[..., None].astype(np.uint8)], axis=-1)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)
    return path


class CountingEncoders:
    """The demo PixelVAE and text encoder, wrapped to count calls and record what they saw."""

    def __init__(self) -> None:
        self.vae = PixelVAE()
        self.text = DemoTextEncoder(dim=8, max_tokens=16)
        self.image_calls = 0
        self.text_calls = 0
        self.captions_seen: list[str] = []

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        return self.vae.encode(images)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.text_calls += 1
        self.captions_seen += captions
        return self.text.encode(captions)


def build(folder: Path, cfg: DataConfig, encoders: CountingEncoders, encoder_id: str = "demo-v1") -> FolderDataset:
    return FolderDataset.from_folder(
        folder, cfg, encoders.encode_images, encoders.encode_text, LATENT_DOWNSCALE, encoder_id
    )
