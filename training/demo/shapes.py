"""Procedural dataset for the demo: one flat-coloured shape on a dark background.

Every image holds exactly two pixel values, the background and the shape colour
(no anti-aliasing), so the colour of an image can be scored without ambiguity.
One colour, `HELD_OUT_COLOUR`, never appears in pretraining; the demo teaches it
to an adapter from a handful of `concept_samples`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..storage import atomic_write, make_dir

IMAGE_SIZE = 32
BACKGROUND: tuple[int, int, int] = (24, 24, 28)
HELD_OUT_COLOUR = "magenta"

# Every pair is at least ~130 apart in RGB (closest: blue/cyan), so a
# nearest-palette classifier stays correct under heavy per-pixel noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
    HELD_OUT_COLOUR: (220, 40, 220),
}
TRAINING_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c != HELD_OUT_COLOUR)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Shape extent (bounding-box side) as a fraction of the image side.
MIN_EXTENT, MAX_EXTENT = 0.35, 0.70


@dataclass
class Sample:
    """One rendered image (uint8 [H, W, 3]) with its caption and the labels it was drawn from."""

    image: np.ndarray
    caption: str
    shape: str
    colour: str


def _shape_mask(shape: str, size: int, cx: float, cy: float, half: float) -> np.ndarray:
    """Boolean [size, size] mask of pixels whose centres fall inside the shape."""
    coords = np.arange(size) + 0.5
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if shape == "triangle":  # apex up, base along the bottom of the bounding box
        return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def render(shape: str, colour: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one filled `shape` in `colour` at a random position and size; uint8 [size, size, 3]."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; use one of {tuple(COLOURS)}")
    half = rng.uniform(MIN_EXTENT, MAX_EXTENT) * size / 2
    cx, cy = rng.uniform(half, size - half, size=2)  # keeps the bounding box inside the image
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[_shape_mask(shape, size, cx, cy, half)] = COLOURS[colour]
    return image


def caption(shape: str, colour: str) -> str:
    """The one caption template, so the text encoder always sees the colour word."""
    return f"a {colour} {shape}"


def _balanced_samples(n: int, seed: int, colours: tuple[str, ...], size: int) -> list[Sample]:
    """n samples cycling through every (shape, colour) pair in shuffled rounds (counts differ by at most 1)."""
    if n < 0:
        raise ValueError(f"sample count must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    pairs = list(itertools.product(SHAPES, colours))
    order: list[tuple[str, str]] = []
    while len(order) < n:
        order.extend(pairs[i] for i in rng.permutation(len(pairs)))
    return [Sample(render(s, c, rng, size), caption(s, c), s, c) for s, c in order[:n]]


def pretrain_samples(n: int, seed: int, size: int = IMAGE_SIZE) -> list[Sample]:
    """Pretraining set: all shapes x training colours, never the held-out colour."""
    return _balanced_samples(n, seed, TRAINING_COLOURS, size)


def concept_samples(n: int, seed: int, size: int = IMAGE_SIZE) -> list[Sample]:
    """Adapter training set: the held-out colour over all shapes."""
    return _balanced_samples(n, seed, (HELD_OUT_COLOUR,), size)


def concept_prompts() -> list[str]:
    """Prompts used to sample images when scoring the held-out concept, one per shape."""
    return [caption(shape, HELD_OUT_COLOUR) for shape in SHAPES]


def write_folder(samples: list[Sample], folder: Path) -> None:
    """Write `NNNN.png` images with same-stem `NNNN.txt` captions (the trainer's dataset-folder format)."""
    folder = make_dir(folder)
    for i, sample in enumerate(samples):
        stem = f"{i:04d}"
        image = Image.fromarray(sample.image)
        atomic_write(folder / f"{stem}.png", lambda p: image.save(p, format="PNG"))
        atomic_write(folder / f"{stem}.txt", lambda p: p.write_text(sample.caption, encoding="utf-8"))
