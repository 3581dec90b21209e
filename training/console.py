"""Console progress for the CLI: a tqdm bar fed by the loop's ProgressEvents."""

from __future__ import annotations

from tqdm import tqdm

from .progress import ProgressCallback, ProgressEvent


def progress_bar(total: int, desc: str) -> tuple[ProgressCallback, tqdm]:
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def on_progress(event: ProgressEvent) -> None:
        bar.update(event.step - bar.n)
        bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}")

    return on_progress, bar
