"""What shapes a run's weights, and what may change when a run is continued.

`run_settings` gathers everything that decides the trained weights: the train options
(except those that only decide what is written or shown, `FREE`), the network options,
the base weights' hash, the dataset's identity and the file training continued from.
The run folder's fingerprint is a hash of it (`fingerprint`); every checkpoint stores
it, and a resume compares it key by key (`resume_changes`): `steps` and `lr` may change
(the change applies from the resumed step on, and is logged and recorded); anything
else that differs is refused with each option's old and new value, so a resumed run
never carries settings it was not trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Options that change what is written or shown, never the weights.
FREE = {
    "train": ("sample_every", "save_every", "keep_last", "gradient_checkpointing", "max_nonfinite_steps",
              "validation", "tracking", "fsdp"),
    "network": ("verbose",),
}
ADJUSTABLE = ("train.steps", "train.lr")  # may change on resume: meaningful, applied and logged


def file_identity(path: str | os.PathLike | None) -> list | None:
    """Name, size and modification time of a file (an adapter training continues from)."""
    if path is None or path == "":
        return None
    stat = Path(path).stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def run_settings(train: dict, network: dict | None, base_hash: str, dataset: str,
                 continue_from: str | os.PathLike | None = None, processes: int = 1) -> dict[str, Any]:
    """The settings that shape the weights (JSON-able; tuples become lists).

    `batch_size` is recorded as the global batch (the per-process batch x `processes`,
    distributed.py): what shapes the weights is the global batch, so a run continues on
    another number of processes that trains the same one.
    """
    train = {**train, "batch_size": train["batch_size"] * processes} if "batch_size" in train else train
    settings = {
        "train": {k: v for k, v in train.items() if k not in FREE["train"]},
        "network": None if network is None else {k: v for k, v in network.items() if k not in FREE["network"]},
        "base_hash": base_hash,
        "dataset": dataset,
        "continue_from": file_identity(continue_from),
    }
    return json.loads(json.dumps(settings, default=str))


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted option name: (saved value, current value)} for every option that differs."""
    old, new = _flat(saved), _flat(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def resume_changes(saved: dict[str, Any], current: dict[str, Any], where: Path, step: int) -> dict[str, tuple]:
    """The adjustable changes a resume applies; raises for any other difference."""
    changed = differences(saved, current)
    refused = {k: v for k, v in changed.items() if k not in ADJUSTABLE}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(
            f"cannot resume from {where}: these settings differ from the checkpoint's ({listed}). Set them back "
            "to continue the run, or start a new run (dit-trainer train --restart, or TrainLoRA with resume off); "
            "only steps and lr may change on resume"
        )
    steps = changed.get("train.steps")
    if steps is not None and steps[1] < step:
        raise ValueError(f"cannot resume from {where}: it is at step {step}, past the new steps={steps[1]}; "
                         f"set steps to {step} or more")
    return changed
