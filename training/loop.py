"""The training loop: one function, read top to bottom.

Trains the parameters of `trainable` (an adapter network, or the model itself for
pretraining) on flow matching: x_t = (1 - sigma) x0 + sigma * noise, target
noise - x0. `accelerate` owns device placement, autocast and gradient accumulation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from accelerate import Accelerator
from PIL import Image

from .config import TrainConfig
from .data.latents import LatentDataset
from .losses import flow_loss
from .progress import ProgressCallback, ProgressEvent
from .sampler import sample_euler
from .schedules import make_scheduler
from .timesteps import sample_sigmas


@dataclass
class PreviewSpec:
    """Fixed prompts and seed, so successive previews are comparable."""

    context: torch.Tensor  # (P, L, D)
    context_lens: torch.Tensor  # (P,)
    latent_shape: tuple[int, int, int]  # (C, H, W)
    decode: Callable[[torch.Tensor], list[Image.Image]]  # latents -> images
    neg_context: torch.Tensor | None = None  # (P, L', D)
    neg_context_lens: torch.Tensor | None = None
    steps: int = 20
    cfg: float = 1.0
    shift: float = 3.0
    seed: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    steps_done: int = 0
    skipped_nonfinite: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def render_previews(model: nn.Module, spec: PreviewSpec) -> list[Image.Image]:
    device = next(model.parameters()).device
    noise = torch.randn((spec.context.shape[0], *spec.latent_shape), generator=torch.Generator().manual_seed(spec.seed))
    latents = sample_euler(
        model,
        noise.to(device),
        spec.context.to(device),
        spec.context_lens.to(device),
        None if spec.neg_context is None else spec.neg_context.to(device),
        None if spec.neg_context_lens is None else spec.neg_context_lens.to(device),
        steps=spec.steps,
        cfg=spec.cfg,
        shift=spec.shift,
    )
    return spec.decode(latents.float().cpu())


def train(
    model: nn.Module,
    trainable: nn.Module,
    data: LatentDataset,
    cfg: TrainConfig,
    on_progress: ProgressCallback | None = None,
    previews: PreviewSpec | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Run `cfg.steps` optimizer steps; `should_stop` is polled after every step."""
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
    )
    torch.manual_seed(cfg.seed)
    data_rng = torch.Generator().manual_seed(cfg.seed)  # batch order
    noise_rng = torch.Generator().manual_seed(cfg.seed + 1)  # sigmas and noise
    model.to(accelerator.device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    trainable.train()

    params = [p for p in trainable.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the trainable module has no parameters with requires_grad")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    batches = data.batches(cfg.batch_size, data_rng)

    result = TrainResult()
    start = time.perf_counter()
    nonfinite_run = 0
    for step in range(cfg.steps):
        step_losses = []
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            x0 = batch.latents.to(accelerator.device)
            noise = torch.randn(x0.shape, generator=noise_rng).to(accelerator.device)
            sigma = sample_sigmas(cfg.timesteps, x0.shape[0], data.n_image_tokens, noise_rng).to(accelerator.device)
            s = sigma.view(-1, 1, 1, 1)
            noisy = (1.0 - s) * x0 + s * noise
            with accelerator.accumulate(trainable), accelerator.autocast():
                pred = model(noisy, sigma, batch.context.to(accelerator.device), batch.context_lens.to(accelerator.device))
                weights = None if batch.weights is None else batch.weights.to(accelerator.device)
                loss = flow_loss(pred, noise - x0, weights, cfg.loss, cfg.huber_c)
                if not torch.isfinite(loss):
                    # A NaN / inf batch must not reach the weights; skip it and stop if it persists.
                    result.skipped_nonfinite += 1
                    nonfinite_run += 1
                    if nonfinite_run >= cfg.max_nonfinite_steps:
                        raise FloatingPointError(
                            f"{nonfinite_run} consecutive non-finite losses at step {step}; lower the lr, "
                            "enable max_grad_norm, or train in fp32 (mixed_precision='no')"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    continue
                nonfinite_run = 0
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.item())  # CPU-GPU sync, once per micro-batch

        result.steps_done = step + 1
        mean_loss = sum(step_losses) / len(step_losses) if step_losses else math.nan
        result.losses.append(mean_loss)
        elapsed = time.perf_counter() - start
        event = ProgressEvent(
            step=step + 1,
            total=cfg.steps,
            loss=mean_loss,
            lr=scheduler.get_last_lr()[0],
            elapsed_s=elapsed,
            eta_s=elapsed / (step + 1) * (cfg.steps - step - 1),
        )
        if previews is not None and cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps):
            trainable.eval()
            event.previews = render_previews(model, previews)
            trainable.train()
        if on_progress is not None:
            on_progress(event)
        if should_stop is not None and should_stop():
            result.stopped_early = step + 1 < cfg.steps
            break
    trainable.eval()
    result.seconds = time.perf_counter() - start
    return result
