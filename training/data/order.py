"""The order of training examples: a pure function of (seed, dataset contents).

Every random choice comes from a generator seeded by (seed, purpose, index), never from
a running generator, so batch k is the same whether a run reached it directly or resumed
just before it.
"""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(seed: int, purpose: str, index: int) -> torch.Generator:
    """An independent generator for one (purpose, index), e.g. ("epoch", 3) or ("caption", 120)."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # 63 bits: always valid


def batches_per_epoch(bucket_sizes: list[int], batch_size: int) -> int:
    return sum(-(-n // batch_size) for n in bucket_sizes)


def epoch_batches(bucket_examples: list[list[int]], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches, each from one bucket (kohya's order).

    Shuffle each bucket's examples, cut them into batches of `batch_size` (a bucket's last
    batch may be short: dropping it would lose every image of a bucket smaller than a batch),
    then shuffle the order of all batches.
    """
    batches = []
    for examples in bucket_examples:
        order = torch.randperm(len(examples), generator=generator).tolist()
        shuffled = [examples[i] for i in order]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]
