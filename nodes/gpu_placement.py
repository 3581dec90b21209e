"""Where our DiT lives around a node's work, and the VRAM it takes from and gives back to ComfyUI.

Before TrainLoRA / SampleWithLoRA run, every model ComfyUI holds on the GPU is unloaded
(ComfyUI reloads what a later node needs), then our DiT moves to the GPU (block swap keeps
its swapped blocks in host memory). Afterwards, unless LoadDiT says keep it there, the DiT
goes back to host memory and the cached VRAM is handed back, so a stock KSampler workflow
after training finds the card as free as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..training.models.block_swap import blocks_released, move_model
from . import host
from .sockets import DitModel


@contextlib.contextmanager
def on_compute_device(model: DitModel) -> Iterator[torch.device]:
    """Inside: the DiT on ComfyUI's compute device, ComfyUI's own models unloaded; restored on any exit."""
    host.free_vram()
    device = host.device()
    move_model(model.model, device)
    try:
        with blocks_released(model.model):
            yield device
    finally:
        if not model.keep_on_gpu:
            move_model(model.model, "cpu")
            host.return_cached_vram()
