"""The training noise: Gaussian, optionally with kohya's noise offset and multires (pyramid) noise.

kohya sd-scripts (library/custom_train_functions.py, `apply_noise_offset` and `pyramid_noise_like`,
applied in that order by train_util.get_noise_noisy_latents_and_timesteps):

  offset    noise + offset * n_bc,  n_bc ~ N(0, 1) of shape [B, C, 1, 1]: a random per-channel shift,
            so the model learns to move the mean brightness (Crosslabs' "diffusion with offset noise")
  multires  for i in 0 .. iterations - 1: r ~ U(2, 4); add noise of size (H / r^i, W / r^i), bilinearly
            upsampled, times discount^i; stop once a side reaches 1; then divide by the std of the whole
            batch (kohya's normalisation). Low-frequency noise teaches coarse structure.

Every draw comes from the caller's generator (the loop's noise generator, saved in checkpoints),
and with both options off the draw is the plain `randn` of old, so existing runs are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NoiseConfig:
    offset: float = 0.0  # kohya noise_offset (0: off; 0.05-0.1 typical)
    multires_iterations: int = 0  # kohya multires_noise_iterations (0: off; 6-10 typical)
    multires_discount: float = 0.3  # kohya multires_noise_discount: weight^i of level i

    def __post_init__(self) -> None:
        if self.offset < 0:
            raise ValueError(f"noise offset must not be negative (0 turns it off), got {self.offset}")
        if self.multires_iterations < 0:
            raise ValueError(f"noise multires_iterations must not be negative, got {self.multires_iterations}")
        if not 0.0 < self.multires_discount <= 1.0:
            raise ValueError(f"noise multires_discount must be in (0, 1], got {self.multires_discount}")


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """kohya's `pyramid_noise_like` with the draws taken from `generator`."""
    batch, channels, height, width = noise.shape
    noise = noise.clone()
    for level in range(iterations):
        ratio = float(torch.rand((), generator=generator)) * 2 + 2  # not always 2x: kohya's r ~ U(2, 4)
        low_h, low_w = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = torch.randn(batch, channels, low_h, low_w, generator=generator)
        noise += F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if low_h == 1 or low_w == 1:
            break
    return noise / noise.std()


def training_noise(shape: torch.Size | tuple[int, ...], cfg: NoiseConfig, generator: torch.Generator) -> torch.Tensor:
    """The noise of one batch of latents [B, C, H, W] (fp32, CPU)."""
    noise = torch.randn(shape, generator=generator)
    if cfg.offset > 0:
        noise = noise + cfg.offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    if cfg.multires_iterations > 0:
        noise = pyramid_noise(noise, cfg.multires_iterations, cfg.multires_discount, generator)
    return noise
