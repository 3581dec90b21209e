"""Aspect-ratio buckets: the training size of each image, and how the image is resized and cropped.

* Bucket list, as kohya sd-scripts' `make_bucket_resolutions`: for every width from
  min_side to max_side in bucket_step, the tallest height (a multiple of the step, at most
  max_side) whose area stays within resolution², the transposed size, and the square.
* An image gets the bucket with the closest aspect ratio, measured as |log(w/h) - log(bw/bh)|
  (kohya compares w/h linearly, which makes a tall image look farther from a tall bucket than
  a wide image from the matching wide one). Ties go to the image's own size, then the larger bucket.
* The image is resized, aspect kept, to the smallest size that covers its bucket, then
  centre-cropped to it (kohya's default, without random crop).
* no_upscale (kohya `bucket_no_upscale`): the image shrinks only if its area exceeds resolution²
  or a side exceeds max_side; its bucket is that size rounded down to the step. min_side does
  not apply there: a small image keeps its small size instead of being enlarged.
* Without buckets: one square of side resolution (rounded down to the step) for every image.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .config import DataConfig

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class Placement:
    """Where an image lands: resize to `resized`, then crop `bucket` at `crop`."""

    bucket: Size  # (width, height) of the training image
    resized: Size  # (width, height) after the aspect-preserving resize; covers the bucket
    crop: tuple[int, int]  # (left, top) of the bucket inside the resized image


class ImageTooSmall(ValueError):
    """With no_upscale, an image side is shorter than one bucket step."""


@functools.lru_cache(maxsize=16)
def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> tuple[Size, ...]:
    """All bucket sizes (width, height), sorted; every area is at most resolution²."""
    area = resolution * resolution
    square = resolution // step * step
    sizes = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes.add((width, height))
            sizes.add((height, width))
    return tuple(sorted(sizes))


def aspect_error(size: Size, bucket: Size) -> float:
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def closest_bucket(size: Size, sizes: tuple[Size, ...]) -> Size:
    # Rounding the error makes buckets of equal aspect tie exactly, so the tie-breaks apply.
    return min(sizes, key=lambda b: (round(aspect_error(size, b), 9), b != size, -b[0] * b[1]))


def cover(size: Size, bucket: Size) -> Placement:
    """Resize `size` (aspect kept) to just cover `bucket`, centre-crop to it."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    crop = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    return Placement(bucket, resized, crop)


def place_image(size: Size, cfg: DataConfig) -> Placement:
    """The bucket, resize and crop for an image of `size` (width, height) under `cfg`."""
    step = cfg.bucket_step
    if not cfg.enable_buckets:
        side = cfg.resolution // step * step
        return cover(size, (side, side))
    if not cfg.no_upscale:
        return cover(size, closest_bucket(size, bucket_sizes(cfg.resolution, cfg.min_side, cfg.max_side, step)))
    width, height = size
    scale = min(1.0, math.sqrt(cfg.resolution**2 / (width * height)), cfg.max_side / max(width, height))
    # The epsilon keeps float error from dropping a whole step (1023.9999 -> 960 at step 64).
    bucket = (int(width * scale + 1e-6) // step * step, int(height * scale + 1e-6) // step * step)
    if min(bucket) == 0:
        raise ImageTooSmall(
            f"{width}x{height} is smaller than one bucket step ({step} px) on a side; with no_upscale "
            "it cannot be used: lower bucket_step or turn no_upscale off"
        )
    return cover(size, bucket)
