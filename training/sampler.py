"""Flow-matching Euler sampler with classifier-free guidance and timestep shift.

Sigmas run 1 -> 0 on a uniform grid, shifted by S(t; k) = k t / (1 + (k - 1) t) like
ComfyUI's ModelSamplingAuraFlow / SD3 shift; each step moves x by (sigma_next - sigma) * v
where v = noise - x0 is the model's prediction (CFG: v_neg + g (v_pos - v_neg)).
"""

from __future__ import annotations

from typing import Callable

import torch

from .size_checks import check_attention_fits
from .timesteps import shift_sigma


def sigma_schedule(steps: int, shift: float) -> torch.Tensor:
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def check_sampling_fits(model: torch.nn.Module, latent_shape: tuple[int, ...], context_tokens: int,
                        neg_tokens: int | None, cfg: float, device: torch.device, what: str = "") -> None:
    """Refuse a sample whose attention cannot fit (size_checks.check_attention_fits) before any step runs;
    `what` names it for the user (its pixel size), else the latent size is given."""
    batch, (height, width) = latent_shape[0], latent_shape[-2:]
    use_cfg = cfg != 1.0 and neg_tokens is not None
    check_attention_fits(model, batch * (2 if use_cfg else 1), (height, width), max(context_tokens, neg_tokens or 0),
                         device, what or f"sampling {batch} latent(s) of {width}x{height}",
                         "use a smaller width / height or fewer prompts at once (or sample on a GPU)")


@torch.no_grad()
def sample_euler(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    context: torch.Tensor,
    context_lens: torch.Tensor | None,
    neg_context: torch.Tensor | None = None,
    neg_context_lens: torch.Tensor | None = None,
    steps: int = 20,
    cfg: float = 1.0,
    shift: float = 3.0,
) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) into latents; cfg 1 skips the negative pass."""
    sigmas = sigma_schedule(steps, shift).to(noise.device)
    x = noise
    batch = noise.shape[0]
    use_cfg = cfg != 1.0 and neg_context is not None
    check_sampling_fits(model, tuple(noise.shape), context.shape[1], None if neg_context is None else neg_context.shape[1],
                        cfg, noise.device)
    for i in range(steps):
        sigma = sigmas[i].expand(batch)
        if use_cfg:
            v_both = model(
                torch.cat([x, x]),
                torch.cat([sigma, sigma]),
                _pad_cat(context, neg_context),
                torch.cat([_lens(context, context_lens), _lens(neg_context, neg_context_lens)]),
            )
            v_pos, v_neg = v_both.chunk(2)
            velocity = v_neg + cfg * (v_pos - v_neg)
        else:
            velocity = model(x, sigma, context, context_lens)
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity.to(x.dtype)
    return x


def _lens(context: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
    if lens is None:
        return torch.full((context.shape[0],), context.shape[1], dtype=torch.long, device=context.device)
    return lens.to(context.device)


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate two context batches of different token counts, zero-padding the shorter."""
    n = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1]))  # noqa: E731
    return torch.cat([pad(a), pad(b)])
