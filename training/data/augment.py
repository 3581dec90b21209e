"""Image augmentation: horizontal flip, random crop and colour jitter, as cached variants.

kohya sd-scripts refuses augmentation with cached latents (flip_aug aside, color_aug and
random_crop need `cache_latents` off and encode every step). Here each image gets
`augment_variants` augmented copies, each drawn once from a generator seeded by the image's
bytes and the variant number, encoded once with the VAE and cached on disk under a key that
includes the augmentation's parameters (`Augmentation.key`): the plain latents and every
variant have their own entries, so they can never be mixed up, and a second run (or the CLI,
which has no VAE) reads them all from the cache. Each training draw picks one variant with a
generator seeded by (seed, batch index), so batches stay a pure function of the seed (exact
resume). More variants: more variety, more VAE time and memory (one latent per variant).

Applied to the bucket-sized image [3, H, W] in [0, 1], in this order:
  crop     a window of side fraction s ~ U(crop_scale, 1), placed uniformly, resized back to the
           bucket size (bilinear)
  flip     left-right with probability 1/2 (loss masks are flipped with it)
  jitter   brightness x b, contrast (x - mean) c + mean, saturation gray + (x - gray) s, with
           b, c, s ~ U(1 - color_jitter, 1 + color_jitter), then clipped to [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .order import seeded_generator

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of the gray image saturation mixes with


@dataclass(frozen=True)
class Augmentation:
    flip: bool
    crop: tuple[float, float, float]  # (left, top, side) as fractions of the bucket's width / height
    brightness: float
    contrast: float
    saturation: float

    def key(self) -> str:
        """The parameters, rounded so that the text (a cache-key part) is stable across platforms."""
        left, top, side = self.crop
        return (f"flip={int(self.flip)} crop={left:.6f},{top:.6f},{side:.6f} b={self.brightness:.6f} "
                f"c={self.contrast:.6f} s={self.saturation:.6f}")


def draw_augmentation(flip: bool, crop_scale: float, color_jitter: float, image_digest: str,
                      variant: int) -> Augmentation:
    """The augmentation of variant `variant` of the image with sha256 `image_digest`."""
    generator = seeded_generator(0, f"augment:{image_digest}", variant)
    u = torch.rand(7, generator=generator).tolist()
    side = crop_scale + (1.0 - crop_scale) * u[0]
    factors = [1.0 + color_jitter * (2.0 * v - 1.0) for v in u[4:7]]
    return Augmentation(flip and u[1] < 0.5, (u[2] * (1.0 - side), u[3] * (1.0 - side), side), *factors)


def crop_and_flip(aug: Augmentation, image: torch.Tensor) -> torch.Tensor:
    """The geometric part on any [C, H, W] tensor (an image or a mask)."""
    height, width = image.shape[-2:]
    left, top, side = aug.crop
    if side < 1.0:
        x0, y0 = round(left * width), round(top * height)
        w, h = max(1, round(side * width)), max(1, round(side * height))
        window = image[:, y0 : y0 + h, x0 : x0 + w]
        image = F.interpolate(window[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return image.flip(-1) if aug.flip else image


def augment_pixels(aug: Augmentation, pixels: torch.Tensor) -> torch.Tensor:
    """The augmented image [3, H, W] in [0, 1]."""
    image = crop_and_flip(aug, pixels) * aug.brightness
    mean = image.mean()
    image = (image - mean) * aug.contrast + mean
    gray = sum(w * image[i] for i, w in enumerate(LUMA))[None]
    return (gray + (image - gray) * aug.saturation).clamp(0.0, 1.0)
