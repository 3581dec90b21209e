"""Experiment tracking through accelerate's trackers (tensorboard, wandb, mlflow, aim, ...): none by default.

`[train.tracking] log_with = ["tensorboard"]` (TrainLoRA: extra_options
{"tracking": {"log_with": ["tensorboard"]}}) logs every optimizer step's global loss, lr,
gradient norm (before clipping, when max_grad_norm clips), skipped non-finite steps and
max-norm statistics, plus the preview images; trackers that write files (tensorboard,
aim) write into `<run folder>/logs/`. accelerate logs from the main process only. A
tracker that is not installed is an error naming the package to install, never a
silently empty log. Tracking never changes the weights, so it is free to change when a
run is continued (run_settings.FREE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.utils import LoggerType
from PIL import Image

from .progress import ProgressEvent

LOG_FOLDER = "logs"  # under the run folder
# accelerate's tracker names; each is also the name of the package to install ("all" is not offered:
# a run logs to what it names).
TRACKERS = tuple(t.value for t in LoggerType if t != LoggerType.ALL)


@dataclass
class TrackingConfig:
    log_with: list[str] = field(default_factory=list)  # tracker names (TRACKERS); [] logs nothing
    project: str = ""  # the trackers' project / run name; "" uses the run folder's name

    def __post_init__(self) -> None:
        unknown = [name for name in self.log_with if name not in TRACKERS]
        if unknown:
            raise ValueError(f"train option tracking.log_with has unknown tracker(s) {unknown}; "
                             f"known: {sorted(TRACKERS)}")


def check_installed(cfg: TrackingConfig) -> None:
    """Raise, naming the package, for a chosen tracker that is not installed."""
    from accelerate.tracking import _available_trackers

    available = {str(t) for t in _available_trackers}
    missing = [name for name in cfg.log_with if name not in available]
    if missing:
        install = " ".join(missing)
        extra = " (or pip install 'comfyui-dit-trainer[tracking]')" if missing == ["tensorboard"] else ""
        raise ValueError(f"train option tracking.log_with asks for {missing}, which is not installed: "
                         f"pip install {install}{extra}, or remove it from log_with")


def start_trackers(accelerator: Accelerator, cfg: TrackingConfig, run_dir: Path | None, config: dict) -> None:
    """Open the chosen trackers (nothing when log_with is empty); `config` is recorded as the run's hyper-parameters."""
    if not cfg.log_with:
        return
    if run_dir is None:
        raise ValueError("train option tracking.log_with needs a run folder to log into; pass run_dir")
    accelerator.init_trackers(cfg.project or run_dir.name, config=_hyper_parameters(config))


def _hyper_parameters(config: dict, prefix: str = "") -> dict:
    """Flat name -> int / float / str / bool, the types every tracker takes (tensorboard's hparams refuse lists)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_hyper_parameters(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def step_values(event: ProgressEvent, grad_norm: float | None, skipped_nonfinite: int) -> dict[str, float]:
    """The scalars one optimizer step logs."""
    values = {"loss": event.loss, "lr": event.lr, "skipped_nonfinite_steps": float(skipped_nonfinite)}
    if grad_norm is not None:
        values["grad_norm"] = grad_norm
    if event.norm_stats is not None:
        stats = event.norm_stats
        values.update({"max_norm/keys_scaled": float(stats.keys_scaled), "max_norm/mean_norm": stats.mean_norm,
                       "max_norm/max_norm": stats.max_norm})
    return values


def log_step(accelerator: Accelerator, event: ProgressEvent, grad_norm: float | None, skipped_nonfinite: int) -> None:
    """Log one optimizer step's scalars and, on preview steps, its preview images."""
    if not accelerator.trackers:
        return
    accelerator.log(step_values(event, grad_norm, skipped_nonfinite), step=event.step)
    if event.previews:
        log_images(accelerator, event.previews, event.step)


def log_images(accelerator: Accelerator, images: list[Image.Image], step: int) -> None:
    """Preview images to every tracker that takes images (tensorboard wants one NHWC array)."""
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        if tracker.name == "tensorboard":
            sizes = {image.size for image in images}
            groups = [[i for i in images if i.size == size] for size in sorted(sizes)]
            for group in groups:  # add_images stacks: one call per image size
                key = "samples" if len(groups) == 1 else f"samples_{group[0].size[0]}x{group[0].size[1]}"
                array = np.stack([np.asarray(image.convert("RGB")) for image in group])
                tracker.log_images({key: array}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({"samples": images}, step=step)


def finish(accelerator: Accelerator) -> None:
    """Close the trackers (flushes their files); not end_training(), which also ends the process group."""
    for tracker in accelerator.trackers:
        tracker.finish()
