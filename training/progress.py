"""What the training loop reports: the CLI draws a progress bar from it, the nodes
forward it to ComfyUI's ProgressBar and websocket."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

ETA_AFTER_STEPS = 2  # timed steps (after the first) before an ETA is given


@dataclass
class ProgressEvent:
    step: int  # optimizer steps done
    total: int
    loss: float  # mean loss of this step's micro-batches
    lr: float
    elapsed_s: float
    eta_s: float | None  # None until a few steps give a steady rate
    previews: list[Image.Image] = field(default_factory=list)  # set on preview steps only
    preview_captions: list[str] = field(default_factory=list)  # the prompt of each preview
    norm_stats: Any = None  # max-norm regularisation report (keys scaled, mean / max norm) when enabled
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss) new since the last event


ProgressCallback = Callable[[ProgressEvent], None]


class StepClock:
    """Elapsed time and the ETA of a run.

    The first step of a call pays for start-up (allocations, kernel selection, caches),
    often many times a normal step, so an ETA from it overshoots wildly ("59m" for a
    one-minute run). The rate is taken from the steps after it (previews and checkpoints
    included, as they recur), and no ETA is given until ETA_AFTER_STEPS of them are done.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._first_done: float | None = None
        self._timed = 0

    def step_done(self) -> None:
        if self._first_done is None:
            self._first_done = time.perf_counter()
        else:
            self._timed += 1

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, remaining: int) -> float | None:
        if self._first_done is None or self._timed < ETA_AFTER_STEPS:
            return None
        return (time.perf_counter() - self._first_done) / self._timed * remaining
