"""Latent spaces: how a VAE's raw latents map to the space each model is trained in.

ComfyUI keeps raw VAE latents in its LATENT sockets and passes them through the
model's `latent_format.process_in` before the diffusion model, `process_out` after
sampling (comfy/latent_formats.py). Our models work in the process_in space, so
every latent that crosses the ComfyUI boundary goes through `to_model` (VAEEncode
output -> training / sampling) or `to_vae` (sampler output -> VAEDecode input).

Flux.1 and Z-Image share the Flux VAE and ComfyUI's `latent_formats.Flux`
(SD3-style): process_in(z) = (z - shift) * scale, process_out(z) = z / scale + shift.
Flux.2's VAE normalises its own latents (batch-norm statistics inside the VAE) and hands
out 128 channels at 1/16 scale, already 2x2-patchified: ComfyUI's `latent_formats.Flux2`
is the identity. Qwen-Image uses the Wan 2.1 VAE and ComfyUI's `latent_formats.Wan21`: per-channel
statistics, process_in(z) = (z - mean_c) * scale / std_c, and video-shaped latents
[B, 16, frames, h, w]; the engine trains on one frame, so `to_model` drops the frame axis
(refusing more than one frame) and `to_vae` gives it back.
The embedded demo's pixel "VAE" is already in model space: identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentFormat:
    name: str
    channels: int  # latent channels the VAE produces
    downscale: int  # image pixels per latent cell along each side
    scale_factor: float = 1.0
    shift_factor: float = 0.0
    channel_mean: tuple[float, ...] | None = None  # per-channel shift (Wan 2.1), replaces shift_factor
    channel_std: tuple[float, ...] | None = None  # per-channel divisor (Wan 2.1)
    frame_axis: bool = False  # ComfyUI keeps these latents video-shaped: [B, C, frames, h, w]

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        if self.channel_mean is None:
            return self.shift_factor, 1.0
        view = (1, self.channels, 1, 1)
        as_tensor = lambda v: torch.tensor(v, dtype=latents.dtype, device=latents.device).view(view)  # noqa: E731
        return as_tensor(self.channel_mean), as_tensor(self.channel_std)

    def to_model(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the model's latent space (ComfyUI's process_in), [B, C, h, w]."""
        if self.frame_axis and latents.ndim == 5:
            if latents.shape[2] != 1:
                raise ValueError(f"{self.name} latents of {latents.shape[2]} frames; image training takes one frame")
            latents = latents[:, :, 0]
        mean, std = self._stats(latents)
        return (latents - mean) * self.scale_factor / std

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents [B, C, h, w] -> raw VAE latents (ComfyUI's process_out), in ComfyUI's shape."""
        mean, std = self._stats(latents)
        raw = latents * std / self.scale_factor + mean
        return raw.unsqueeze(2) if self.frame_axis else raw


FLUX = LatentFormat("flux", channels=16, downscale=8, scale_factor=0.3611, shift_factor=0.1159)
FLUX2 = LatentFormat("flux2", channels=128, downscale=16)
WAN21 = LatentFormat(
    "wan21", channels=16, downscale=8, frame_axis=True,
    channel_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    channel_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
)
DEMO_PIXELS = LatentFormat("demo_pixels", channels=12, downscale=2)

# Keyed by the engine's architecture name; "demo" is the embedded demo base.
LATENT_FORMATS: dict[str, LatentFormat] = {
    "zimage": FLUX,
    "flux": FLUX,
    "flux2": FLUX2,
    "qwen_image": WAN21,
    "demo": DEMO_PIXELS,
}


def latent_format_for(architecture: str) -> LatentFormat:
    if architecture not in LATENT_FORMATS:
        raise ValueError(
            f"no latent format is known for architecture {architecture!r}; known: {sorted(LATENT_FORMATS)}. "
            "Add its scale / shift (ComfyUI comfy/latent_formats.py) to training/models/latent_formats.py"
        )
    return LATENT_FORMATS[architecture]
