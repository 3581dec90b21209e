"""Deterministic concept scoring: which palette colour does an image's shape have?

Works per pixel with a majority vote, so noisy generated images still score by
the colour most of their foreground is closest to.
"""

from __future__ import annotations

import numpy as np

from .shapes import BACKGROUND, COLOURS, HELD_OUT_COLOUR

# Pixels further than this (RGB Euclidean) from the background count as foreground.
FOREGROUND_DISTANCE = 60.0
# Below this foreground share an image has no shape worth classifying.
MIN_FOREGROUND_SHARE = 0.03

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)


def dominant_colour(image: np.ndarray) -> str | None:
    """Palette colour most foreground pixels are nearest to; None if the foreground is under 3% of the image."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    pixels = image.reshape(-1, 3).astype(np.float32)
    distance_to_bg = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float32), axis=1)
    foreground = pixels[distance_to_bg > FOREGROUND_DISTANCE]
    if len(foreground) < MIN_FOREGROUND_SHARE * len(pixels):
        return None
    nearest = np.linalg.norm(foreground[:, None, :] - _PALETTE[None, :, :], axis=2).argmin(axis=1)
    return _NAMES[int(np.bincount(nearest, minlength=len(_NAMES)).argmax())]


def concept_score(images: list[np.ndarray], colour: str = HELD_OUT_COLOUR) -> float:
    """Share (0.0-1.0) of images whose dominant colour is `colour`."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; use one of {_NAMES}")
    if not images:
        raise ValueError("concept_score needs at least one image")
    return sum(dominant_colour(image) == colour for image in images) / len(images)
