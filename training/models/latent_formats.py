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
is the identity. The embedded demo's pixel "VAE" is already in model space: identity.
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

    def to_model(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the model's latent space (ComfyUI's process_in)."""
        return (latents - self.shift_factor) * self.scale_factor

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> raw VAE latents (ComfyUI's process_out)."""
        return latents / self.scale_factor + self.shift_factor


FLUX = LatentFormat("flux", channels=16, downscale=8, scale_factor=0.3611, shift_factor=0.1159)
FLUX2 = LatentFormat("flux2", channels=128, downscale=16)
DEMO_PIXELS = LatentFormat("demo_pixels", channels=12, downscale=2)

# Keyed by the engine's architecture name; "demo" is the embedded demo base.
LATENT_FORMATS: dict[str, LatentFormat] = {
    "zimage": FLUX,
    "flux": FLUX,
    "flux2": FLUX2,
    "demo": DEMO_PIXELS,
}


def latent_format_for(architecture: str) -> LatentFormat:
    if architecture not in LATENT_FORMATS:
        raise ValueError(
            f"no latent format is known for architecture {architecture!r}; known: {sorted(LATENT_FORMATS)}. "
            "Add its scale / shift (ComfyUI comfy/latent_formats.py) to training/models/latent_formats.py"
        )
    return LATENT_FORMATS[architecture]
