"""Reading a checkpoint's tensor shapes for config inference, with errors that say what was seen."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

KEY_SAMPLE = 20  # keys quoted in error messages


class ShapeReader:
    """`reader(key, ndim)` -> the key's shape; a missing key or a wrong rank fails with everything
    recorded in `seen` so far, a sample of the keys and the family's expected signature."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], family: str, signature: str):
        self.state_dict = state_dict
        self.family, self.signature = family, signature
        self.seen: dict[str, Any] = {}

    def error(self, problem: str) -> ValueError:
        keys = list(self.state_dict)
        seen = ", ".join(f"{name} {value}" for name, value in self.seen.items()) or "nothing yet"
        return ValueError(
            f"not a loadable {self.family} checkpoint: {problem}. Saw {seen}; {len(keys)} keys, first "
            f"{min(len(keys), KEY_SAMPLE)}: {keys[:KEY_SAMPLE]}. Expected {self.signature}."
        )

    def __call__(self, key: str, ndim: int) -> tuple[int, ...]:
        if key not in self.state_dict:
            raise self.error(f"'{key}' is missing")
        shape = tuple(self.state_dict[key].shape)
        if len(shape) != ndim:
            raise self.error(f"'{key}' has shape {list(shape)}, expected {ndim} dimensions")
        return shape
