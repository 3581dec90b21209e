"""A TrainLoRA run's folder, and when an existing run is continued rather than replaced.

    <ComfyUI output>/dit_trainer/<name>/
        dit_trainer_run.json      fingerprint of everything that shapes the trained weights
        checkpoints/step_NNNNNN/  resumable checkpoints (training/checkpoint.py)
        samples/                  preview images, loss.png

The rule (also in the README's caching section): with `resume` on, a run whose fingerprint equals the
current inputs continues from its newest checkpoint; a finished run then returns at
once without training again. A run with another fingerprint (or `resume` off) is moved
aside to `<name>.replaced-<time>/` and a fresh run starts: nothing is deleted, and
checkpoints of different settings never mix in one folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ..training.checkpoint import STATE_FILE, list_checkpoints

log = logging.getLogger(__name__)

RECORD = "dit_trainer_run.json"
# Train options that do not change the trained weights: changing them keeps a run resumable.
NOT_FINGERPRINTED = ("sample_every", "save_every", "keep_last", "gradient_checkpointing", "max_nonfinite_steps")


def file_identity(path: Path | None) -> list | None:
    if path is None:
        return None
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def run_fingerprint(train: dict, network: dict, init_from: Path | None, dataset: str, base_hash: str) -> str:
    train = {k: v for k, v in train.items() if k not in NOT_FINGERPRINTED}
    payload = json.dumps([train, network, file_identity(init_from), dataset, base_hash], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def has_resumable_state(run_dir: Path) -> bool:
    return any((c / STATE_FILE).is_file() for c in list_checkpoints(run_dir))


def recorded_fingerprint(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RECORD).read_text(encoding="utf-8")).get("fingerprint")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare_run(run_dir: Path, fingerprint: str, resume: bool, inputs: dict) -> bool:
    """Make `run_dir` ready for this run; True when training continues from its checkpoints."""
    continuing = resume and has_resumable_state(run_dir) and recorded_fingerprint(run_dir) == fingerprint
    if not continuing and run_dir.exists() and any(run_dir.iterdir()):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
        os.replace(run_dir, aside)
        log.warning("TrainLoRA: the earlier run in %s had other settings (or resume is off); moved it to %s",
                    run_dir, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / RECORD
    tmp = run_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "inputs": inputs}, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, record)
    return continuing
