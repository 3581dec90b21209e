"""Console progress for the CLI: a tqdm bar fed by the loop's ProgressEvents."""

from __future__ import annotations

from tqdm import tqdm

from .progress import ProgressCallback, ProgressEvent


def progress_bar(total: int, desc: str) -> tuple[ProgressCallback, tqdm]:
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    last_validation: list[float] = []  # the newest validation loss stays in the postfix until the next one

    def on_progress(event: ProgressEvent) -> None:
        bar.update(event.step - bar.n)
        last_validation[:] = [loss for _, loss in event.validation[-1:]] or last_validation
        shown = {"val": f"{last_validation[0]:.4f}"} if last_validation else {}
        bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", **shown)

    return on_progress, bar
