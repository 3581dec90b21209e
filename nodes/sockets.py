"""The pack's socket types and the objects that travel through them.

Type names are namespaced, so our sockets never connect to another pack's
look-alike LORA / DATASET types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from ..training.data.folder_dataset import FolderDataset
from ..training.encoders import Encoders
from ..training.models.latent_formats import LatentFormat
from ..training.network.network import NetworkConfig

CATEGORY = "DiT Trainer"
DITT_MODEL = "DITT_MODEL"
DITT_LORA_NETWORK = "DITT_LORA_NETWORK"
DITT_DATASET = "DITT_DATASET"
DITT_LORA = "DITT_LORA"


@dataclass
class DitModel:
    """A frozen base DiT. Nodes attach adapters only for the duration of their call."""

    model: nn.Module
    architecture: str  # engine architecture name ("zimage", ...)
    name: str  # checkpoint name as picked in LoadDiT
    base_hash: str  # weights hash; saved adapters record it
    latent_format: LatentFormat
    demo: bool  # the embedded demo base: has its own text encoder and pixel VAE
    gradient_checkpointing: bool = False  # recompute activations in backward (TrainLoRA)
    keep_on_gpu: bool = False  # False: back to host memory after each node's use, VRAM returned to ComfyUI


@dataclass
class TrainingSet:
    """An encoded dataset, the encoders that made it (captions may be re-encoded while
    training, previews use them) and a fingerprint of everything that shaped its batches."""

    data: FolderDataset
    encoders: Encoders
    fingerprint: str
    summary: str


@dataclass
class LoraNetworkSpec:
    """What BuildLoRANetwork decided; TrainLoRA builds and attaches the network from it."""

    config: NetworkConfig
    init_from: Path | None  # an adapter file to continue training from
    training_adapter: Path | None = None  # a LoRA merged into the base while training only (distilled bases)
    training_adapter_strength: float = 1.0


@dataclass
class TrainedLora:
    """An adapter file on disk (in models/loras) and the run it came from."""

    path: Path
    architecture: str
    base_hash: str
    run_dir: Path | None = None  # the training run's folder (checkpoints/), when trained here
