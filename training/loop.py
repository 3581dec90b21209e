"""The training loop: `train()` reads top to bottom, its steps are named methods of `_Run`.

Trains the parameters of `trainable` (an adapter network, or the model itself for
pretraining) on flow matching: x_t = (1 - sigma) x0 + sigma * noise, target
noise - x0. `accelerate` owns device placement, autocast and gradient accumulation.

Exact resume: the data stream is a pure function of (seed, batches drawn), and a
checkpoint holds the trainable values, optimizer, scheduler, EMA and RNG states, so
N steps + save + resume + M steps equals N + M uninterrupted steps. A resume refuses
settings that differ from the checkpoint's, except steps and lr, which it applies
from the resumed step and records (run_settings.py).

Nothing is lost and nothing non-finite is kept: a checkpoint is written every
`save_every` steps, at the end, on a stop request (Cancel, Ctrl-C, SIGTERM; see
signals.py) and when an exception ends the run; the write cannot be cut short by a
second signal; weights that turn NaN / inf stop the run at once and are never saved,
so the newest checkpoint stays the last finite one.

Several processes (`accelerate launch`, distributed.py): every process draws the same
global batch, noise and sigmas and trains its own rows; the trainable gradients are
summed across processes once per optimizer step; only the main process writes files.

A training adapter (network/training_adapter.py) is merged into the base while steps
run and lifted for previews; the base holds its original weights again when train()
returns or raises.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedType
from PIL import Image

from . import distributed, signals, trackers
from .checkpoint import (
    ADAPTER_FILE,
    TrainState,
    checkpoint_dir,
    ema_twin,
    load_resumable,
    prune_states,
    restore_rng,
    rng_state,
    save_state,
)
from .conditioning import Conditioning
from .config import TrainConfig
from .data.latents import LatentBatch
from .ema import AdapterEMA
from .fused_backward import FusedBackwardOptimizer
from .losses import flow_loss
from .models.block_swap import move_model
from .network.comfy_format import save_adapter
from .network.network import LoRANetwork
from .network.training_adapter import TrainingAdapter
from .noise import training_noise
from .optimizers import eval_weights, is_schedule_free, make_optimizer, train_mode
from .preservation import WithRegularisation, check_class_prompts, dop_loss
from .progress import ProgressCallback, ProgressEvent, StepClock
from .run_settings import FREE, resume_changes, run_settings
from .sampler import check_sampling_fits, sample_euler
from .schedules import make_scheduler, resolve_warmup
from .storage import OUTPUT_FIX, NonFiniteError, finite_or_raise, staging_dir
from .timesteps import TimestepPool, sample_sigmas
from .validation import due, fixed_examples, holdout_split, validation_loss, write_series

log = logging.getLogger(__name__)
RESUME_HISTORY_KEY = "dit_trainer_resume_history"  # adapter metadata: settings changed on resume


class TrainingData(Protocol):
    def __len__(self) -> int: ...

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[LatentBatch]: ...


@dataclass
class PreviewSpec:
    """Fixed prompts and seed, so successive previews are comparable."""

    cond: Conditioning  # P rows: text states, guidance, reference latents
    latent_shape: tuple[int, int, int]  # (C, H, W)
    decode: Callable[[torch.Tensor], list[Image.Image]]  # latents -> images
    neg_cond: Conditioning | None = None  # P rows (or one, repeated)
    steps: int = 20
    cfg: float = 1.0
    shift: float = 3.0
    seed: int = 0
    captions: list[str] = field(default_factory=list)  # one per prompt, shown beside the images
    label: str = ""  # names the preview in errors, e.g. "preview 'a cat' at 1024x1024"


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step, resumed runs included
    steps_done: int = 0
    skipped_nonfinite: int = 0
    stopped_early: bool = False
    stop_reason: str | None = None  # what stopped it early: "Ctrl-C", "SIGTERM", or the caller's stop request
    seconds: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)  # written by this call, oldest first
    ema: AdapterEMA | None = None  # `with result.ema.applied(trainable):` to export the EMA weights
    resume_history: list[dict] = field(default_factory=list)  # settings changed on each resume
    validation: list[dict] = field(default_factory=list)  # {"step", "loss", "by_sigma"} per evaluation (validation.py)

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None


def image_tokens(model: nn.Module, latent_hw: tuple[int, int]) -> int:
    """Image tokens the model makes of a latent: cells / patch_size² (a module without a config: one per cell)."""
    patch = getattr(getattr(model, "cfg", None), "patch_size", 1)
    return (latent_hw[0] // patch) * (latent_hw[1] // patch)


def render_previews(model: nn.Module, spec: PreviewSpec) -> list[Image.Image]:
    device = next(model.parameters()).device
    noise = torch.randn((spec.cond.batch, *spec.latent_shape), generator=torch.Generator().manual_seed(spec.seed))
    negative = None if spec.neg_cond is None else spec.neg_cond.expand(spec.cond.batch).to(device)
    latents = sample_euler(model, noise.to(device), spec.cond.to(device), negative,
                           steps=spec.steps, cfg=spec.cfg, shift=spec.shift)
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

    The metadata records the steps done, the train options and any settings a resume
    changed. Returns both paths (the second None without EMA).
    """
    meta = {"ss_steps": str(result.steps_done), "dit_trainer_train": cfg.to_dict(), **(extra_metadata or {})}
    if result.resume_history:
        meta[RESUME_HISTORY_KEY] = result.resume_history
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


def _check_resumable(saved: dict, cfg: TrainConfig, where: Path, saved_processes: int, processes: int) -> None:
    """Options that change the data stream or the update rule must match the checkpoint's.

    The batch that counts is the global one (per-process batch x processes, distributed.py).
    """
    saved_global, global_batch = saved.get("batch_size", 0) * saved_processes, cfg.batch_size * processes
    if saved_global != global_batch:
        raise ValueError(
            f"cannot resume from {where}: it was trained with a global batch of {saved_global} (batch_size "
            f"{saved.get('batch_size')!r} x {saved_processes} process(es)) but this run has {global_batch} "
            f"(batch_size {cfg.batch_size} x {processes}); set batch_size so that batch_size x processes = "
            f"{saved_global} to continue it, or start a new run"
        )
    for name in ("seed", "grad_accum", "optimizer"):
        if saved.get(name) != getattr(cfg, name):
            raise ValueError(
                f"cannot resume from {where}: it was trained with {name}={saved.get(name)!r} but this run has "
                f"{name}={getattr(cfg, name)!r}; set {name}={saved.get(name)!r} to continue it, or start a new run"
            )


def resume_check(state: TrainState, settings: dict, cfg: TrainConfig, where: Path,
                 processes: int = 1) -> dict[str, tuple]:
    """The settings a resume from `state` on `processes` processes changes (steps / lr); raises for any other difference."""
    _check_resumable(state.config, cfg, where, state.extra.get("processes", 1), processes)
    if "settings" in state.extra:
        return resume_changes(state.extra["settings"], settings, where, state.step)
    # Checkpoints from before settings were recorded: their train options are all there is.
    saved = {"train": {k: v for k, v in state.config.items() if k not in FREE["train"]}}
    return resume_changes(saved, {"train": settings["train"]}, where, state.step)


def _all_finite(params: list[torch.Tensor]) -> bool:
    """One fused norm per tensor and a single sync: NaN / inf anywhere makes a norm non-finite."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all())


def _scale_lrs(optimizer: torch.optim.Optimizer, scheduler, ratio: float) -> None:
    """Multiply every group's lr (LoRA+ ratios kept) and the schedule's base lrs by `ratio`."""
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]


def _schedule_now(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Set each group's lr to what the (changed) schedule gives at its current step."""
    for group, base, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class _Run:
    """The state of one `train()` call; its methods are the loop's steps, in the order they run."""

    def __init__(self, model, trainable, data, cfg, on_progress, previews, should_stop, run_dir, resume_from,
                 adapter_metadata, settings, training_adapter, validation_data=None, regularisation_data=None):
        self.model, self.trainable, self.data, self.cfg = model, trainable, data, cfg
        self.validation_data, self.regularisation_data = validation_data, regularisation_data
        self.on_progress, self.specs, self.should_stop = on_progress, _as_list(previews), should_stop
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.resume_from, self.adapter_metadata = resume_from, adapter_metadata
        self.base_hash = getattr(model, "base_hash", "")
        self.procs = distributed.processes()
        network = getattr(getattr(trainable, "cfg", None), "to_dict", None)
        self.settings = settings or run_settings(cfg.to_dict(), network() if network else None, self.base_hash, "",
                                                 processes=self.procs.count)
        self.training_adapter: TrainingAdapter | None = training_adapter
        if training_adapter is not None:  # a resume with another training adapter is refused
            self.settings = training_adapter.recorded_in(self.settings)

    # --- setting up -------------------------------------------------------------------

    def set_up(self) -> None:
        cfg = self.cfg
        trackers.check_installed(cfg.tracking)
        # accelerate keeps its mixed precision process-wide and refuses another one later; a host that
        # trains several times (ComfyUI) needs each run's own. PartialState (the launched processes) stays.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            # The schedule counts optimizer steps: without split_batches a prepared scheduler steps once per process.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            log_with=cfg.tracking.log_with or None,
            project_dir=None if self.run_dir is None else self.run_dir / trackers.LOG_FOLDER,
        )
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("launch with a multi-GPU accelerate config (accelerate/one_node.yaml), not an FSDP one, "
                             "and set [train] fsdp = true: the trainer shards the frozen base itself (distributed.py)")
        torch.manual_seed(cfg.seed)
        self.noise_rng = torch.Generator().manual_seed(cfg.seed + 1)  # sigmas and noise
        self.place_base()
        self.trainable.to(self.accelerator.device)  # adapters live outside the model's module tree
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.trainable.train()
        if self.training_adapter is not None:
            self.training_adapter.check_trainable(self.trainable)
        if cfg.scale_weight_norms > 0 and not hasattr(self.trainable, "apply_max_norm"):
            raise ValueError("scale_weight_norms needs an adapter network to rescale; set it to 0 to train this module")
        if cfg.scale_weight_norms > 0 and getattr(getattr(self.trainable, "cfg", None), "init", "") == "pissa":
            raise ValueError("scale_weight_norms cannot rescale a PiSSA adapter (its base holds the residual); "
                             "set scale_weight_norms to 0 or use init kaiming / orthogonal")
        groups = _param_groups(self.trainable, cfg.lr)
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError("nothing to train: the trainable module has no parameters with requires_grad")
        if cfg.fused_backward_pass and self.procs.several:
            raise ValueError("fused_backward_pass steps each parameter inside backward, before the processes' "
                             "gradients are summed; turn it off when launching several processes")
        # Fused backward: the parameters step in their grad hooks, so the loop's step / zero_grad do nothing.
        build = FusedBackwardOptimizer if cfg.fused_backward_pass else make_optimizer
        self.optimizer = build(cfg.optimizer, groups, cfg.lr, cfg.weight_decay, cfg.betas, cfg.optimizer_kwargs,
                               allow_negative_lr=cfg.allow_negative_lr)
        warmup = resolve_warmup(cfg.steps, cfg.warmup_steps, cfg.warmup_ratio)
        self.scheduler = make_scheduler(self.optimizer, cfg.steps, cfg.schedule, warmup, cfg.min_lr_ratio, cfg.power)
        self.ema = (AdapterEMA(self.trainable, cfg.ema_decay, cfg.ema_start_step, cfg.ema_update_every)
                    if cfg.ema_decay else None)
        self.result = TrainResult(ema=self.ema)
        self.start_step, self.micro_batches = 0, 0
        self.grad_norm: float | None = None  # of the last optimizer step, before clipping (when clipping is on)
        self.set_up_data()
        # The pool stratifies the global batch stream, so it does not depend on the process count.
        self.timestep_pool = (TimestepPool(cfg.timesteps.num_buckets, cfg.seed, cfg.batch_size * self.procs.count,
                                           len(self.data)) if cfg.timesteps.num_buckets > 1 else None)
        if cfg.sample_every:  # a preview that cannot fit fails now, not hours into the run
            for spec in self.specs:
                check_sampling_fits(self.model, (spec.cond.batch, *spec.latent_shape), spec.cond, spec.neg_cond,
                                    spec.cfg, self.accelerator.device, spec.label)

    def set_up_data(self) -> None:
        """Held-out examples (validation.py): a seeded split of the training data, or a separate dataset;
        then the regularisation images alternate with what is left (preservation.py)."""
        cfg, held_out = self.cfg, self.validation_data
        if cfg.validation_split > 0:
            if held_out is not None:
                raise ValueError("got both validation_split and a validation dataset; use one of them")
            self.data, held_out = holdout_split(self.data, cfg.validation_split, cfg.seed)
            log.info("validation_split %g: %d image(s) held out of training", cfg.validation_split,
                     held_out.item_count())
        if held_out is not None and cfg.validation.every == 0:
            raise ValueError("held-out validation data is given but validation every is 0; set validation every "
                             "(TrainLoRA validate_every, [train.validation] every) to the steps between evaluations")
        self.validation_examples = [] if held_out is None else fixed_examples(held_out, cfg.validation.max_examples)
        if self.regularisation_data is not None:
            self.data = WithRegularisation(self.data, self.regularisation_data, cfg.preservation.reg_weight)

    def place_base(self) -> None:
        """The frozen base on this process's device, or sharded across the processes (train option fsdp)."""
        self.sharded = self.cfg.fsdp and self.procs.several
        if self.cfg.fsdp and not self.sharded:
            log.info("fsdp is on but this run has one process: it holds the whole base (launch several to shard it)")
        if not self.sharded:
            move_model(self.model, self.accelerator.device)  # block swap keeps its swapped blocks in host memory
            return
        if getattr(self.model, "block_swap", None) is not None:
            raise ValueError("train option fsdp shards the base across processes; block swap (blocks_to_swap) keeps "
                             "blocks in host memory instead: use one of them (set blocks_to_swap to 0 with fsdp)")
        if self.training_adapter is not None:
            raise ValueError("train option fsdp cannot merge a training adapter into a sharded base; "
                             "turn fsdp off or train without the training adapter")
        distributed.shard_frozen_base(self.model, self.procs, self.accelerator.device)  # moves it block by block

    def restore(self) -> None:
        """Continue from `resume_from`: every state of the checkpoint, after checking its settings."""
        where, state = load_resumable(self.resume_from)
        changes = resume_check(state, self.settings, self.cfg, where, self.procs.count)
        with torch.no_grad():
            try:
                missing, unexpected = self.trainable.load_state_dict(state.trainable, strict=False)
            except RuntimeError as error:  # shapes differ
                missing, unexpected = [str(error).splitlines()[-1].strip()], []
        if missing or unexpected:
            raise ValueError(
                f"cannot resume from {where}: the network differs from the checkpoint's "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]}); build it with the same options"
            )
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if "train.lr" in changes:
            old, new = changes["train.lr"]
            _scale_lrs(self.optimizer, self.scheduler, new / old)
        if changes:
            _schedule_now(self.optimizer, self.scheduler)
            listed = ", ".join(f"{k.removeprefix('train.')} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            log.warning("resuming %s at step %d with changed settings: %s (applied from step %d on, recorded in "
                        "the adapter's metadata)", where, state.step, listed, state.step)
        if self.ema is not None and state.ema is not None:
            self.ema.load_state_dict(state.ema)
        restore_rng(state.rng, self.noise_rng)
        self.start_step, self.micro_batches = state.step, state.micro_batches
        self.result.losses, self.result.skipped_nonfinite = list(state.losses), state.skipped_nonfinite
        self.result.resume_history = list(state.extra.get("resume_history", []))
        self.result.validation = list(state.extra.get("validation", []))
        if self.run_dir is not None and self.validation_examples:  # drop evaluations past the checkpoint
            write_series(self.run_dir, self.result.validation)
        if changes:
            self.result.resume_history.append(
                {"step": state.step, "changed": {k: [old, new] for k, (old, new) in changes.items()}})
        log.info("resumed from %s at step %d", where, self.start_step)

    def prepare(self) -> None:
        self.raw_optimizer = self.optimizer  # schedule-free mode switches go to the optimizer itself
        self.optimizer, self.scheduler = self.accelerator.prepare(self.optimizer, self.scheduler)
        train_mode(self.raw_optimizer)
        trackers.start_trackers(self.accelerator, self.cfg.tracking, self.run_dir, self.cfg.to_dict())

    def training_adapter_merged(self) -> contextlib.AbstractContextManager:
        """The training adapter merged into the base inside (nothing without one); restored on any exit."""
        return contextlib.nullcontext() if self.training_adapter is None else self.training_adapter.merged()

    def training_adapter_lifted(self) -> contextlib.AbstractContextManager:
        """The plain base inside: previews show what the trained adapter does on the base it is for."""
        return contextlib.nullcontext() if self.training_adapter is None else self.training_adapter.lifted()

    # --- checkpoints --------------------------------------------------------------------

    def export_adapters(self, folder: Path) -> dict[str, Path]:
        """Adapter files at this step: eval weights (schedule-free) and, with EMA, the EMA weights."""
        if not isinstance(self.trainable, LoRANetwork):
            return {}
        with _eval_view(self.raw_optimizer, self.params):
            saved = save_trained_adapter(self.trainable, folder / ADAPTER_FILE, self.result, self.cfg,
                                         self.base_hash, self.adapter_metadata)
        return {p.name: p for p in saved if p is not None}

    def save_checkpoint(self, rng: dict[str, torch.Tensor], micro: int) -> None:
        """Write a resumable checkpoint of the current weights (never non-finite ones); no signal can cut it short.

        The main process writes it; every process holds the same values (distributed.py).
        """
        if self.run_dir is None or not self.procs.is_main:
            return
        step = self.result.steps_done
        raw = {k: v.detach().clone() for k, v in self.trainable.state_dict().items()}
        try:
            finite_or_raise(raw, f"the adapter at step {step}")
        except NonFiniteError as error:
            kept = self.result.last_checkpoint or "none yet in this call"
            log.error("not saving a checkpoint: %s; the newest finite checkpoint stays (%s)", error, kept)
            return
        with signals.protected():
            staging = staging_dir(self.run_dir, ".staging.", OUTPUT_FIX)
            try:
                files = self.export_adapters(staging)
                state = TrainState(
                    step=step,
                    micro_batches=micro,
                    losses=self.result.losses,
                    skipped_nonfinite=self.result.skipped_nonfinite,
                    trainable=raw,
                    optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(),
                    rng=rng,
                    config=self.cfg.to_dict(),
                    ema=None if self.ema is None else self.ema.state_dict(),
                    extra={"settings": self.settings, "resume_history": self.result.resume_history,
                           "validation": self.result.validation, "processes": self.procs.count},
                )
                folder = save_state(checkpoint_dir(self.run_dir, step), state, files)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # empty unless the write failed
            self.result.checkpoints.append(folder)
            prune_states(self.run_dir, self.cfg.keep_last)
        log.info("saved resumable checkpoint of step %d: %s", step, folder)

    # --- one step ---------------------------------------------------------------------

    def micro_step(self, batches: Iterator[LatentBatch], step: int, step_losses: list[float]) -> None:
        """One micro-batch: forward, loss, backward, and on the last of `grad_accum` the optimizer step.

        The batch, noise and sigmas are the global batch's; this process trains its rows, and its
        loss is its share of the global loss, whose sum over processes is what is shown.
        """
        cfg, accelerator, procs = self.cfg, self.accelerator, self.procs
        batch = next(batches)
        self.micro_batches += 1
        shape = batch.latents.shape
        noise = training_noise(shape, cfg.noise, self.noise_rng)
        n_tokens = image_tokens(self.model, shape[-2:])  # resolution-dependent shifts count these
        pool = self.timestep_pool  # stratified draws per epoch (timesteps.py) or None
        pooled = None if pool is None else pool.uniforms(self.micro_batches - 1, shape[0])
        sigma = sample_sigmas(cfg.timesteps, shape[0], n_tokens, self.noise_rng, pooled)
        rows = distributed.local_rows(shape[0], procs)
        share = distributed.loss_share(batch, rows)
        if procs.several:
            batch, noise, sigma = distributed.local_batch(batch, rows), noise[rows], sigma[rows]
        x0, noise, sigma = (t.to(accelerator.device) for t in (batch.latents, noise, sigma))
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        cond = batch.cond.with_guidance(cfg.guidance).to(accelerator.device)
        with accelerator.accumulate(self.trainable), accelerator.autocast():
            if len(rows):
                pred = self.model(noisy, sigma, **cond.model_inputs(self.model))
                weights = None if batch.weights is None else batch.weights.to(accelerator.device)
                loss = flow_loss(pred, noise - x0, weights, cfg.loss, sigma) * batch.loss_scale * share
                if cfg.preservation.dop_weight > 0 and not batch.regularisation:
                    class_cond = check_class_prompts(batch).with_guidance(cfg.guidance).to(accelerator.device)
                    loss = loss + cfg.preservation.dop_weight * share * dop_loss(self.model, self.trainable, noisy,
                                                                                 sigma, class_cond)
            else:  # a short global batch left no rows here: this process adds nothing
                loss = torch.zeros((), device=accelerator.device)
            global_loss = distributed.sum_over(loss.detach(), procs)
            if not torch.isfinite(global_loss):  # the same decision on every process
                # A NaN / inf batch must not reach the weights; skip it and stop if it persists.
                self.result.skipped_nonfinite += 1
                self.nonfinite_run += 1
                if self.nonfinite_run >= cfg.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{self.nonfinite_run} consecutive non-finite losses at step {step}; lower the lr, "
                        "enable max_grad_norm, or train in fp32 (mixed_precision='no')"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                return
            self.nonfinite_run = 0
            if len(rows):
                accelerator.backward(loss)
            if accelerator.sync_gradients:
                self.step_start = None  # from here until the step is complete no exact state exists
                distributed.sum_gradients(self.params, procs)
                if cfg.max_grad_norm > 0:
                    self.grad_norm = float(accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients and not _all_finite(self.params):
                raise NonFiniteError(
                    f"the adapter weights became NaN or infinite in the update of step {step + 1} (its loss was "
                    f"{global_loss.item():.4g}): the update diverged; lower the lr (now {self.scheduler.get_last_lr()[0]:.3g}), "
                    "keep max_grad_norm on, or use a lower loraplus_lr_ratio. Nothing non-finite was saved"
                )
        step_losses.append(global_loss.item())  # CPU-GPU sync, once per micro-batch

    def after_step(self, step: int, step_losses: list[float]) -> ProgressEvent:
        cfg = self.cfg
        norm_stats = self.trainable.apply_max_norm(cfg.scale_weight_norms) if cfg.scale_weight_norms > 0 else None
        if self.ema is not None:
            with _eval_view(self.raw_optimizer, self.params):
                self.ema.update(step + 1)
        self.result.steps_done = step + 1
        mean_loss = sum(step_losses) / len(step_losses) if step_losses else math.nan
        self.result.losses.append(mean_loss)
        self.step_start = (rng_state(self.noise_rng), self.micro_batches)  # the step is complete
        self.clock.step_done()
        event = ProgressEvent(
            step=step + 1,
            total=cfg.steps,
            loss=mean_loss,
            lr=self.scheduler.get_last_lr()[0],
            elapsed_s=self.clock.elapsed,
            eta_s=self.clock.eta(cfg.steps - step - 1),
            norm_stats=norm_stats,
        )
        self.validate(step + 1)
        event.validation = self.unreported_validation(step + 1)
        sample_due = cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps)
        # Previews are for the main process, which shows and writes them; a sharded base needs every process.
        if self.specs and sample_due and (self.procs.is_main or self.sharded):
            self.trainable.eval()
            ema_weights = self.ema.applied(self.trainable) if self.ema is not None else contextlib.nullcontext()
            # Previews compute as the training steps do (autocast): a bf16 / fp8 base needs it.
            with _eval_view(self.raw_optimizer, self.params), ema_weights, self.training_adapter_lifted(), \
                    self.accelerator.autocast():
                for spec in self.specs:
                    event.previews += render_previews(self.model, spec)
                    event.preview_captions += spec.captions
            self.trainable.train()
        trackers.log_step(self.accelerator, event, self.grad_norm, self.result.skipped_nonfinite)
        return event

    def validate(self, step: int) -> None:
        """Evaluate the validation loss after `step` steps when due; kept in the result and the run folder."""
        vcfg = self.cfg.validation
        # The main process shows and writes it; a sharded base needs every process for the forward.
        if self.validation_examples and due(vcfg, step, self.cfg.steps) and (self.procs.is_main or self.sharded):
            self.trainable.eval()
            ema_weights = self.ema.applied(self.trainable) if self.ema is not None and vcfg.use_ema \
                else contextlib.nullcontext()
            # fork_rng: whatever the model draws from the global generator stays out of the training run. A
            # training adapter stays merged, as for the training loss the validation loss is compared with.
            with _eval_view(self.raw_optimizer, self.params), ema_weights, torch.random.fork_rng(devices=[]):
                record = validation_loss(self.model, self.validation_examples, vcfg.sigmas, vcfg.seed,
                                         self.accelerator.device, self.cfg.guidance, self.accelerator.autocast)
            self.trainable.train()
            self.result.validation.append({"step": step, **record})
            if self.run_dir is not None and self.procs.is_main:
                write_series(self.run_dir, self.result.validation)
            log.info("validation loss at step %d: %.6g", step, record["loss"])

    def unreported_validation(self, step: int) -> list[tuple[int, float]]:
        """The (step, loss) points no progress event carried yet (the first one also carries step 0's)."""
        points = [(r["step"], r["loss"]) for r in self.result.validation if r["step"] > self.reported_validation]
        self.reported_validation = step
        return points

    def stop_reason(self) -> str | None:
        """Why to stop after this step, agreed by every process (one stopping alone would leave the others waiting)."""
        reason = "stop requested" if self.should_stop is not None and self.should_stop() else signals.stop_requested()
        return distributed.first_reason(reason, self.procs, self.accelerator.device)

    # --- the loop -------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, result = self.cfg, self.result
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # The global batch stream, the same on every process; each trains its rows of it.
        batches = self.data.batches(cfg.batch_size * self.procs.count, cfg.seed, start=self.micro_batches)
        result.steps_done = self.start_step
        self.clock = StepClock()
        self.nonfinite_run = 0
        self.reported_validation = self.start_step if self.start_step else -1  # the baseline goes out first
        if self.start_step == 0:
            self.validate(0)
        # What a checkpoint written now must hold: the state before the step in progress,
        # or None while the optimizer is updating (a failure there leaves no exact state).
        self.step_start: tuple[dict, int] | None = (rng_state(self.noise_rng), self.micro_batches)
        try:
            for step in range(self.start_step, cfg.steps):
                self.step_start = (rng_state(self.noise_rng), self.micro_batches)
                step_losses: list[float] = []
                for _ in range(cfg.grad_accum):
                    self.micro_step(batches, step, step_losses)
                event = self.after_step(step, step_losses)
                if self.on_progress is not None and self.procs.is_main:
                    self.on_progress(event)  # may raise (ComfyUI's interrupt): the except clause saves the step
                stop = self.stop_reason()
                if step + 1 == cfg.steps or stop or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                    distributed.check_in_step(self.params, self.procs, step + 1)
                    self.save_checkpoint(*self.step_start)
                if stop:
                    result.stopped_early, result.stop_reason = step + 1 < cfg.steps, stop
                    break
        except BaseException as error:
            # Interrupts (ComfyUI's raise from a progress update, Ctrl-C) and errors: keep the work done so far.
            written = self.run_dir is not None and checkpoint_dir(self.run_dir, result.steps_done) in result.checkpoints
            if self.step_start is not None and not written and self.run_dir is not None:
                log.warning("run ended by %s at step %d; writing a resumable checkpoint first",
                            type(error).__name__, result.steps_done)
                self.save_checkpoint(*self.step_start)
            raise
        finally:
            self.trainable.eval()
            result.seconds = self.clock.elapsed
            if cfg.fused_backward_pass:
                self.raw_optimizer.remove_hooks()
            trackers.finish(self.accelerator)
        if is_schedule_free(self.raw_optimizer):
            self.raw_optimizer.eval()  # leave the trainable holding the schedule-free eval weights
        return result


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
    settings: dict | None = None,
    training_adapter: TrainingAdapter | None = None,
    validation_data: TrainingData | None = None,
    regularisation_data: TrainingData | None = None,
) -> TrainResult:
    """Run optimizer steps up to `cfg.steps`.

    `should_stop` is polled after every step, and so are stop requests (signals.py). With
    `run_dir`, resumable checkpoints are written every `cfg.save_every` steps, at the end,
    on a stop and when an exception (an interrupt raised by a progress callback, say)
    ends the run. `resume_from` (a run folder or one checkpoint folder) continues a run
    exactly. `settings` (run_settings.run_settings) is what a resume is checked against;
    without it the train and network options are; a `training_adapter` is added to them.
    It is merged into the base for the training steps only (previews and the trainable's
    files never see it). On return the trainable holds its final weights (schedule-free:
    the eval weights). `validation_data` holds examples out for the validation loss
    (validation.py; or cfg.validation_split splits them off `data`). `regularisation_data`
    (class images) alternates with the training batches, its loss scaled by
    cfg.preservation.reg_weight (preservation.py).
    """
    run = _Run(model, trainable, data, cfg, on_progress, previews, should_stop, run_dir, resume_from,
               adapter_metadata, settings, training_adapter, validation_data, regularisation_data)
    with signals.active_run():
        run.set_up()
        if resume_from is not None:
            run.restore()
        run.prepare()
        with run.training_adapter_merged():
            return run.run()
