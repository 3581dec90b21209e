"""A training dataset read from a folder of images and captions, served as bucketed batches.

The engine never sees a VAE or text encoder, only two callables:

    ImageEncoder: images [B, 3, H, W] float in [0, 1] -> latents [B, C, H/d, W/d]
    TextEncoder:  captions -> a Conditioning record (conditioning.py), or for text-only
                  models (states [N, L, D] zero past each length, lengths [N])

`FolderDataset.from_folder` scans the folder (files.py), assigns buckets (buckets.py),
loads each image's latents from the disk cache or encodes them (cache.py), and keeps the
latents in memory. Captions are processed per draw (captions.py) and their embeddings
come from a per-string cache, so the text encoder runs only for strings never seen before.
The batch sequence is a pure function of (seed, dataset contents) (order.py).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..conditioning import Conditioning
from ..size_checks import check_latent_cache, check_upscale
from ..storage import finite_or_raise
from .buckets import ImageTooSmall, Placement, Size, cover, place_image
from .cache import TextEmbeddingCache, TextEncoder, latent_key, load_tensors, save_tensors
from .augment import Augmentation, augment_pixels, crop_and_flip, draw_augmentation
from .captions import class_prompt, fixed_caption, process_caption
from .config import DataConfig
from .files import ImageFile, name_list, scan_folder
from .images import IMAGE_EXTENSIONS, decode_image, decode_mask, fit_to_bucket, read_info
from .latents import LatentBatch
from .masks import mask_to_latent, mask_weights
from .order import batches_per_epoch, epoch_batches, seeded_generator

log = logging.getLogger(__name__)

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_CACHE_FOLDER = ".dit_cache"
_TEXT_ENCODE_CHUNK = 64  # captions per text-encoder call when pre-encoding


@dataclass(frozen=True)
class DatasetItem:
    image_path: Path
    caption: str  # as read from the caption file (before wildcards / shuffle / dropout)
    bucket: Size  # (width, height) in pixels
    has_mask: bool
    repeats: int
    caption_missing: bool


@dataclass
class _Encoded:
    """One usable image: where it sits in its bucket, its latents and latent-size mask."""

    file: ImageFile
    size: Size  # (width, height) of the image as displayed
    placement: Placement
    latents: torch.Tensor  # (C, h, w)
    mask: torch.Tensor | None  # (1, h, w) in [0, 1]
    from_cache: bool
    references: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (C, h, w) per control image
    variants: list[tuple[Augmentation, torch.Tensor]] = dataclasses.field(default_factory=list)  # augmented latents


class _Unusable(Exception):
    """An image file that cannot be used; it is skipped and listed in one warning."""


def _check_encoder_args(cfg: DataConfig, latent_downscale: int, patch: int, encoder_id: str) -> None:
    for name, value in (("latent_downscale", latent_downscale), ("patch", patch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(encoder_id, str) or not encoder_id:
        raise ValueError("encoder_id must be a non-empty string naming the VAE and text encoder (part of cache keys)")
    unit = latent_downscale * patch
    if cfg.bucket_step % unit:
        raise ValueError(
            f"bucket_step {cfg.bucket_step} is not a multiple of {unit} (VAE downscale {latent_downscale} x "
            f"patch {patch}), so buckets would not split into whole latent patches; "
            f"use bucket_step {math.lcm(cfg.bucket_step, unit)}"
        )


def _image_space_mask(source: str, mask_bytes: bytes, alpha: torch.Tensor | None) -> torch.Tensor | None:
    """The mask [H, W] for a mask source (the modes are described in files.py)."""
    if source == "file":
        return decode_mask(mask_bytes)
    if source == "alpha":
        return alpha
    if source == "alpha_if_transparent" and alpha is not None and float(alpha.min()) < 1.0:
        return alpha  # a fully opaque alpha (common in PNG exports) marks nothing
    return None


@dataclass(frozen=True)
class _Planned:
    """An image whose header was read: its displayed size and where it lands."""

    file: ImageFile
    size: Size
    placement: Placement


def _plan(file: ImageFile, cfg: DataConfig) -> _Planned:
    try:
        info = read_info(file.path)
    except Exception as error:  # PIL raises many types for broken files; all mean "skip this image"
        raise _Unusable(f"unreadable: {error}") from error
    try:
        return _Planned(file, info.size, place_image(info.size, cfg))
    except ImageTooSmall as error:
        raise _Unusable(str(error)) from error


def _check_sizes(planned: list[_Planned], cfg: DataConfig, downscale: int, latent_folder: Path | None) -> None:
    """Before anything is encoded or written: no absurd enlargement, and room for the latents."""
    fix = f"lower resolution (now {cfg.resolution}) or max_side, or set no_upscale"
    check_upscale([(p.file.path, p.size, p.placement.resized) for p in planned], fix)
    check_latent_cache([p.placement.bucket for p in planned], downscale, latent_folder, fix)


def _load_or_encode(
    planned: _Planned, encode_images: ImageEncoder, downscale: int, encoder_id: str, latent_folder: Path | None,
    cfg: DataConfig,
) -> _Encoded:
    encoded = _load_or_encode_target(planned, encode_images, downscale, encoder_id, latent_folder)
    encoded.references = [_load_or_encode_control(path, planned.placement.bucket, encode_images, downscale, encoder_id,
                                                  latent_folder) for path in planned.file.controls]
    if cfg.augment_variants:
        encoded.variants = _load_or_encode_variants(planned, encoded, cfg, encode_images, downscale, encoder_id,
                                                    latent_folder)
    return encoded


def _load_or_encode_variants(planned: _Planned, encoded: _Encoded, cfg: DataConfig, encode_images: ImageEncoder,
                             downscale: int, encoder_id: str, latent_folder: Path | None,
                             ) -> list[tuple[Augmentation, torch.Tensor]]:
    """The image's augmented variants (augment.py), each from its own cache entry or encoded once."""
    file, placement = planned.file, planned.placement
    if encoded.mask is not None and cfg.random_crop_scale < 1.0:
        raise ValueError(f"{file.path.name} has a loss mask and random_crop_scale is {cfg.random_crop_scale}: "
                         "cropped variants would need cropped masks; use flip_aug / color_jitter only, or masks none")
    image_bytes = file.path.read_bytes()
    mask_bytes = file.mask_path.read_bytes() if file.mask_source == "file" else b""
    digest = hashlib.sha256(image_bytes).hexdigest()
    latent_size = tuple(encoded.latents.shape[-2:])
    bucket_pixels = None  # decoded only when a variant is not cached
    variants = []
    for index in range(cfg.augment_variants):
        aug = draw_augmentation(cfg.flip_aug, cfg.random_crop_scale, cfg.color_jitter, digest, index)
        key = latent_key(encoder_id, downscale, image_bytes, file.mask_source, mask_bytes, placement, aug.key())
        cache_path = None if latent_folder is None else latent_folder / f"{key}.safetensors"
        stored = None if cache_path is None else load_tensors(cache_path)
        if stored is not None and "latents" in stored and tuple(stored["latents"].shape[-2:]) == latent_size:
            variants.append((aug, stored["latents"]))
            continue
        if bucket_pixels is None:
            bucket_pixels = fit_to_bucket(decode_image(image_bytes)[0], placement)
        latents = _encode_checked(encode_images, augment_pixels(aug, bucket_pixels), file.path, placement.bucket,
                                  latent_size, downscale)
        if cache_path is not None:
            save_tensors(cache_path, {"latents": latents},
                         metadata={"image": file.path.name, "format": "dit_trainer latents", "augmentation": aug.key()})
        variants.append((aug, latents))
    return variants


def _encode_checked(encode_images: ImageEncoder, pixels: torch.Tensor, path: Path, bucket: Size,
                    latent_size: tuple[int, int], downscale: int) -> torch.Tensor:
    """Latents (C, h, w) of one bucket-sized image, checked against the size the VAE should give."""
    with torch.no_grad():
        latents = encode_images(pixels[None])
    if latents.ndim != 4 or latents.shape[0] != 1 or tuple(latents.shape[-2:]) != latent_size:
        raise ValueError(
            f"the image encoder turned {path.name} ({bucket[0]}x{bucket[1]}) into latents of shape "
            f"{tuple(latents.shape)}; expected [1, C, {latent_size[0]}, {latent_size[1]}]. "
            f"Is latent_downscale={downscale} right for this VAE?"
        )
    finite_or_raise({"latents": latents}, f"the VAE's latents of {path} (check the VAE file and its dtype)")
    return latents[0].detach().cpu()


def _load_or_encode_control(path: Path, bucket: Size, encode_images: ImageEncoder, downscale: int, encoder_id: str,
                            latent_folder: Path | None) -> torch.Tensor:
    """A control image resized and centre-cropped to its target's bucket, as latents (C, h, w)."""
    try:
        image_bytes = path.read_bytes()
        placement = cover(read_info(image_bytes).size, bucket)
    except Exception as error:  # a broken control image breaks its pair: the user must fix it
        raise ValueError(f"control image {path} cannot be read ({error}); fix or replace it") from error
    latent_size = (bucket[1] // downscale, bucket[0] // downscale)
    key = latent_key(encoder_id, downscale, image_bytes, "control", b"", placement)
    cache_path = None if latent_folder is None else latent_folder / f"{key}.safetensors"
    stored = None if cache_path is None else load_tensors(cache_path)
    if stored is not None and "latents" in stored and tuple(stored["latents"].shape[-2:]) == latent_size:
        return stored["latents"]
    try:
        rgb, _ = decode_image(image_bytes)
    except Exception as error:
        raise ValueError(f"control image {path} cannot be decoded ({error}); fix or replace it") from error
    latents = _encode_checked(encode_images, fit_to_bucket(rgb, placement), path, bucket, latent_size, downscale)
    if cache_path is not None:
        save_tensors(cache_path, {"latents": latents}, metadata={"image": path.name, "format": "dit_trainer latents"})
    return latents


def _load_or_encode_target(
    planned: _Planned, encode_images: ImageEncoder, downscale: int, encoder_id: str, latent_folder: Path | None,
) -> _Encoded:
    file, placement, size = planned.file, planned.placement, planned.size
    try:
        image_bytes = file.path.read_bytes()
    except OSError as error:
        raise _Unusable(f"unreadable: {error}") from error
    mask_bytes = b""
    if file.mask_source == "file":
        mask_bytes = file.mask_path.read_bytes()
        try:
            mask_size = read_info(mask_bytes).size
        except Exception as error:
            raise ValueError(
                f"mask file {file.mask_path} is not a readable image ({error}); fix or remove it"
            ) from error
        if mask_size != size:
            raise ValueError(
                f"mask {file.mask_path} is {mask_size[0]}x{mask_size[1]} but its image {file.path} is "
                f"{size[0]}x{size[1]}; masks must have the size of their image"
            )
    latent_size = (placement.bucket[1] // downscale, placement.bucket[0] // downscale)

    key = latent_key(encoder_id, downscale, image_bytes, file.mask_source, mask_bytes, placement)
    cache_path = None if latent_folder is None else latent_folder / f"{key}.safetensors"
    stored = None if cache_path is None else load_tensors(cache_path)
    if stored is not None and "latents" in stored and tuple(stored["latents"].shape[-2:]) == latent_size:
        return _Encoded(file, size, placement, stored["latents"], stored.get("mask"), from_cache=True)

    try:
        rgb, alpha = decode_image(image_bytes)
    except Exception as error:
        raise _Unusable(f"cannot decode: {error}") from error
    latents = _encode_checked(encode_images, fit_to_bucket(rgb, placement), file.path, placement.bucket, latent_size,
                              downscale)

    mask = _image_space_mask(file.mask_source, mask_bytes, alpha)
    latent_mask = None if mask is None else mask_to_latent(mask, placement, downscale)

    if cache_path is not None:
        tensors = {"latents": latents} if latent_mask is None else {"latents": latents, "mask": latent_mask}
        save_tensors(cache_path, tensors, metadata={"image": file.path.name, "format": "dit_trainer latents"})
    return _Encoded(file, size, placement, latents, latent_mask, from_cache=False)


class FolderDataset:
    """Images + captions from a folder; endless bucketed batches of latents and text states.

    Build it with `from_folder`. Batches carry no loss weights until `with_mask_weights`.
    """

    def __init__(
        self, cfg: DataConfig, folder: Path, encoded: list[_Encoded], text_cache: TextEmbeddingCache,
        latent_downscale: int, skipped: list[tuple[Path, str]], text_reads_controls: bool = False,
    ) -> None:
        self.cfg = cfg
        self.folder = folder
        self.items = [
            DatasetItem(e.file.path, e.file.caption, e.placement.bucket, e.mask is not None, e.file.repeats,
                        e.file.caption_missing)
            for e in encoded
        ]
        self._sizes = [e.size for e in encoded]
        self._placements = [e.placement for e in encoded]
        self._latents = [e.latents for e in encoded]
        self._masks = [e.mask for e in encoded]
        self._references = [e.references for e in encoded]
        self._variants = [e.variants for e in encoded]  # [(augmentation, latents)] per item; [] without augmentation
        # Control images the text encoder reads with each caption (Qwen-Image-Edit), else none.
        self._text_controls = [e.file.controls if text_reads_controls else () for e in encoded]
        self._weights: list[torch.Tensor] | None = None  # (1, h, w) per item once weighting is on
        self._mask_gamma, self._mask_min_weight = 1.0, 0.0
        self._text = text_cache
        self._latent_downscale = latent_downscale
        self._skipped = skipped
        self._from_cache = sum(e.from_cache for e in encoded)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        cfg: DataConfig,
        encode_images: ImageEncoder,
        encode_text: TextEncoder,
        latent_downscale: int,
        encoder_id: str,
        patch: int = 2,
        text_reads_controls: bool = False,
    ) -> FolderDataset:
        """Scan `folder`, bucket and encode every usable image (or read it from the cache).

        `encoder_id` names the VAE and text encoder (a weights hash or a name); it is part of
        every cache key, so a different encoder never reads another one's cache. With
        `text_reads_controls` the text encoder gets each pair's control images with its caption
        (Qwen-Image-Edit's encoder sees the image it edits). Unreadable
        images are skipped and listed in one warning; no usable image at all is an error.
        """
        folder = Path(folder)
        _check_encoder_args(cfg, latent_downscale, patch, encoder_id)
        cache_dir = folder / DEFAULT_CACHE_FOLDER if cfg.cache_dir is None else Path(cfg.cache_dir)
        to_disk = cfg.cache_latents_to_disk

        latent_folder = cache_dir / "latents" if to_disk else None
        planned: list[_Planned] = []
        skipped: list[tuple[Path, str]] = []
        for file in scan_folder(folder, cfg):
            try:
                planned.append(_plan(file, cfg))
            except _Unusable as reason:
                skipped.append((file.path, str(reason)))
        _check_sizes(planned, cfg, latent_downscale, latent_folder)
        encoded: list[_Encoded] = []
        for item in planned:
            try:
                encoded.append(_load_or_encode(item, encode_images, latent_downscale, encoder_id, latent_folder, cfg))
            except _Unusable as reason:
                skipped.append((item.file.path, str(reason)))
        if skipped:
            log.warning(
                "skipped %d image(s) in %s that cannot be used: %s", len(skipped), folder,
                "; ".join(f"{path.name} ({reason})" for path, reason in skipped),
            )
        if not encoded:
            unusable = f"; {len(skipped)} image file(s) could not be used: {name_list([p for p, _ in skipped])}" \
                if skipped else ""
            raise ValueError(
                f"no usable images in {folder}: looked for {', '.join(IMAGE_EXTENSIONS)} files (any case) at its "
                f"top level and in 'N_name' repeat subfolders{unusable}"
            )

        missing = [e.file.path for e in encoded if e.file.caption_missing]
        if missing:
            log.warning(
                "%d image(s) have no %s caption file and use the default caption %r: %s",
                len(missing), cfg.caption_extension, cfg.default_caption, name_list(missing),
            )

        text_cache = TextEmbeddingCache(encode_text, encoder_id, cache_dir / "text" if to_disk else None)
        # Captions that never change are encoded now, so training needs the text encoder
        # only for shuffled / dropped / wildcard variants.
        fixed = list(dict.fromkeys(
            (variant, e.file.controls if text_reads_controls else ())
            for e in encoded if (caption := fixed_caption(e.file.caption, cfg)) is not None
            for variant in ((caption, class_prompt(caption, cfg)) if cfg.class_word else (caption,))))
        for start in range(0, len(fixed), _TEXT_ENCODE_CHUNK):
            chunk = fixed[start : start + _TEXT_ENCODE_CHUNK]
            text_cache.get([caption for caption, _ in chunk], [controls for _, controls in chunk])

        dataset = cls(cfg, folder, encoded, text_cache, latent_downscale, skipped, text_reads_controls)
        log.info("dataset %s:\n%s", folder, dataset.summary())
        return dataset

    def __len__(self) -> int:
        """Examples per epoch, counting repeats."""
        return sum(item.repeats for item in self.items)

    def item_count(self) -> int:
        """Images (an image with repeats counts once)."""
        return len(self.items)

    def subset(self, indices: list[int]) -> FolderDataset:
        """A copy with only the images at `indices` (a validation split holds the others out)."""
        part = copy.copy(self)
        pick = lambda values: None if values is None else [values[i] for i in indices]  # noqa: E731
        part.items, part._sizes, part._placements = pick(self.items), pick(self._sizes), pick(self._placements)
        part._latents, part._masks, part._references = pick(self._latents), pick(self._masks), pick(self._references)
        part._text_controls, part._weights = pick(self._text_controls), pick(self._weights)
        part._variants = pick(self._variants)
        return part

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[LatentBatch]:
        """Endless batches, each from one bucket; a pure function of (seed, dataset contents).

        Epoch e orders the examples with a generator seeded from (seed, e); the caption draws
        of batch k come from one seeded from (seed, k). `start` skips the first `start`
        batches without encoding anything for them, for an exact resume.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        buckets = sorted({item.bucket for item in self.items})
        bucket_examples = [
            [i for i, item in enumerate(self.items) if item.bucket == bucket for _ in range(item.repeats)]
            for bucket in buckets
        ]
        epoch, offset = divmod(start, batches_per_epoch([len(e) for e in bucket_examples], batch_size))
        return self._stream(bucket_examples, batch_size, seed, epoch, offset, start)

    def _stream(
        self, bucket_examples: list[list[int]], batch_size: int, seed: int, epoch: int, offset: int, index: int
    ) -> Iterator[LatentBatch]:
        while True:
            plan = epoch_batches(bucket_examples, batch_size, seeded_generator(seed, "epoch", epoch))
            for members in plan[offset:]:
                yield self._batch(members, seeded_generator(seed, "caption", index),
                                  seeded_generator(seed, "augment", index))
                index += 1
            epoch, offset = epoch + 1, 0

    def _pick_variants(self, members: list[int], augment_rng: torch.Generator,
                       ) -> list[tuple[Augmentation | None, torch.Tensor]]:
        """(augmentation, latents) per member: one of its cached variants, or (None, the plain latents)."""
        return [(None, self._latents[i]) if not self._variants[i] else
                self._variants[i][int(torch.randint(len(self._variants[i]), (), generator=augment_rng))]
                for i in members]

    def _batch(self, members: list[int], caption_rng: torch.Generator, augment_rng: torch.Generator) -> LatentBatch:
        captions = [process_caption(self.items[i].caption, self.cfg, caption_rng) for i in members]
        picked = self._pick_variants(members, augment_rng)
        references = tuple(torch.stack(parts) for parts in zip(*(self._references[i] for i in members)))
        controls = [self._text_controls[i] for i in members]

        def conditioning(texts: list[str]) -> Conditioning:
            return dataclasses.replace(Conditioning.collate(self._text.get(texts, controls)),
                                       reference_latents=references)

        return LatentBatch(
            latents=torch.stack([latents for _, latents in picked]),  # (B, C, h, w)
            cond=conditioning(captions),
            # A flipped variant's mask is the flipped mask (crop with masks is refused, jitter moves no pixel).
            weights=None if self._weights is None else torch.stack(
                [self._weights[i] if aug is None else crop_and_flip(aug, self._weights[i])
                 for i, (aug, _) in zip(members, picked)]),
            class_cond=conditioning([class_prompt(c, self.cfg) for c in captions]) if self.cfg.class_word else None,
        )

    @property
    def mask_weighting(self) -> tuple[float, float]:
        """(gamma, min_weight) of the last `with_mask_weights` ((1, 0) before it)."""
        return self._mask_gamma, self._mask_min_weight

    def preview_references(self) -> tuple[torch.Tensor, ...]:
        """The first edit pair's reference latents, one row each, for previews of an edit model; () without pairs."""
        return tuple(r[None] for r in self._references[0])

    def preview_text_images(self) -> list[torch.Tensor]:
        """The first pair's control images [3, H, W] for a text encoder that reads them; [] otherwise."""
        return [decode_image(path.read_bytes())[0] for path in self._text_controls[0]]

    def with_mask_weights(
        self, gamma: float = 1.0, min_weight: float = 0.0, masks: list[torch.Tensor | None] | None = None
    ) -> FolderDataset:
        """A copy whose batches carry per-pixel loss weights [B, 1, h, w] (see `mask_weights`).

        `masks` replaces the dataset's own masks: one image-space [H, W] tensor in [0, 1] (or
        None) per item, in `items` order, at its image's size; each gets its image's resize
        and crop. Items without a mask weigh 1 everywhere; if no item has a mask the batches
        carry no weights at all.
        """
        mask_weights(torch.ones(1), gamma, min_weight)  # validate before any work
        latent_masks = self._masks if masks is None else self._override_masks(masks)
        weighted = copy.copy(self)
        weighted.items = [
            dataclasses.replace(item, has_mask=m is not None) for item, m in zip(self.items, latent_masks)
        ]
        weighted._masks = latent_masks
        weighted._mask_gamma, weighted._mask_min_weight = gamma, min_weight
        if all(m is None for m in latent_masks):
            log.warning("no dataset item has a mask, so batches carry no loss weights")
            weighted._weights = None
        else:
            weighted._weights = [
                torch.ones(1, *lat.shape[-2:]) if m is None else mask_weights(m, gamma, min_weight)
                for m, lat in zip(latent_masks, self._latents)
            ]
            log.info("loss weighted by masks on %d of %d images (gamma %g, weight outside the mask %g)",
                     sum(m is not None for m in latent_masks), len(latent_masks), gamma, min_weight)
        return weighted

    def _override_masks(self, masks: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        if len(masks) != len(self.items):
            raise ValueError(
                f"got {len(masks)} masks for {len(self.items)} dataset images; give one mask (or None) per "
                "image, in the dataset's item order"
            )
        latent_masks = []
        for item, size, placement, mask in zip(self.items, self._sizes, self._placements, masks):
            if mask is None:
                latent_masks.append(None)
                continue
            mask = mask.detach().float().cpu()
            if mask.ndim == 3 and mask.shape[0] == 1:
                mask = mask[0]
            if tuple(mask.shape) != (size[1], size[0]):
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} for {item.image_path.name}, whose image is "
                    f"{size[0]}x{size[1]}; give a [{size[1]}, {size[0]}] mask (height, width) for it"
                )
            latent_masks.append(mask_to_latent(mask.clamp(0, 1), placement, self._latent_downscale))
        return latent_masks

    def summary(self) -> str:
        """Counts per bucket, missing captions, masks, skipped files and cache use, for logs and the UI."""
        images_per_bucket = Counter(item.bucket for item in self.items)
        examples_per_bucket = Counter()
        for item in self.items:
            examples_per_bucket[item.bucket] += item.repeats
        lines = [f"{len(self.items)} images, {len(self)} examples per epoch, {len(images_per_bucket)} bucket(s)"]
        for bucket in sorted(images_per_bucket):
            lines.append(
                f"  {bucket[0]}x{bucket[1]}: {images_per_bucket[bucket]} images, {examples_per_bucket[bucket]} examples"
            )
        missing = [item.image_path for item in self.items if item.caption_missing]
        if missing:
            lines.append(f"missing captions: {len(missing)} (default caption {self.cfg.default_caption!r} used): "
                         f"{name_list(missing)}")
        n_masks = sum(item.has_mask for item in self.items)
        if self._weights is not None:
            use = f"used as loss weights (gamma {self._mask_gamma:g}, weight outside {self._mask_min_weight:g})"
        elif n_masks:
            use = ("not weighting the loss yet: WeightedMask in ComfyUI, or [data] mask_gamma / mask_min_weight in "
                   "a TOML config, applies them")
        else:
            use = "the loss is unweighted"
        lines.append(f"masks: {n_masks} of {len(self.items)} images, {use}")
        if self.cfg.control_folder:
            lines.append(f"edit pairs: {len(self._references[0])} control image(s) per image from "
                         f"{self.cfg.control_folder}/, resized to each image's bucket")
        if self._skipped:
            lines.append(f"skipped: {len(self._skipped)} unusable image(s): {name_list([p for p, _ in self._skipped])}")
        lines.append(f"latents: {self._from_cache} from cache, {len(self.items) - self._from_cache} encoded")
        if self.cfg.augment_variants:
            lines.append(f"augmentation: {self.cfg.augment_variants} cached variant(s) per image (flip "
                         f"{self.cfg.flip_aug}, crop scale {self.cfg.random_crop_scale:g}, colour jitter "
                         f"{self.cfg.color_jitter:g}); each draw picks one")
        return "\n".join(lines)
