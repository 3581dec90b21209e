"""Flow-matching Euler sampler with classifier-free guidance and timestep shift.

Sigmas run 1 -> 0 on a uniform grid, shifted by S(t; k) = k t / (1 + (k - 1) t) like
ComfyUI's ModelSamplingAuraFlow / SD3 shift; each step moves x by (sigma_next - sigma) * v
where v = noise - x0 is the model's prediction (CFG: v_neg + g (v_pos - v_neg)).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import replace
from typing import Callable

import torch

from .conditioning import Conditioning
from .size_checks import check_attention_fits
from .timesteps import shift_sigma


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the base computes in: that of most of its floating weights outside fp8 storage (fp8 layers
    dequantise to their input's dtype)."""
    counts: Counter = Counter()
    for p in model.parameters():
        if p.is_floating_point() and p.element_size() > 1:
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def base_precision(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Autocast to the base's compute dtype (bf16 / fp16 / fp8 storage), as ComfyUI runs a model in its dtype;
    nothing for an fp32 base."""
    dtype = base_dtype(model)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def sigma_schedule(steps: int, shift: float) -> torch.Tensor:
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def check_sampling_fits(model: torch.nn.Module, latent_shape: tuple[int, ...], cond: Conditioning,
                        neg_cond: Conditioning | None, cfg: float, device: torch.device, what: str = "") -> None:
    """Refuse a sample whose attention cannot fit (size_checks.check_attention_fits) before any step runs;
    `what` names it for the user (its pixel size), else the latent size is given."""
    batch, (height, width) = latent_shape[0], latent_shape[-2:]
    use_cfg = cfg != 1.0 and neg_cond is not None
    text_tokens = max(cond.tokens, neg_cond.tokens if use_cfg else 0)
    check_attention_fits(model, batch * (2 if use_cfg else 1), (height, width), text_tokens, device,
                         what or f"sampling {batch} latent(s) of {width}x{height}",
                         "use a smaller width / height or fewer prompts at once (or sample on a GPU)",
                         [tuple(r.shape[-2:]) for r in cond.reference_latents])


@torch.no_grad()
def sample_euler(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    cond: Conditioning,
    neg_cond: Conditioning | None = None,
    steps: int = 20,
    cfg: float = 1.0,
    shift: float = 3.0,
) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) into latents; cfg 1 skips the negative pass.

    `cond` (and `neg_cond`, one row per noise row) is on the noise's device; its guidance
    value, if any, is the distilled guidance of guidance-embedded models (kohya's --g).
    """
    sigmas = sigma_schedule(steps, shift).to(noise.device)
    x = noise
    batch = noise.shape[0]
    use_cfg = cfg != 1.0 and neg_cond is not None
    check_sampling_fits(model, tuple(noise.shape), cond, neg_cond, cfg, noise.device)
    inputs = (Conditioning.collate([cond, _negative_like(neg_cond, cond)]) if use_cfg else cond).model_inputs(model)
    for i in range(steps):
        sigma = sigmas[i].expand(batch)
        if use_cfg:
            v_pos, v_neg = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **inputs).chunk(2)
            velocity = v_neg + cfg * (v_pos - v_neg)
        else:
            velocity = model(x, sigma, **inputs)
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity.to(x.dtype)
    return x


def _negative_like(neg_cond: Conditioning, cond: Conditioning) -> Conditioning:
    """The negative pass sees the positive's guidance and reference images unless it has its own
    (ComfyUI applies FluxGuidance / ReferenceLatent to the positive, and edit models need the
    reference in both passes for CFG to compare like with like)."""
    return replace(neg_cond,
                   guidance=cond.guidance if neg_cond.guidance is None else neg_cond.guidance,
                   reference_latents=neg_cond.reference_latents or cond.reference_latents)
