"""Pre-encoded training examples held in memory and served as shuffled batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..conditioning import Conditioning
from .order import seeded_generator


@dataclass
class LatentBatch:
    latents: torch.Tensor  # (B, C, H, W) clean latents x0
    cond: Conditioning  # text states (+ pooled, reference latents) of each row
    weights: torch.Tensor | None = None  # (B, 1, H, W) per-pixel loss weights
    class_cond: Conditioning | None = None  # the captions with the trigger replaced by the class word (DOP)
    loss_scale: float = 1.0  # regularisation-image batches: prior_loss_weight (preservation.py)
    regularisation: bool = False  # a batch of regularisation images (no trigger, so no DOP)


@dataclass
class LatentDataset:
    """Examples with one latent size (one bucket); captions zero-padded to one length."""

    latents: torch.Tensor
    cond: Conditioning
    weights: torch.Tensor | None = None
    class_cond: Conditioning | None = None  # class prompts per example (DOP)

    def __post_init__(self):
        n = self.latents.shape[0]
        if n == 0:
            raise ValueError("the dataset is empty: no image could be encoded")
        for name, rows in (("conditioning", self.cond.batch), ("weights", None if self.weights is None else
                                                                    self.weights.shape[0])):
            if rows is not None and rows != n:
                raise ValueError(f"dataset {name} has {rows} rows but there are {n} latents")
        if self.weights is not None and self.weights.shape[-2:] != self.latents.shape[-2:]:
            raise ValueError(
                f"loss-weight mask size {tuple(self.weights.shape[-2:])} does not match the latent size "
                f"{tuple(self.latents.shape[-2:])}; resize masks to the latent resolution"
            )

    def __len__(self) -> int:
        return self.latents.shape[0]

    def item_count(self) -> int:
        return len(self)

    def subset(self, indices: list[int]) -> "LatentDataset":
        """The examples at `indices` (a validation split holds some out)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return LatentDataset(self.latents[index], self.cond.rows(index),
                             None if self.weights is None else self.weights[index],
                             None if self.class_cond is None else self.class_cond.rows(index))

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[LatentBatch]:
        """Endless shuffled batches, a pure function of `seed`: epoch e is a permutation drawn
        from a generator seeded with (seed, e), so `start` skips batches without replaying them
        (exact resume). The last partial batch of an epoch is dropped."""
        per_epoch = max(1, len(self) // batch_size)
        epoch, offset = divmod(start, per_epoch)
        while True:
            order = torch.randperm(len(self), generator=seeded_generator(seed, "epoch", epoch))
            for i in range(offset, per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                yield LatentBatch(self.latents[idx], self.cond.rows(idx),
                                  None if self.weights is None else self.weights[idx],
                                  None if self.class_cond is None else self.class_cond.rows(idx))
            epoch, offset = epoch + 1, 0
