"""Image files: header reads, decoding (EXIF orientation, alpha) and resize + crop to a bucket."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .buckets import Placement, Size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # matched case-insensitively
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIDEWAYS_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageInfo:
    size: Size  # (width, height) as displayed, i.e. after the EXIF orientation
    has_alpha: bool


def _open(source: bytes | Path) -> Image.Image:
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        raise ValueError("not an image format Pillow can read") from None


def read_info(source: bytes | Path) -> ImageInfo:
    """Size and alpha from the header only (of the bytes, or of the file); raises if it is not an image."""
    with _open(source) as image:
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation) in _SIDEWAYS_ORIENTATIONS:
            width, height = height, width
        return ImageInfo((width, height), image.mode in _ALPHA_MODES or "transparency" in image.info)


def _oriented(data: bytes) -> Image.Image:
    image = _open(data)
    image.load()  # decode now, so a truncated file fails here and not half-way through training
    return ImageOps.exif_transpose(image)


def decode_image(data: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RGB float32 [3, H, W] in [0, 1], and the alpha channel [H, W] in [0, 1] if there is one.

    Transparent pixels keep their stored colour (alpha is dropped, not composited), as
    PIL's RGBA -> RGB conversion and kohya's loader do; the alpha serves as a loss mask.
    """
    image = _oriented(data)
    alpha = None
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        alpha = torch.from_numpy(np.array(image.convert("RGBA"))[..., 3]).float() / 255
    rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    return rgb, alpha


def decode_mask(data: bytes) -> torch.Tensor:
    """A mask image as float32 [H, W] in [0, 1]: grayscale luminance, white = 1 = train here."""
    return torch.from_numpy(np.array(_oriented(data).convert("L"))).float() / 255


def fit_to_bucket(pixels: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[C, H, W] in [0, 1] -> [C, bucket_h, bucket_w]: resize to `placement.resized`, then crop.

    Shrinking uses area averaging (cv2 INTER_AREA, what kohya uses); enlarging uses
    antialiased bicubic, clamped back to [0, 1].
    """
    width, height = placement.resized
    if tuple(pixels.shape[-2:]) != (height, width):
        if height <= pixels.shape[-2] and width <= pixels.shape[-1]:
            pixels = F.interpolate(pixels[None], size=(height, width), mode="area")[0]
        else:
            pixels = F.interpolate(pixels[None], size=(height, width), mode="bicubic", antialias=True)[0]
            pixels = pixels.clamp(0, 1)
    left, top = placement.crop
    return pixels[:, top : top + placement.bucket[1], left : left + placement.bucket[0]]
