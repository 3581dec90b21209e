"""Pictures of a run, drawn with Pillow alone: the loss curve and labelled sample grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

from .storage import atomic_write

BACKGROUND = (250, 250, 250)
AXIS = (60, 60, 60)
RAW = (170, 190, 230)
SMOOTH = (30, 80, 200)
VALIDATION = (220, 110, 20)


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (what TensorBoard's smoothing shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def loss_curve(losses: list[float], width: int = 640, height: int = 360, title: str = "training loss",
               validation: list[tuple[int, float]] | None = None) -> Image.Image:
    """Raw per-step loss (light) and its moving average (dark), y axis from min to max; with `validation`
    [(step, loss)], the validation loss as a second series (orange, a dot per evaluation)."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    draw.text((left, 8), title, fill=AXIS)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS, width=1)
    finite = [v for v in losses if math.isfinite(v)]
    checked = [(step, v) for step, v in validation or [] if math.isfinite(v)]
    if len(finite) < 2:
        draw.text((left + 10, top + 10), "not enough steps yet", fill=AXIS)
        return image
    lo, hi = min(finite + [v for _, v in checked]), max(finite + [v for _, v in checked])
    hi = hi if hi > lo else lo + 1e-8
    n = len(losses)

    def point(i: int, v: float) -> tuple[float, float]:
        return left + (right - left) * i / (n - 1), bottom - (bottom - top) * (v - lo) / (hi - lo)

    for series, colour, w in ((losses, RAW, 1), (smoothed(finite), SMOOTH, 2)):
        pts = [point(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        draw.line(pts, fill=colour, width=w)
    if checked:  # step s is index s - 1 of the training series; the step-0 baseline sits on the left edge
        pts = [point(max(step - 1, 0), v) for step, v in checked]
        if len(pts) > 1:
            draw.line(pts, fill=VALIDATION, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VALIDATION)
        draw.text((right - 110, 8), "validation loss", fill=VALIDATION)
    draw.text((4, top - 4), f"{hi:.4g}", fill=AXIS)
    draw.text((4, bottom - 10), f"{lo:.4g}", fill=AXIS)
    draw.text((left, bottom + 8), "step 1", fill=AXIS)
    draw.text((right - 60, bottom + 8), f"step {n}", fill=AXIS)
    return image


def image_grid(rows: list[tuple[str, list[Image.Image]]], cell: int = 96, label_width: int = 110) -> Image.Image:
    """One labelled row per (label, images); images are scaled to `cell` pixels (nearest)."""
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + columns * (cell + 4), len(rows) * (cell + 4) + 4), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = 4 + r * (cell + 4)
        draw.text((6, y + cell // 2 - 6), label, fill=AXIS)
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (label_width + c * (cell + 4), y))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike, fix: str = "") -> Path:
    """Atomic PNG write (see storage.atomic_write)."""
    return atomic_write(path, lambda temp: image.save(temp, format="PNG"), fix)
