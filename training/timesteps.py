"""Noise-level (sigma) sampling for flow-matching training.

sigma in (0, 1): x_t = (1 - sigma) x0 + sigma * noise. Methods (musubi-tuner names), n ~ N(0, 1):
  uniform        sigma ~ U(0, 1)
  sigmoid        sigma = sigmoid(scale * n)
  shift          sigmoid, then S(t; k) = k t / (1 + (k - 1) t) with k = discrete_flow_shift
  flux_shift     sigmoid, then S(t; exp(mu)) = exp(mu) / (exp(mu) + 1/t - 1), mu linear in image
                 tokens (256 -> 0.5, 4096 -> 1.15), as Flux.1's scheduler
  qwen_shift     as flux_shift with 256 -> 0.5, 8192 -> 0.9 (Qwen-Image)
  logsnr         logSNR ~ N(logsnr_mean, logsnr_std), sigma = sigmoid(-logSNR / 2)
                 ("Style-friendly SNR sampler", arXiv:2411.14793)
  qinglong_flux  per sample, a mixture: 80% flux_shift, 7.5% logsnr(logsnr_mean, logsnr_std),
                 12.5% logsnr with fixed N(5.36, 1.0) (low noise, fine detail)
  qinglong_qwen  the same with qwen_shift's mu
  logit_normal   u = sigmoid(logit_mean + logit_std * n), sigma = S(1 - u; discrete_flow_shift)
  mode           u ~ U(0, 1), u = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u), sigma = S(1 - u; shift)
                 These two are musubi-tuner's "weighting schemes" that draw timesteps with a density
                 (hv_train.py `compute_density_for_timestep_sampling`, from diffusers' SD3 trainer):
                 musubi turns u into the timestep at index u * 1000 of its shifted, descending
                 schedule, i.e. sigma = S(1 - u; discrete_flow_shift).
The qinglong mixture is that of kohya-ss/musubi-tuner, src/musubi_tuner/hv_train_network.py
(`timestep_sampling.startswith("qinglong")`: thresholds 0.80 / 0.875 on one uniform draw per
sample; the second logsnr component uses the constants 5.36 and 1.0 whatever logsnr_mean is).

Timestep buckets (musubi-tuner's `num_timestep_buckets`, dataset/bucket.py BucketBatchManager):
each pool of draws (one epoch of micro-batches) holds ceil(P / K) uniform draws from each of K
equal strata of [0, 1), shuffled and cut to P, so every epoch trains evenly across noise levels.
A pool draw replaces the method's first random number (the uniform itself, or the normal
Phi^-1(u), as musubi-tuner's `uniform_to_normal_ppF`). The pools are a pure function of (seed,
pool index) and the micro-batch count, which checkpoints hold, so resume stays exact.

Range [min_sigma, max_sigma], as musubi-tuner's min/max_timestep (which are these times 1000):
  rescale  sigma = min + (max - min) * sigma         (musubi-tuner's default)
  reject   redraw samples outside the range: the distribution restricted to it
           (musubi-tuner's --preserve_distribution_shape)
  clamp    clip into the range (puts the clipped mass on the two bounds)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data.order import seeded_generator

METHODS = ("uniform", "sigmoid", "shift", "flux_shift", "qwen_shift", "logsnr", "qinglong_flux", "qinglong_qwen",
           "logit_normal", "mode")
RANGE_MODES = ("rescale", "reject", "clamp")

FLUX_MU = ((256, 0.5), (4096, 1.15))  # (image tokens, mu) at two resolutions
QWEN_MU = ((256, 0.5), (8192, 0.9))
QINGLONG_MID_SHARE = 0.80  # flux / qwen shift
QINGLONG_LOGSNR_SHARE = 0.075  # logsnr(logsnr_mean, logsnr_std); the rest, 12.5%, is logsnr(5.36, 1.0)
QINGLONG_DETAIL_LOGSNR = (5.36, 1.0)
MAX_REJECT_ROUNDS = 1000


@dataclass
class TimestepConfig:
    method: str = "shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    logsnr_mean: float = 0.0
    logsnr_std: float = 2.0
    min_sigma: float = 0.0
    max_sigma: float = 1.0
    range_mode: str = "rescale"  # rescale | reject | clamp: how [min_sigma, max_sigma] is applied
    logit_mean: float = 0.0  # logit_normal (musubi-tuner / SD3 defaults)
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode
    num_buckets: int = 0  # stratified pools of draws per epoch (musubi num_timestep_buckets; 0 or 1: off)


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """S(t; k) = k t / (1 + (k - 1) t): k > 1 moves mass towards high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_mu(n_tokens: int, base: tuple[int, float], top: tuple[int, float]) -> float:
    """mu linear in the image token count through two (tokens, mu) points."""
    (x1, y1), (x2, y2) = base, top
    return y1 + (y2 - y1) * (n_tokens - x1) / (x2 - x1)


def exp_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """exp(mu) / (exp(mu) + 1/t - 1), which is S(t; exp(mu))."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def _logsnr_sigma(normal: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.sigmoid(-(mean + std * normal) / 2.0)


def _normal_from_uniform(uniform: torch.Tensor) -> torch.Tensor:
    """Phi^-1(u) = sqrt(2) erfinv(2u - 1), with u kept off 0 and 1 (musubi-tuner's uniform_to_normal_ppF)."""
    return math.sqrt(2.0) * torch.erfinv(2.0 * uniform.clamp(1e-7, 1.0 - 1e-7) - 1.0)


def _draw(cfg: TimestepConfig, batch: int, n_image_tokens: int, generator: torch.Generator,
          uniform: torch.Tensor | None = None) -> torch.Tensor:
    """`batch` sigmas in (0, 1) before the range is applied; `uniform` (a bucket pool's draws) replaces the
    method's first random number."""
    # The first normal draw comes first for every method, so the random stream of the
    # original methods is unchanged by the ones added later.
    normal = torch.randn(batch, generator=generator) if uniform is None else _normal_from_uniform(uniform)
    if cfg.method == "uniform":
        return torch.rand(batch, generator=generator) if uniform is None else uniform
    if cfg.method == "logit_normal":
        return shift_sigma(1.0 - torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal), cfg.discrete_flow_shift)
    if cfg.method == "mode":
        u = torch.rand(batch, generator=generator) if uniform is None else uniform
        u = 1.0 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
        return shift_sigma(1.0 - u, cfg.discrete_flow_shift)
    if cfg.method == "logsnr":
        return _logsnr_sigma(normal, cfg.logsnr_mean, cfg.logsnr_std)
    t = torch.sigmoid(cfg.sigmoid_scale * normal)
    if cfg.method == "sigmoid":
        return t
    if cfg.method == "shift":
        return shift_sigma(t, cfg.discrete_flow_shift)
    mu_points = FLUX_MU if cfg.method in ("flux_shift", "qinglong_flux") else QWEN_MU
    mid = exp_shift(t, resolution_mu(n_image_tokens, *mu_points))
    if cfg.method in ("flux_shift", "qwen_shift"):
        return mid
    choice = torch.rand(batch, generator=generator)
    styled = _logsnr_sigma(torch.randn(batch, generator=generator), cfg.logsnr_mean, cfg.logsnr_std)
    detail = _logsnr_sigma(torch.randn(batch, generator=generator), *QINGLONG_DETAIL_LOGSNR)
    return torch.where(
        choice < QINGLONG_MID_SHARE,
        mid,
        torch.where(choice < QINGLONG_MID_SHARE + QINGLONG_LOGSNR_SHARE, styled, detail),
    )


def _validate(cfg: TimestepConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"timestep sampling {cfg.method!r} is not one of {METHODS}")
    if cfg.range_mode not in RANGE_MODES:
        raise ValueError(f"timestep range_mode {cfg.range_mode!r} is not one of {RANGE_MODES}")
    if not 0.0 <= cfg.min_sigma < cfg.max_sigma <= 1.0:
        raise ValueError(
            f"timestep range min_sigma={cfg.min_sigma}, max_sigma={cfg.max_sigma}: need 0 <= min_sigma < max_sigma <= 1"
        )
    if cfg.num_buckets < 0:
        raise ValueError(f"timestep num_buckets must not be negative (0 turns bucketing off), got {cfg.num_buckets}")
    if cfg.num_buckets > 1 and cfg.range_mode == "reject":
        raise ValueError("timestep num_buckets cannot be combined with range_mode='reject' (a redraw would leave "
                         "the strata); use range_mode 'rescale' or 'clamp'")
    if cfg.logit_std <= 0:
        raise ValueError(f"timestep logit_std must be > 0, got {cfg.logit_std}")


def sample_sigmas(cfg: TimestepConfig, batch: int, n_image_tokens: int, generator: torch.Generator,
                  uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Draw `batch` sigmas (fp32, CPU) with the configured method and range.

    `n_image_tokens` is the image sequence length the model sees (after patchifying); only
    the resolution-dependent methods use it. `uniform` [batch] are a timestep pool's draws
    (`TimestepPool`).
    """
    _validate(cfg)
    low, high = cfg.min_sigma, cfg.max_sigma
    if cfg.range_mode == "rescale":
        sigma = low + (high - low) * _draw(cfg, batch, n_image_tokens, generator, uniform)
    elif cfg.range_mode == "clamp":
        sigma = _draw(cfg, batch, n_image_tokens, generator, uniform).clamp(low, high)
    else:
        kept = torch.empty(0)
        for _ in range(MAX_REJECT_ROUNDS):
            draw = _draw(cfg, batch, n_image_tokens, generator)
            kept = torch.cat([kept, draw[(draw >= low) & (draw <= high)]])
            if len(kept) >= batch:
                break
        else:
            raise ValueError(
                f"timestep sampling {cfg.method!r} almost never lands in [{low}, {high}] "
                f"({len(kept)} of {batch} after {MAX_REJECT_ROUNDS} rounds); widen the range or use range_mode='rescale'"
            )
        sigma = kept[:batch]
    # sigma = 0 or 1 exactly makes the model input pure data or pure noise; keep it inside.
    return sigma.clamp(1e-5, 1.0 - 1e-5)


def stratified_pool(num_buckets: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` uniform draws, ceil(size / K) from each stratum [i / K, (i + 1) / K), shuffled, cut to size."""
    per_bucket = -(-size // num_buckets)
    strata = torch.arange(num_buckets).repeat_interleave(per_bucket)
    draws = (strata + torch.rand(len(strata), generator=generator)) / num_buckets
    return draws[torch.randperm(len(draws), generator=generator)][:size]


class TimestepPool:
    """Bucketed uniforms for micro-batch m: pool m // P (P micro-batches of `batch_size` rows, one epoch)."""

    def __init__(self, num_buckets: int, seed: int, batch_size: int, examples_per_epoch: int) -> None:
        self.num_buckets, self.seed, self.batch_size = num_buckets, seed, batch_size
        self.batches_per_pool = max(1, -(-examples_per_epoch // batch_size))
        self._cached: tuple[int, torch.Tensor] | None = None

    def uniforms(self, micro_batch: int, rows: int) -> torch.Tensor:
        """The draws of the 0-based micro-batch `micro_batch` (a short batch takes the first `rows`)."""
        index, position = divmod(micro_batch, self.batches_per_pool)
        if self._cached is None or self._cached[0] != index:
            size = self.batches_per_pool * self.batch_size
            self._cached = (index, stratified_pool(self.num_buckets, size,
                                                   seeded_generator(self.seed, "timestep_pool", index)))
        start = position * self.batch_size
        return self._cached[1][start : start + rows]
