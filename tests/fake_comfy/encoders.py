"""Stand-ins for ComfyUI's CLIP and VAE objects with the methods and attributes the nodes use.

FakeCLIP: tokenize(text) -> tokens, encode_from_tokens(tokens, return_dict=True) ->
{"cond": [1, L, D], "pooled_output", "attention_mask"}, `cond_stage_model` (a module).
FakeVAE: encode(IMAGE [B, H, W, 3]) -> raw latents [B, 16, H/8, W/8] (8x8 means of the RGB
channels, then a fixed channel mix and offset, so latents are not in model space),
decode(latents) -> IMAGE, `first_stage_model`, `downscale_ratio`, `latent_channels`.

Like ComfyUI's own models, their weights are made inside inference mode (ComfyUI's loader
nodes run in it), and they refuse to run outside it: ComfyUI only ever calls its models
from node code inside `torch.inference_mode()`, so the pack must do the same.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def _inside_inference_mode(what: str) -> None:
    if not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} called outside torch.inference_mode(); ComfyUI never runs its models that way")


class FakeCLIP:
    def __init__(self, dim: int = 32, pad_to: int = 6):
        self.dim = dim
        self.pad_to = pad_to  # ComfyUI's tokenizers pad; the attention mask marks the real tokens
        with torch.inference_mode():
            self.cond_stage_model = nn.Linear(dim, dim)
        self.calls = 0

    def tokenize(self, text: str, images: list[torch.Tensor] | None = None, llama_template: str | None = None) -> list:
        """Words, and for each IMAGE [1, h, w, 3] (a vision-language encoder's input) one token of its
        mean colour and size, so states depend on the image as Qwen2.5-VL's do."""
        self.images_seen, self.template_seen = list(images or []), llama_template
        visual = [tuple(img.float().mean((0, 1, 2)).tolist()) + (img.shape[1], img.shape[2]) for img in images or []]
        return visual + text.lower().split()

    def _vector(self, word) -> torch.Tensor:
        if isinstance(word, tuple):  # an image token
            vector = torch.zeros(self.dim)
            vector[: len(word)] = torch.tensor(word, dtype=torch.float32) / torch.tensor([1, 1, 1, 1024, 1024])
            return vector
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode_from_tokens(self, tokens: list[str], return_dict: bool = False) -> dict:
        _inside_inference_mode("CLIP.encode_from_tokens")
        self.calls += 1
        states = torch.zeros(1, max(self.pad_to, len(tokens)), self.dim)
        for i, word in enumerate(tokens):
            states[0, i] = self._vector(word)
        mask = torch.zeros(1, states.shape[1], dtype=torch.long)
        mask[0, : max(1, len(tokens))] = 1
        return {"cond": states, "pooled_output": states.mean(1), "attention_mask": mask}


class FakeVAE:
    """Flux.1 / Z-Image's VAE shape by default (16 channels at 1/8); Flux.2's is 128 at 1/16."""

    def __init__(self, downscale_ratio: int = 8, latent_channels: int = 16, frames: bool = False):
        self.downscale_ratio, self.latent_channels = downscale_ratio, latent_channels
        self.frames = frames  # video-shaped latents [B, C, 1, h, w], as the Wan 2.1 VAE of Qwen-Image gives
        generator = torch.Generator().manual_seed(0)
        self.mix = torch.randn(self.latent_channels, 3, generator=generator)  # latent channel <- RGB
        self.offset = 0.5
        with torch.inference_mode():
            self.first_stage_model = nn.Linear(3, self.latent_channels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        _inside_inference_mode("VAE.encode")
        rgb = F.avg_pool2d(pixels.permute(0, 3, 1, 2).float(), self.downscale_ratio)  # [B, 3, h, w]
        latents = torch.einsum("cr,brhw->bchw", self.mix, rgb) + self.offset
        return latents.unsqueeze(2) if self.frames else latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _inside_inference_mode("VAE.decode")
        if self.frames:
            if latents.ndim != 5:
                raise ValueError(f"this VAE decodes [B, C, frames, h, w] latents, got {tuple(latents.shape)}")
            latents = latents[:, :, 0]
        rgb = torch.einsum("rc,bchw->brhw", torch.linalg.pinv(self.mix), latents.float() - self.offset)
        pixels = F.interpolate(rgb, scale_factor=self.downscale_ratio, mode="nearest")
        return pixels.permute(0, 2, 3, 1).clamp(0, 1)
