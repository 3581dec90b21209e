"""Noise-level (sigma) sampling for flow-matching training.

sigma in (0, 1): x_t = (1 - sigma) x0 + sigma * noise. Methods (musubi-tuner names):
  uniform      sigma ~ U(0, 1)
  sigmoid      sigma = sigmoid(scale * n), n ~ N(0, 1)
  shift        sigmoid, then S(t; k) = k t / (1 + (k - 1) t) with k = discrete_flow_shift
  flux_shift   sigmoid, then exp(mu) / (exp(mu) + 1/t - 1), mu linear in image tokens
               (256 tokens -> 0.5, 4096 -> 1.15), as Flux.1's scheduler
  qwen_shift   as flux_shift with 256 -> 0.5, 8192 -> 0.9 (Qwen-Image)
  logsnr       logSNR ~ N(mean, std), sigma = sigmoid(-logSNR / 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("uniform", "sigmoid", "shift", "flux_shift", "qwen_shift", "logsnr")


@dataclass
class TimestepConfig:
    method: str = "shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    logsnr_mean: float = 0.0
    logsnr_std: float = 2.0
    min_sigma: float = 0.0
    max_sigma: float = 1.0


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """S(t; k) = k t / (1 + (k - 1) t): k > 1 moves mass towards high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_mu(n_tokens: int, base: tuple[int, float], top: tuple[int, float]) -> float:
    """mu linear in the image token count through two (tokens, mu) points."""
    (x1, y1), (x2, y2) = base, top
    return y1 + (y2 - y1) * (n_tokens - x1) / (x2 - x1)


def exp_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def sample_sigmas(cfg: TimestepConfig, batch: int, n_image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Draw `batch` sigmas (fp32, CPU) with the configured method."""
    if cfg.method not in METHODS:
        raise ValueError(f"timestep sampling {cfg.method!r} is not one of {METHODS}")
    normal = torch.randn(batch, generator=generator)
    if cfg.method == "uniform":
        t = torch.rand(batch, generator=generator)
    elif cfg.method == "logsnr":
        t = torch.sigmoid(-(cfg.logsnr_mean + cfg.logsnr_std * normal) / 2.0)
    else:
        t = torch.sigmoid(cfg.sigmoid_scale * normal)
        if cfg.method == "shift":
            t = shift_sigma(t, cfg.discrete_flow_shift)
        elif cfg.method == "flux_shift":
            t = exp_shift(t, resolution_mu(n_image_tokens, (256, 0.5), (4096, 1.15)))
        elif cfg.method == "qwen_shift":
            t = exp_shift(t, resolution_mu(n_image_tokens, (256, 0.5), (8192, 0.9)))
    return t.clamp(cfg.min_sigma, cfg.max_sigma).clamp(1e-5, 1.0 - 1e-5)
