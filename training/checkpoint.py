"""Resumable training checkpoints: everything an exact resume needs, in safetensors + JSON.

Layout of a run folder:

    <run_dir>/checkpoints/step_000100/
        adapter.safetensors       the adapter at that step (ComfyUI format; what post-hoc EMA merges)
        adapter_ema.safetensors   the online-EMA adapter, when EMA is on
        state.safetensors         trainable parameters (raw training values), optimizer and EMA
                                  tensors, RNG states; the rest (step, losses, scheduler, optimizer
                                  hyper-parameters, config) as JSON in its metadata

Only the newest `keep_last` states are kept; older checkpoints keep their small adapter
files, so a post-hoc EMA can still merge the whole run. No pickle anywhere: optimizer
state dicts are split into tensors and a JSON skeleton that records key and tuple types.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .storage import OUTPUT_FIX, give_normal_permissions, open_safetensors, os_errors, replace_dir, staging_dir

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
ADAPTER_FILE = "adapter.safetensors"
EMA_ADAPTER_FILE = "adapter_ema.safetensors"  # ema_twin(ADAPTER_FILE)
STEP_DIR = re.compile(r"step_(\d+)")
FORMAT_VERSION = "1"


@dataclass
class TrainState:
    step: int  # optimizer steps done
    micro_batches: int  # batches drawn from the data stream
    losses: list[float]
    skipped_nonfinite: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict[str, torch.Tensor]
    config: dict
    ema: dict[str, torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def _flatten(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """Replace tensors by references into `tensors`; keep dict key types and tuples in JSON."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _unflatten(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {k: _unflatten(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_state(directory: str | os.PathLike, state: TrainState, files: dict[str, Path] | None = None) -> Path:
    """Write `state` (and move the already-written `files` into it) as one checkpoint folder.

    Everything goes into a temporary sibling folder first, which is renamed into place:
    a crash or interrupt mid-save never leaves a half checkpoint behind.
    """
    directory = Path(directory)
    tmp = staging_dir(directory.parent, f".{directory.name}.", OUTPUT_FIX)
    try:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = {
            "trainable": _flatten(state.trainable, "trainable", tensors),
            "optimizer": _flatten(state.optimizer, "optimizer", tensors),
            "scheduler": _flatten(state.scheduler, "scheduler", tensors),
            "rng": _flatten(state.rng, "rng", tensors),
            "ema": _flatten(state.ema, "ema", tensors),
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "step": str(state.step),
            "micro_batches": str(state.micro_batches),
            "skipped_nonfinite": str(state.skipped_nonfinite),
            "losses": json.dumps(state.losses),
            "skeleton": json.dumps(skeleton),
            "config": json.dumps(state.config),
            "extra": json.dumps(state.extra),
        }
        with os_errors("write the checkpoint", tmp / STATE_FILE, OUTPUT_FIX):
            save_file(tensors, str(tmp / STATE_FILE), metadata=meta)
            give_normal_permissions(tmp / STATE_FILE)
            for name, source in (files or {}).items():
                shutil.move(str(source), str(tmp / name))
        replace_dir(tmp, directory, OUTPUT_FIX)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_state(directory: str | os.PathLike) -> TrainState:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} holds no {STATE_FILE}: it is not a resumable checkpoint "
            f"(only the newest keep_last checkpoints keep their state); pick a newer one"
        )
    with open_safetensors(path, "checkpoint state") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        skeleton = json.loads(meta["skeleton"])
        return _state_from(meta, skeleton, tensors)
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"cannot read checkpoint state {path}: its contents are damaged ({error!r})") from None


def _state_from(meta: dict[str, str], skeleton: dict, tensors: dict[str, torch.Tensor]) -> TrainState:
    return TrainState(
        step=int(meta["step"]),
        micro_batches=int(meta["micro_batches"]),
        losses=json.loads(meta["losses"]),
        skipped_nonfinite=int(meta["skipped_nonfinite"]),
        trainable=_unflatten(skeleton["trainable"], tensors),
        optimizer=_unflatten(skeleton["optimizer"], tensors),
        scheduler=_unflatten(skeleton["scheduler"], tensors),
        rng=_unflatten(skeleton["rng"], tensors),
        ema=_unflatten(skeleton["ema"], tensors),
        config=json.loads(meta["config"]),
        extra=json.loads(meta["extra"]),
    )


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_adapters(run_dir: str | os.PathLike, ema: bool = False) -> list[Path]:
    """The adapter file (or the online-EMA one) of every checkpoint of a run, oldest first."""
    name = EMA_ADAPTER_FILE if ema else ADAPTER_FILE
    return [c / name for c in list_checkpoints(run_dir) if (c / name).is_file()]


def ema_twin(path: str | os.PathLike) -> Path:
    """Where the EMA weights are saved beside an adapter file: <stem>_ema.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.stem}_ema{path.suffix}")


def resumable_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run that hold a resumable state, oldest first."""
    return [p for p in list_checkpoints(run_dir) if (p / STATE_FILE).is_file()]


def load_resumable(path: str | os.PathLike) -> tuple[Path, TrainState]:
    """The state to resume from: a checkpoint folder, or the newest intact checkpoint of a run folder.

    A damaged newest state (a truncated copy, a disk error) is skipped with a warning and
    the one before it is used, so one bad file never costs the whole run.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path, load_state(path)
    candidates = resumable_checkpoints(path)
    if not candidates:
        raise FileNotFoundError(
            f"nothing to resume in {path}: no checkpoints/step_*/{STATE_FILE} found; "
            "pass a run folder that has checkpoints, or start a new run"
        )
    problems = []
    for candidate in reversed(candidates):
        try:
            state = load_state(candidate)
        except ValueError as error:
            problems.append(str(error))
            log.warning("skipping damaged checkpoint %s (%s); trying the one before it", candidate.name, error)
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint", candidate)
        return candidate, state
    raise ValueError(f"no intact checkpoint to resume in {path}: " + "; ".join(problems))


def prune_states(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete the resumable state of all but the newest `keep_last` checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    with_state = [p for p in list_checkpoints(run_dir) if (p / STATE_FILE).is_file()]
    for old in with_state[:-keep_last]:
        (old / STATE_FILE).unlink()
        log.info("removed resumable state of %s (keep_last=%d); its adapter files stay", old.name, keep_last)


def rng_state(noise_rng: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "noise": noise_rng.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def restore_rng(state: dict[str, torch.Tensor], noise_rng: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_rng.set_state(state["noise"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
