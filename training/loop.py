"""The training loop: one function, read top to bottom.

Trains the parameters of `trainable` (an adapter network, or the model itself for
pretraining) on flow matching: x_t = (1 - sigma) x0 + sigma * noise, target
noise - x0. `accelerate` owns device placement, autocast and gradient accumulation.

Exact resume: the data stream is a pure function of (seed, batches drawn), and a
checkpoint holds the trainable values, optimizer, scheduler, EMA and RNG states, so
N steps + save + resume + M steps equals N + M uninterrupted steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import torch.nn as nn
from accelerate import Accelerator
from PIL import Image

from .checkpoint import (
    ADAPTER_FILE,
    TrainState,
    checkpoint_dir,
    ema_twin,
    load_state,
    prune_states,
    resolve_resume,
    restore_rng,
    rng_state,
    save_state,
)
from .config import TrainConfig
from .data.latents import LatentBatch
from .ema import AdapterEMA
from .losses import flow_loss
from .network.comfy_format import save_adapter
from .network.network import LoRANetwork
from .optimizers import eval_weights, is_schedule_free, make_optimizer, train_mode
from .progress import ProgressCallback, ProgressEvent
from .sampler import sample_euler
from .schedules import make_scheduler, resolve_warmup
from .timesteps import sample_sigmas

log = logging.getLogger(__name__)
PATCH = 2  # every supported DiT patchifies latents 2x2; sets the token count for resolution shifts


class TrainingData(Protocol):
    def __len__(self) -> int: ...

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[LatentBatch]: ...


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
    captions: list[str] = field(default_factory=list)  # one per prompt, shown beside the images


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step, resumed runs included
    steps_done: int = 0
    skipped_nonfinite: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)  # written by this call, oldest first
    ema: AdapterEMA | None = None  # `with result.ema.applied(trainable):` to export the EMA weights

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None


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


def save_trained_adapter(
    network: LoRANetwork,
    path: str | Path,
    result: TrainResult,
    cfg: TrainConfig,
    base_hash: str = "",
    extra_metadata: dict | None = None,
) -> tuple[Path, Path | None]:
    """Save the adapter at `path` and, with EMA, the EMA weights at `ema_twin(path)`.

    The metadata records the steps done and the train options. Returns both paths
    (the second None without EMA).
    """
    meta = {"ss_steps": str(result.steps_done), "dit_trainer_train": cfg.to_dict(), **(extra_metadata or {})}
    saved = save_adapter(network, path, base_hash, meta)
    if result.ema is None:
        return saved, None
    with result.ema.applied(network):
        return saved, save_adapter(network, ema_twin(path), base_hash, meta)


def _as_list(previews: PreviewSpec | list[PreviewSpec] | None) -> list[PreviewSpec]:
    if previews is None:
        return []
    return [previews] if isinstance(previews, PreviewSpec) else list(previews)


def _param_groups(trainable: nn.Module, lr: float) -> list[dict]:
    """The network's own groups (LoRA+ ratios), or one group for a plain module."""
    if hasattr(trainable, "param_groups"):
        return trainable.param_groups(lr)
    return [{"params": [p for p in trainable.parameters() if p.requires_grad], "lr": lr}]


@contextlib.contextmanager
def _eval_view(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> Iterator[None]:
    """Schedule-free: show the eval weights inside, then restore the training values bit for bit.

    Switching a schedule-free optimizer to eval and back is a pair of lerps that does not
    round-trip exactly in floating point; restoring a copy keeps previews, EMA updates and
    checkpoints from nudging the training trajectory (and keeps resume exact).
    """
    if not is_schedule_free(optimizer):
        yield
        return
    saved = [p.detach().clone() for p in params]
    try:
        with eval_weights(optimizer):
            yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def _check_resumable(saved: dict, cfg: TrainConfig, where: Path) -> None:
    """Options that change the data stream or the update rule must match the checkpoint's."""
    for name in ("seed", "batch_size", "grad_accum", "optimizer"):
        if saved.get(name) != getattr(cfg, name):
            raise ValueError(
                f"cannot resume from {where}: it was trained with {name}={saved.get(name)!r} but this run has "
                f"{name}={getattr(cfg, name)!r}; set {name}={saved.get(name)!r} to continue it, or start a new run"
            )


def train(
    model: nn.Module,
    trainable: nn.Module,
    data: TrainingData,
    cfg: TrainConfig,
    on_progress: ProgressCallback | None = None,
    previews: PreviewSpec | list[PreviewSpec] | None = None,
    should_stop: Callable[[], bool] | None = None,
    run_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    adapter_metadata: dict | None = None,
) -> TrainResult:
    """Run optimizer steps up to `cfg.steps`.

    `should_stop` is polled after every step. With `run_dir`, resumable checkpoints are
    written every `cfg.save_every` steps, at the end, when `should_stop` fires and when an
    exception (an interrupt raised by a progress callback, say) ends the run.
    `resume_from` (a run folder or one checkpoint folder) continues a run exactly.
    On return the trainable holds its final weights (schedule-free: the eval weights).
    """
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
    )
    torch.manual_seed(cfg.seed)
    noise_rng = torch.Generator().manual_seed(cfg.seed + 1)  # sigmas and noise
    model.to(accelerator.device)
    trainable.to(accelerator.device)  # adapters live outside the model's module tree
    model.gradient_checkpointing = cfg.gradient_checkpointing
    trainable.train()

    if cfg.scale_weight_norms > 0 and not hasattr(trainable, "apply_max_norm"):
        raise ValueError("scale_weight_norms needs an adapter network to rescale; set it to 0 to train this module")
    if cfg.scale_weight_norms > 0 and getattr(getattr(trainable, "cfg", None), "init", "") == "pissa":
        raise ValueError("scale_weight_norms cannot rescale a PiSSA adapter (its base holds the residual); "
                         "set scale_weight_norms to 0 or use init kaiming / orthogonal")
    groups = _param_groups(trainable, cfg.lr)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: the trainable module has no parameters with requires_grad")
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay, cfg.betas, cfg.optimizer_kwargs)
    warmup = resolve_warmup(cfg.steps, cfg.warmup_steps, cfg.warmup_ratio)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.schedule, warmup, cfg.min_lr_ratio, cfg.power)
    ema = AdapterEMA(trainable, cfg.ema_decay, cfg.ema_start_step, cfg.ema_update_every) if cfg.ema_decay else None

    result = TrainResult(ema=ema)
    start_step, micro_batches = 0, 0
    if resume_from is not None:
        where = resolve_resume(resume_from)
        state = load_state(where)
        _check_resumable(state.config, cfg, where)
        with torch.no_grad():
            missing, unexpected = trainable.load_state_dict(state.trainable, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"cannot resume from {where}: the network differs from the checkpoint's "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]}); build it with the same options"
            )
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if ema is not None and state.ema is not None:
            ema.load_state_dict(state.ema)
        restore_rng(state.rng, noise_rng)
        start_step, micro_batches = state.step, state.micro_batches
        result.losses, result.skipped_nonfinite = list(state.losses), state.skipped_nonfinite
        log.info("resumed from %s at step %d", where, start_step)
    raw_optimizer = optimizer  # schedule-free mode switches go to the optimizer itself
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    train_mode(raw_optimizer)
    specs = _as_list(previews)
    base_hash = getattr(model, "base_hash", "")

    def export_adapters(folder: Path) -> dict[str, Path]:
        """Adapter files at this step: eval weights (schedule-free) and, with EMA, the EMA weights."""
        if not isinstance(trainable, LoRANetwork):
            return {}
        with _eval_view(raw_optimizer, params):
            saved = save_trained_adapter(trainable, folder / ADAPTER_FILE, result, cfg, base_hash, adapter_metadata)
        return {p.name: p for p in saved if p is not None}

    def save_checkpoint(rng: dict[str, torch.Tensor], micro: int) -> None:
        if run_dir is None:
            return
        raw = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
        with tempfile.TemporaryDirectory(dir=Path(run_dir)) as staging:
            files = export_adapters(Path(staging))
            state = TrainState(
                step=result.steps_done,
                micro_batches=micro,
                losses=result.losses,
                skipped_nonfinite=result.skipped_nonfinite,
                trainable=raw,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                rng=rng,
                config=cfg.to_dict(),
                ema=None if ema is None else ema.state_dict(),
            )
            folder = save_state(checkpoint_dir(run_dir, result.steps_done), state, files)
        result.checkpoints.append(folder)
        prune_states(run_dir, cfg.keep_last)

    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    batches = data.batches(cfg.batch_size, cfg.seed, start=micro_batches)
    result.steps_done = start_step
    start = time.perf_counter()
    nonfinite_run = 0
    # What a checkpoint written now must hold: the state before the step in progress,
    # or None while the optimizer is updating (a failure there leaves no exact state).
    step_start: tuple[dict, int] | None = (rng_state(noise_rng), micro_batches)
    try:
        for step in range(start_step, cfg.steps):
            step_start = (rng_state(noise_rng), micro_batches)
            step_losses = []
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                micro_batches += 1
                x0 = batch.latents.to(accelerator.device)
                noise = torch.randn(x0.shape, generator=noise_rng).to(accelerator.device)
                n_tokens = (x0.shape[-2] // PATCH) * (x0.shape[-1] // PATCH)
                sigma = sample_sigmas(cfg.timesteps, x0.shape[0], n_tokens, noise_rng).to(accelerator.device)
                s = sigma.view(-1, 1, 1, 1)
                noisy = (1.0 - s) * x0 + s * noise
                with accelerator.accumulate(trainable), accelerator.autocast():
                    pred = model(noisy, sigma, batch.context.to(accelerator.device), batch.context_lens.to(accelerator.device))
                    weights = None if batch.weights is None else batch.weights.to(accelerator.device)
                    loss = flow_loss(pred, noise - x0, weights, cfg.loss, sigma)
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
                    if accelerator.sync_gradients:
                        step_start = None
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_losses.append(loss.item())  # CPU-GPU sync, once per micro-batch

            norm_stats = None
            if cfg.scale_weight_norms > 0:
                norm_stats = trainable.apply_max_norm(cfg.scale_weight_norms)
            if ema is not None:
                with _eval_view(raw_optimizer, params):
                    ema.update(step + 1)
            result.steps_done = step + 1
            mean_loss = sum(step_losses) / len(step_losses) if step_losses else math.nan
            result.losses.append(mean_loss)
            step_start = (rng_state(noise_rng), micro_batches)  # the step is complete

            elapsed = time.perf_counter() - start
            done_here = step + 1 - start_step
            event = ProgressEvent(
                step=step + 1,
                total=cfg.steps,
                loss=mean_loss,
                lr=scheduler.get_last_lr()[0],
                elapsed_s=elapsed,
                eta_s=elapsed / done_here * (cfg.steps - step - 1),
                norm_stats=norm_stats,
            )
            if specs and cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps):
                trainable.eval()
                with _eval_view(raw_optimizer, params), ema.applied(trainable) if ema is not None else contextlib.nullcontext():
                    for spec in specs:
                        event.previews += render_previews(model, spec)
                        event.preview_captions += spec.captions
                trainable.train()
            if on_progress is not None:
                on_progress(event)  # may raise (ComfyUI's interrupt): the except clause saves the step
            stop = should_stop is not None and should_stop()
            if step + 1 == cfg.steps or stop or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save_checkpoint(*step_start)
            if stop:
                result.stopped_early = step + 1 < cfg.steps
                break
    except BaseException:
        # Interrupts (ComfyUI's raise from a progress update) and errors: keep the work done so far.
        written = run_dir is not None and checkpoint_dir(run_dir, result.steps_done) in result.checkpoints
        if step_start is not None and not written:
            log.warning("run ended by an exception at step %d; writing a resumable checkpoint first", result.steps_done)
            save_checkpoint(*step_start)
        raise
    finally:
        trainable.eval()
        result.seconds = time.perf_counter() - start
    if is_schedule_free(raw_optimizer):
        raw_optimizer.eval()  # leave the trainable holding the schedule-free eval weights
    return result
