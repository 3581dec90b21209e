"""The demo concept as a dataset folder: what a user's own training folder looks like.

    NNNN.png        a magenta shape (the held-out concept), 32 x 32
    NNNN.txt        its caption ("a magenta circle")
    masks/NNNN.png  white where the shape is, black elsewhere (a loss mask; see data/files.py)

The same images the CLI demo trains on (`concept_samples(n_images, seed)`), so the demo
workflow and `dit-trainer demo` learn the same concept from the same pictures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..storage import atomic_write, make_dir
from .shapes import BACKGROUND, concept_samples, write_folder

DEMO_IMAGES = 16
MARKER = ".dit_trainer_demo.json"  # written last: its presence means the folder is complete


def write_demo_dataset(folder: str | os.PathLike, n_images: int = DEMO_IMAGES, seed: int = 0) -> Path:
    """Write the demo dataset into `folder` unless a complete copy with these settings is there."""
    folder = Path(folder)
    settings = {"images": n_images, "seed": seed}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == settings:
        return folder
    samples = concept_samples(n_images, seed)
    write_folder(samples, folder)
    masks = make_dir(folder / "masks")
    for i, sample in enumerate(samples):
        # Shapes are drawn without anti-aliasing, so "not background" is exactly the shape.
        shape = Image.fromarray((np.any(sample.image != np.array(BACKGROUND, dtype=np.uint8), axis=-1) * 255)
                                .astype(np.uint8))
        atomic_write(masks / f"{i:04d}.png", lambda temp: shape.save(temp, format="PNG"))
    atomic_write(marker, lambda temp: temp.write_text(json.dumps(settings), encoding="utf-8"))
    return folder
