"""Keeping the base model's behaviour: differential output preservation and regularisation images.

Differential output preservation (DOP, ai-toolkit's `diff_output_preservation`): every training
batch is also run on its *class prompts*, the captions with the trigger word replaced by a class
word ("ohwx man" -> "man", data option `class_word`). The base's prediction there, with the
adapter disabled and no gradient, is the target; the adapter's prediction on the same noisy
latents and sigmas is pulled to it:

    loss = flow loss + dop_weight * mean((pred_adapter(class) - pred_base(class))^2)

so the adapter learns the trigger without changing what the class word means. The class prompts
are encoded with the captions and go through the same text cache, so DOP works with cached
embeddings (no text encoder at train time for fixed captions). An adapter that changes nothing
gives exactly zero DOP loss.

Regularisation images (kohya sd-scripts' DreamBooth `reg_data_dir` with `prior_loss_weight`):
a second dataset of class images whose batches alternate with the training batches, their loss
scaled by `reg_weight`. kohya mixes reg and training images inside one batch; alternating whole
batches keeps each batch in one bucket of one dataset and, with grad_accum 2, gives every
optimizer step one of each. Batch k of the mixed stream is a pure function of k, so resume is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from .conditioning import Conditioning
from .data.latents import LatentBatch
from .losses import flow_loss


@dataclass
class PreservationConfig:
    dop_weight: float = 0.0  # ai-toolkit diff_output_preservation_multiplier (0: off; 1.0 typical)
    reg_weight: float = 1.0  # kohya prior_loss_weight: loss scale of regularisation-image batches

    def __post_init__(self) -> None:
        for name in ("dop_weight", "reg_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"preservation {name} must not be negative, got {getattr(self, name)}")


@contextlib.contextmanager
def adapter_disabled(trainable: nn.Module) -> Iterator[None]:
    """The base alone inside (every adapter skipped); the adapter is enabled again on any exit."""
    trainable.set_enabled(False)
    try:
        yield
    finally:
        trainable.set_enabled(True)


def dop_loss(model: nn.Module, trainable: nn.Module, noisy: torch.Tensor, sigma: torch.Tensor,
             class_cond: Conditioning) -> torch.Tensor:
    """mean((pred_adapter - pred_base)^2) on the class prompts, the base's side without gradient."""
    if not hasattr(trainable, "set_enabled"):
        raise ValueError("dop_weight needs an adapter network that can be disabled; set dop_weight to 0")
    inputs = class_cond.model_inputs(model)
    with torch.no_grad(), adapter_disabled(trainable):
        base = model(noisy, sigma, **inputs)
    return flow_loss(model(noisy, sigma, **inputs), base)


def check_class_prompts(batch: LatentBatch) -> Conditioning:
    if batch.class_cond is None:
        raise ValueError("dop_weight > 0 needs class prompts: set the dataset's trigger_word and class_word "
                         "(DatasetFromFolder, [data] table), e.g. trigger_word 'ohwx', class_word 'man'")
    return batch.class_cond


class WithRegularisation:
    """Training batches and regularisation batches, alternating (training first); reg batches carry
    `loss_scale = reg_weight` and are marked, so DOP (which needs a trigger word) skips them."""

    def __init__(self, data, regularisation, reg_weight: float) -> None:
        self.data, self.regularisation, self.reg_weight = data, regularisation, reg_weight

    def __len__(self) -> int:
        return 2 * len(self.data)

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[LatentBatch]:
        # The two streams get different seeds, so a reg set that is a copy of the data is not read in step.
        own = self.data.batches(batch_size, seed, start=(start + 1) // 2)
        reg = self.regularisation.batches(batch_size, seed + 1, start=start // 2)
        index = start
        while True:
            if index % 2 == 0:
                yield next(own)
            else:
                yield dataclasses.replace(next(reg), loss_scale=self.reg_weight, regularisation=True)
            index += 1
