"""Dataset options: one dataclass of plain values, checked once when it is built.

The names follow kohya sd-scripts where an option exists there (resolution, bucket
step, min/max side, no-upscale, repeats, shuffle_caption, keep_tokens, caption
dropout), so settings carry over from those tools.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

MASK_MODES = ("auto", "folder", "alpha", "none")
MASK_FOLDER_NAME = "masks"


@dataclass
class DataConfig:
    resolution: int = 1024  # target area is resolution² pixels per image
    enable_buckets: bool = True  # aspect-ratio buckets; False: every image is centre-cropped to a square
    bucket_step: int = 64  # bucket sides are multiples of this (and of VAE downscale × patch)
    min_side: int = 256  # smallest bucket side (buckets only)
    max_side: int = 2048  # largest bucket side (buckets only)
    no_upscale: bool = False  # buckets follow each image's own size; images are never enlarged
    repeats: int = 1  # examples per image per epoch; an "N_name" subfolder multiplies it by N
    caption_extension: str = ".txt"  # caption file: same stem as the image, this extension
    default_caption: str = ""  # caption for an image without a caption file
    shuffle_caption: bool = False  # shuffle the separator-split pieces of each caption per draw
    keep_tokens: int = 0  # with shuffle: the first N pieces stay in place
    caption_separator: str = ","  # splits a caption into pieces for shuffling
    caption_dropout: float = 0.0  # probability that a draw uses the empty caption
    caption_prefix: str = ""  # added in front of every caption (kohya caption_prefix)
    caption_suffix: str = ""  # added after every caption (kohya caption_suffix)
    keep_tokens_separator: str = ""  # "fixed ||| shuffled ||| fixed suffix" (kohya's, e.g. "|||"); "" = off
    secondary_separator: str = ""  # joins words into one shuffle piece, becomes ", " (kohya's, e.g. ";;;")
    trigger_word: str = ""  # put in front of captions that lack it; "[trigger]" in a caption becomes it
    class_word: str = ""  # replaces the trigger in the class prompts of differential output preservation
    masks: str = "auto"  # auto | folder | alpha | none (see files.py)
    control_folder: str = ""  # subfolder of same-stem control images for edit training (Kontext, Flux.2); "" = none
    augment_variants: int = 0  # augmented copies cached per image (augment.py); 0 = no augmentation
    flip_aug: bool = False  # variants flip left-right with probability 1/2
    random_crop_scale: float = 1.0  # variants crop a window of side U(scale, 1) and resize it back (1: no crop)
    color_jitter: float = 0.0  # variants scale brightness / contrast / saturation by U(1 - j, 1 + j)
    cache_latents_to_disk: bool = True  # latent and text-embedding caches under cache_dir
    cache_dir: str | Path | None = None  # default: <folder>/.dit_cache

    def __post_init__(self) -> None:
        for name in ("enable_buckets", "no_upscale", "shuffle_caption", "cache_latents_to_disk", "flip_aug"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data option {name} must be true or false, got {getattr(self, name)!r}")
        for name, minimum in (("resolution", 1), ("bucket_step", 1), ("min_side", 1), ("max_side", 1),
                              ("repeats", 1), ("keep_tokens", 0), ("augment_variants", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"data option {name} must be an integer >= {minimum}, got {value!r}")
        if self.resolution < self.bucket_step:
            raise ValueError(
                f"resolution {self.resolution} is smaller than bucket_step {self.bucket_step}; "
                "raise the resolution or lower the bucket step"
            )
        if self.enable_buckets:
            for name in ("min_side", "max_side"):
                if getattr(self, name) % self.bucket_step:
                    raise ValueError(
                        f"{name} {getattr(self, name)} is not a multiple of bucket_step {self.bucket_step}; "
                        f"use {getattr(self, name) // self.bucket_step * self.bucket_step or self.bucket_step}"
                    )
            if not self.min_side <= self.resolution <= self.max_side:
                raise ValueError(
                    f"resolution {self.resolution} must lie between min_side {self.min_side} and "
                    f"max_side {self.max_side}, so the square bucket exists; adjust min_side / max_side"
                )
        elif self.no_upscale:
            raise ValueError(
                "no_upscale needs enable_buckets=True: without buckets every image is resized to the "
                "fixed square resolution; turn buckets on or no_upscale off"
            )
        extension = self.caption_extension
        if not isinstance(extension, str) or len(extension) < 2 or not extension.startswith("."):
            raise ValueError(f"caption_extension must look like '.txt', got {self.caption_extension!r}")
        if not isinstance(self.default_caption, str):
            raise ValueError(f"default_caption must be a string, got {self.default_caption!r}")
        if not isinstance(self.caption_separator, str) or not self.caption_separator:
            raise ValueError(f"caption_separator must be a non-empty string, got {self.caption_separator!r}")
        for name in ("caption_prefix", "caption_suffix", "keep_tokens_separator", "secondary_separator",
                     "trigger_word", "class_word"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"data option {name} must be a string, got {getattr(self, name)!r}")
        if self.class_word and not self.trigger_word:
            raise ValueError(f"class_word {self.class_word!r} replaces the trigger word in the class prompts; "
                             "set trigger_word too (e.g. trigger_word 'ohwx', class_word 'man')")
        for name in ("keep_tokens_separator", "secondary_separator"):
            if getattr(self, name) and getattr(self, name).strip() in ("", self.caption_separator.strip()):
                raise ValueError(f"data option {name} {getattr(self, name)!r} must differ from caption_separator "
                                 f"{self.caption_separator!r} and not be blank (kohya uses '|||' and ';;;')")
        dropout = self.caption_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability in [0, 1], got {self.caption_dropout!r}")
        control = self.control_folder
        if not isinstance(control, str) or (control and (control.startswith(".") or "/" in control or "\\" in control)):
            raise ValueError(f"control_folder names a subfolder of each image folder (e.g. 'control'), got {control!r}")
        if control == MASK_FOLDER_NAME:
            raise ValueError(f"control_folder cannot be '{MASK_FOLDER_NAME}': that folder holds loss masks")
        self._check_augmentation()
        if self.masks not in MASK_MODES:
            raise ValueError(f"masks must be one of {', '.join(MASK_MODES)}, got {self.masks!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, Path)):
            raise ValueError(f"cache_dir must be a folder path or None, got {self.cache_dir!r}")

    def _check_augmentation(self) -> None:
        if not 0.1 <= self.random_crop_scale <= 1.0:
            raise ValueError(f"random_crop_scale must be in [0.1, 1] (1: no crop), got {self.random_crop_scale!r}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1) (0: none), got {self.color_jitter!r}")
        augments = self.flip_aug or self.random_crop_scale < 1.0 or self.color_jitter > 0
        if augments and not self.augment_variants:
            raise ValueError("flip_aug / random_crop_scale / color_jitter need augment_variants >= 1: the number "
                             "of augmented copies of each image that are encoded once and cached (e.g. 4)")
        if self.augment_variants and not augments:
            raise ValueError(f"augment_variants {self.augment_variants} with no augmentation on; set flip_aug, "
                             "random_crop_scale < 1 or color_jitter > 0, or augment_variants 0")
        if self.augment_variants and self.control_folder:
            raise ValueError("augmentation would break edit pairs (the control image is not augmented with its "
                             "target); set augment_variants 0 with a control_folder")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return values
