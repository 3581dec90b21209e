"""Validation loss: the flow-matching loss on held-out examples, made deterministic.

The training loss is noisy (random sigmas, random noise, a different batch each step), so it
cannot show overfitting. The validation loss fixes everything but the weights, as
ai-toolkit's and sd-scripts' validation do (sd-scripts `--validation_split`, musubi-tuner
`validate_timesteps`): each held-out example is evaluated at the same sigmas (default
1.0, 0.75, 0.5, 0.25, the fixed timesteps musubi-tuner and ai-toolkit validate at) with
the same noise (a generator seeded by (validation seed, example index)), in eval mode
(no dropout), with the eval weights of a schedule-free optimizer and, when EMA is on,
the EMA weights. The number is a plain L2 (mask-weighted when the data has weights),
whatever training loss is chosen, so runs with other losses compare too. Nothing here
draws from the training generators, so validating never changes the training run.

Held-out examples come from `validation_split` (a fraction of the training images, picked
by the seed: `holdout_split`) or from a separate dataset (the TrainLoRA `validation` input,
the CLI's `[train.validation] folder`).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from .data.latents import LatentBatch
from .data.order import seeded_generator
from .losses import flow_loss
from .storage import OUTPUT_FIX, atomic_write

VALIDATION_FILE = "validation.jsonl"  # in the run folder: one JSON record per evaluation
SPLIT_PURPOSE = "validation_split"


@dataclass
class ValidationConfig:
    every: int = 0  # validate every N optimizer steps and at the end (0: never)
    sigmas: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])  # musubi / ai-toolkit style
    seed: int = 0  # seeds the fixed noise: the same for every run, so runs compare
    use_ema: bool = True  # validate the EMA weights when EMA is on
    at_start: bool = True  # also before the first step: where the curve starts
    max_examples: int = 64  # held-out examples evaluated (the first ones of the seeded order)
    folder: str = ""  # CLI: a separate folder of held-out images (same [data] options); "" = none

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"validation every must not be negative (0 turns validation off), got {self.every}")
        if not self.sigmas or not all(0.0 < s <= 1.0 for s in self.sigmas):
            raise ValueError(f"validation sigmas must be a non-empty list of values in (0, 1], got {self.sigmas}")
        if self.max_examples < 1:
            raise ValueError(f"validation max_examples must be at least 1, got {self.max_examples}")


class Splittable(Protocol):
    def __len__(self) -> int: ...

    def item_count(self) -> int: ...

    def subset(self, indices: list[int]): ...


def holdout_split(data: Splittable, fraction: float, seed: int) -> tuple[Splittable, Splittable]:
    """(training part, held-out part): round(fraction * images) images picked by `seed`, at least one each."""
    n = data.item_count()
    if n < 2:
        raise ValueError(f"validation_split {fraction} needs at least 2 images to hold one out; the dataset has {n}")
    held = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=seeded_generator(seed, SPLIT_PURPOSE, 0)).tolist()
    return data.subset(sorted(order[held:])), data.subset(sorted(order[:held]))


def fixed_examples(data, max_examples: int) -> list[LatentBatch]:
    """One-row batches of the held-out data (a `TrainingData`), the same on every call and run: the data's own
    stream at a fixed seed, so its order and any caption processing are fixed too."""
    stream = data.batches(1, seed=0)
    return [next(stream) for _ in range(min(len(data), max_examples))]


@torch.no_grad()
def validation_loss(
    model: nn.Module, examples: list[LatentBatch], sigmas: list[float], seed: int, device: torch.device,
    guidance: float | None, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict:
    """{"loss": mean over examples and sigmas, "by_sigma": {sigma: mean over examples}}."""
    per_sigma = torch.zeros(len(sigmas), dtype=torch.float64)
    sigma = torch.tensor(sigmas, dtype=torch.float32, device=device)
    s = sigma.view(-1, 1, 1, 1)
    for index, example in enumerate(examples):
        x0 = example.latents.to(device).expand(len(sigmas), *example.latents.shape[1:])
        noise = torch.randn(x0.shape, generator=seeded_generator(seed, "validation_noise", index)).to(device)
        cond = example.cond.expand(len(sigmas)).with_guidance(guidance).to(device)
        weights = None if example.weights is None else example.weights.to(device)
        with autocast():
            pred = model((1.0 - s) * x0 + s * noise, sigma, **cond.model_inputs(model))
        for k in range(len(sigmas)):
            per_sigma[k] += float(flow_loss(pred[k : k + 1], (noise - x0)[k : k + 1], weights))
    per_sigma /= max(1, len(examples))
    return {"loss": float(per_sigma.mean()), "by_sigma": {f"{v:g}": float(l) for v, l in zip(sigmas, per_sigma)}}


def due(cfg: ValidationConfig, step: int, total: int) -> bool:
    """Validate after optimizer step `step` (1-based); step 0 is the baseline before training."""
    if cfg.every == 0:
        return False
    if step == 0:
        return cfg.at_start
    return step % cfg.every == 0 or step == total


def write_series(run_dir: Path, series: list[dict]) -> Path:
    """Rewrite the run folder's validation.jsonl with the whole series (atomic; a resume's series replaces
    entries of steps the run went past before it was interrupted)."""
    text = "".join(json.dumps(record) + "\n" for record in series)
    return atomic_write(run_dir / VALIDATION_FILE, lambda temp: temp.write_text(text, encoding="utf-8"), OUTPUT_FIX)


def as_points(series: list[dict]) -> list[tuple[int, float]]:
    """[(step, loss)] of the finite records, for charts."""
    return [(int(r["step"]), float(r["loss"])) for r in series if math.isfinite(r["loss"])]
