"""What the training loop reports: the CLI draws a progress bar from it, the nodes
forward it to ComfyUI's ProgressBar and websocket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

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


ProgressCallback = Callable[[ProgressEvent], None]
