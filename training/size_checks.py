"""Sizes that cannot work, refused before any time, memory or disk is spent on them.

* Upscaling: an image blown up far past its own size (a 32 px picture at resolution
  1024) trains on blur and fills the latent cache with useless gigabytes; more than
  `MAX_UPSCALE` times on a side is refused, more than `WARN_UPSCALE` warned about.
* Latent cache: its size is estimated from the buckets before the first image is
  encoded, and refused when the cache folder's disk or the machine's memory cannot hold it.
* Attention on the CPU: PyTorch's CPU attention can fall back to materialising the
  [batch, heads, tokens, tokens] score matrix, so a sample or training size whose
  matrix exceeds the machine's memory is refused with the size that fits; on a GPU the
  attention kernels need memory linear in the tokens, and nothing is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_UPSCALE = 8.0
WARN_UPSCALE = 2.0
LATENT_CHANNELS_ESTIMATE = 16  # latent channels assumed when sizing a cache before encoding (Flux / Z-Image VAE)
MEMORY_SHARE = 0.8  # of the machine's memory a single allocation may take before it is refused
GB = 1 << 30


def machine_memory() -> int | None:
    """Physical memory in bytes, or None where the OS does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_upscale(upscaled: list[tuple[Path, tuple[int, int], tuple[int, int]]], fix: str) -> None:
    """`upscaled`: (image, its size, the size it is resized to) for every image. Refuse or warn, naming files."""
    factors = [(path, size, resized, resized[0] / size[0]) for path, size, resized in upscaled]
    refused = [f for f in factors if f[3] > MAX_UPSCALE]
    if refused:
        path, size, resized, factor = max(refused, key=lambda f: f[3])
        raise ValueError(
            f"{len(refused)} image(s) would be enlarged more than {MAX_UPSCALE:g}x, e.g. {path.name} from "
            f"{size[0]}x{size[1]} to {resized[0]}x{resized[1]} ({factor:.0f}x): that trains on blur and fills the "
            f"cache with gigabytes of it; {fix}"
        )
    warned = [f for f in factors if f[3] > WARN_UPSCALE]
    if warned:
        log.warning("%d image(s) are enlarged more than %gx (at most %.1fx, %s); they will look soft to the model",
                    len(warned), WARN_UPSCALE, max(f[3] for f in warned), warned[0][0].name)


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_latent_cache(buckets: list[tuple[int, int]], downscale: int, cache_folder: Path | None, fix: str) -> None:
    """Refuse a dataset whose latents (kept in memory, and on disk when cached) cannot fit."""
    need = sum(LATENT_CHANNELS_ESTIMATE * (w // downscale) * (h // downscale) * 4 for w, h in buckets)
    memory = machine_memory()
    if memory is not None and need > MEMORY_SHARE * memory:
        raise ValueError(f"the latents of these {len(buckets)} images need about {need / GB:.1f} GB of memory, more "
                         f"than this machine's {memory / GB:.1f} GB; {fix}")
    if cache_folder is not None:
        free = shutil.disk_usage(_existing(cache_folder)).free
        if need > free:
            raise ValueError(f"the latent cache of these {len(buckets)} images needs about {need / GB:.1f} GB, but "
                             f"{_existing(cache_folder)} has {free / GB:.1f} GB free; set cache_dir to a disk with "
                             f"room, turn cache_latents_to_disk off, or {fix}")


def check_attention_fits(model: torch.nn.Module, batch: int, latent_hw: tuple[int, int], text_tokens: int,
                         device: torch.device, what: str, fix: str,
                         reference_hw: list[tuple[int, int]] = ()) -> None:
    """Refuse (CPU only) a forward whose attention score matrix cannot fit in the machine's memory.

    `reference_hw`: latent sizes of reference images, whose tokens join the sequence."""
    memory = machine_memory()
    cfg = getattr(model, "cfg", None)
    if device.type != "cpu" or memory is None or cfg is None:
        return
    patch = getattr(cfg, "patch_size", 2)
    tokens = sum((h // patch) * (w // patch) for h, w in [latent_hw, *reference_hw]) + text_tokens
    heads = getattr(cfg, "n_heads", getattr(cfg, "num_heads", 1))
    need = batch * heads * tokens * tokens * 4
    if need > MEMORY_SHARE * memory:
        raise ValueError(
            f"{what}: {tokens} tokens per image give attention scores of about {need / GB:.0f} GB on the CPU, more "
            f"than this machine's {memory / GB:.1f} GB; {fix}"
        )
