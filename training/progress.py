"""What the training loop reports: the CLI draws a progress bar from it, the nodes
forward it to ComfyUI's ProgressBar and websocket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image


@dataclass
class ProgressEvent:
    step: int  # optimizer steps done
    total: int
    loss: float  # mean loss of this step's micro-batches
    lr: float
    elapsed_s: float
    eta_s: float
    previews: list[Image.Image] = field(default_factory=list)  # set on preview steps only
    preview_captions: list[str] = field(default_factory=list)  # the prompt of each preview
    norm_stats: Any = None  # max-norm regularisation report (keys scaled, mean / max norm) when enabled


ProgressCallback = Callable[[ProgressEvent], None]
