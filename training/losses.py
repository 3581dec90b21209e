"""Flow-matching losses: L2, Huber, smooth-L1 with a (scheduled) threshold c, optional pixel weights.

Elementwise, d = pred - target (the formulas of kohya sd-scripts' `conditional_loss`):
  l2         d^2
  huber      2 c (sqrt(d^2 + c^2) - c)    pseudo-Huber: d^2 near 0, 2 c |d| far out
  smooth_l1  2 (sqrt(d^2 + c^2) - c)      the same curve divided by c: d^2 / c near 0, 2 |d| far
             out (kohya's smooth_l1, not torch's piecewise SmoothL1Loss)

c per sample from its sigma (kohya's huber_schedule, adapted to flow matching as sd-scripts
does for SD3 / Flux, whose timesteps are sigma * 1000 over num_train_timesteps = 1000):
  constant     c = huber_c * huber_scale
  exponential  c = huber_scale * huber_c ** sigma           huber_scale at sigma 0 -> huber_c * huber_scale at 1
  snr          c = (1 - huber_c) / (1 + r)^2 + huber_c, r = sigma / (1 - sigma)
               sd-scripts computes r = sqrt((1 - a) / a) from the DDPM alphas_cumprod, i.e. the
               noise-to-signal ratio, and refuses 'snr' for flow models (no alphas_cumprod); for
               x_t = (1 - sigma) x0 + sigma noise that ratio is sigma / (1 - sigma), which gives
               c = (1 - huber_c) (1 - sigma)^2 + huber_c. As in sd-scripts, huber_scale is not used.

Per-sample weights lambda(sigma) (`weighting`), multiplying each sample's elementwise loss:
  none       1
  sigma_sqrt sigma^-2                               musubi-tuner / diffusers compute_loss_weighting_for_sd3
  cosmap     2 / (pi (1 - 2 sigma + 2 sigma^2))     the same function (SD3 paper's cosmap, arXiv:2403.03206)
  min_snr    min((1 - sigma)^2, gamma sigma^2)      min-SNR-gamma (Hang et al., arXiv:2303.09556) in flow form:
             min-SNR weighs the x0 error by min(SNR, gamma); with x_t = (1 - sigma) x0 + sigma noise the x0 error
             of a velocity prediction is sigma times the velocity error, and SNR = ((1 - sigma) / sigma)^2, so
             the velocity loss is weighted by sigma^2 min(SNR, gamma). (The same derivation for DDPM
             v-prediction gives kohya's min(SNR, gamma) / (SNR + 1).)
musubi-tuner's other two schemes, logit_normal and mode, change how sigmas are drawn, not the loss:
they are timestep methods there (timesteps.py).

Weights w (from masks: w = m^gamma (1 - mu) + mu, data/masks.py `mask_weights`) broadcast over the
loss; the loss is then the weighted mean sum(L w) / sum(w), which for w of shape [B, 1, H, W]
is sum(L w) / (C sum(w)): zero-weight pixels add no gradient and the scale does not depend on
how much of the image is masked out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSSES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap", "min_snr")


@dataclass
class LossConfig:
    kind: str = "l2"  # l2 | huber | smooth_l1
    huber_c: float = 0.1  # threshold c of huber / smooth_l1 (its floor for the schedules)
    huber_schedule: str = "constant"  # constant | exponential | snr: how c follows sigma
    huber_scale: float = 1.0  # c multiplier of the constant and exponential schedules
    weighting: str = "none"  # none | sigma_sqrt | cosmap | min_snr: a weight per sample from its sigma
    min_snr_gamma: float = 5.0  # gamma of min_snr (5 is the paper's and kohya's usual value)


def _validate(cfg: LossConfig) -> None:
    if cfg.kind not in LOSSES:
        raise ValueError(f"loss {cfg.kind!r} is not one of {LOSSES}")
    if cfg.huber_schedule not in HUBER_SCHEDULES:
        raise ValueError(f"huber_schedule {cfg.huber_schedule!r} is not one of {HUBER_SCHEDULES}")
    if not 0.0 < cfg.huber_c <= 1.0:
        raise ValueError(f"huber_c {cfg.huber_c} must be in (0, 1]")
    if cfg.huber_scale <= 0:
        raise ValueError(f"huber_scale {cfg.huber_scale} must be > 0")
    if cfg.weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting {cfg.weighting!r} is not one of {WEIGHTINGS}")
    if cfg.min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma {cfg.min_snr_gamma} must be > 0")


def sigma_weights(cfg: LossConfig, sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) per sample, shape [B] (fp32), of `cfg.weighting` (see the module docstring)."""
    sigma = sigma.float().reshape(-1)
    if cfg.weighting == "sigma_sqrt":
        return sigma.pow(-2.0)
    if cfg.weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma.square()))
    if cfg.weighting == "min_snr":
        return torch.minimum((1.0 - sigma).square(), cfg.min_snr_gamma * sigma.square())
    return torch.ones_like(sigma)


def huber_threshold(cfg: LossConfig, sigma: torch.Tensor | None, batch: int) -> torch.Tensor:
    """c per sample, shape [batch] (fp32)."""
    if cfg.huber_schedule == "constant":
        return torch.full((batch,), cfg.huber_c * cfg.huber_scale)
    if sigma is None:
        raise ValueError(f"huber_schedule {cfg.huber_schedule!r} needs the batch's sigmas: pass sigma= to flow_loss")
    sigma = sigma.float().reshape(-1)
    if sigma.numel() != batch:
        raise ValueError(f"flow_loss: {sigma.numel()} sigmas for a batch of {batch}")
    if cfg.huber_schedule == "exponential":
        return cfg.huber_scale * torch.pow(torch.tensor(cfg.huber_c, device=sigma.device), sigma)
    return (1.0 - cfg.huber_c) * (1.0 - sigma).square() + cfg.huber_c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: torch.Tensor | float) -> torch.Tensor:
    """Loss per element; `huber_c` is a float or one value per sample (broadcast over the rest)."""
    diff = pred - target
    if kind == "l2":
        return diff.square()
    if isinstance(huber_c, torch.Tensor):
        huber_c = huber_c.to(diff).view(-1, *([1] * (diff.ndim - 1)))
    # sqrt(d^2 + c^2) - c, written as d^2 / (sqrt(d^2 + c^2) + c): the same value without the
    # cancellation that loses most fp32 digits of small residuals.
    squared = diff.square()
    soft_l1 = squared / (torch.sqrt(squared + huber_c**2) + huber_c)
    if kind == "huber":
        return 2.0 * huber_c * soft_l1
    if kind == "smooth_l1":
        return 2.0 * soft_l1
    raise ValueError(f"loss {kind!r} is not one of {LOSSES}")


def flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    loss: LossConfig | None = None,
    sigma: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean loss over (B, C, H, W) in fp32; weights broadcastable to it make it the weighted mean.

    `sigma` [B] feeds the Huber schedule and the sigma weighting.
    """
    cfg = loss or LossConfig()
    _validate(cfg)
    huber_c = huber_threshold(cfg, sigma, pred.shape[0]).to(pred.device) if cfg.kind != "l2" else 0.0
    elementwise = elementwise_loss(pred.float(), target.float(), cfg.kind, huber_c)
    if cfg.weighting != "none":
        if sigma is None:
            raise ValueError(f"loss weighting {cfg.weighting!r} needs the batch's sigmas: pass sigma= to flow_loss")
        per_sample = sigma_weights(cfg, torch.as_tensor(sigma)).to(elementwise.device)
        elementwise = elementwise * per_sample.view(-1, *([1] * (elementwise.ndim - 1)))
    if weights is None:
        return elementwise.mean()
    try:
        weights = weights.to(elementwise).expand_as(elementwise)
    except RuntimeError as error:
        raise ValueError(
            f"loss weights of shape {tuple(weights.shape)} do not broadcast to the prediction {tuple(pred.shape)}; "
            "resize the mask to the latent size (B, 1, H, W)"
        ) from error
    return (elementwise * weights).sum() / weights.sum().clamp_min(1e-8)
