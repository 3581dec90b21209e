"""Finding the training files in a folder: images, same-stem captions, masks, repeat subfolders.

Layout (kohya sd-scripts' DreamBooth style):

    folder/
        a.png  a.txt            an image and its caption (same stem, caption_extension)
        masks/a.png             optional loss mask for a.png (same stem, any image extension)
        control/a.png           with control_folder="control": the reference image of the
                                edit pair a.png (Kontext / Flux.2 edit training); several
                                references are control/a_0.png, control/a_1.png, ...
        10_concept/             "N_name" subfolder: its images repeat N x repeats times per epoch
            b.jpg  b.txt
            masks/b.png
        .dit_cache/             hidden folders are skipped (the default cache lives here)

Only one level of "N_name" subfolders is read; other subfolders are logged and skipped.
A caption file is UTF-8; a missing one gives `default_caption`.

Masks (`DataConfig.masks`), decided per image:
* "auto": masks/<stem>.* when the image's folder has a masks/ subfolder (no file there: no
  mask); otherwise the alpha channel, unless it is fully opaque; otherwise no mask.
* "folder": masks/<stem>.* only; at least one masks/ subfolder must exist.
* "alpha": the alpha channel, even a fully opaque one; images without alpha have no mask.
* "none": no masks.
A mask file must have the same size as its image (kohya asserts the same for its
conditioning images); masks are not stretched to fit, since a stretched mask marks the
wrong pixels.

Control images (edit pairs): with `control_folder` set, every image needs the same
number of control images (one or more) in that subfolder of its own folder; an image
without one is an error that lists them, since training an edit model on an unpaired
image teaches it to ignore its reference. Control images may have any size: each is
resized and centre-cropped to its target's bucket (as ai-toolkit and musubi-tuner do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import MASK_FOLDER_NAME, DataConfig
from .images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

MASKS_FOLDER = MASK_FOLDER_NAME
_REPEAT_FOLDER = re.compile(r"(\d+)_(.+)")


@dataclass(frozen=True)
class ImageFile:
    path: Path
    caption: str  # the caption file's text, or default_caption
    caption_missing: bool
    repeats: int  # examples per epoch
    mask_source: str  # "file" | "alpha" | "alpha_if_transparent" | "none"
    mask_path: Path | None  # the mask file when mask_source is "file"
    controls: tuple[Path, ...] = ()  # reference images of an edit pair, in order


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def name_list(paths: list[Path], limit: int = 20) -> str:
    """'a.png, b.png, ... and 3 more' for log lines and errors."""
    names = [p.name for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(names) + more


def read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drop the BOM some editors write
    except UnicodeDecodeError as error:
        raise ValueError(f"caption file {path} is not UTF-8 text ({error}); save it as UTF-8") from error
    return text.replace("\r\n", "\n").strip()


def _image_folders(folder: Path, cfg: DataConfig) -> list[tuple[Path, int]]:
    """(folder, repeats) for the top level and every "N_name" subfolder."""
    folders = [(folder, cfg.repeats)]
    skipped = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name.startswith(".") or sub.name in (MASKS_FOLDER, cfg.control_folder):
            continue
        match = _REPEAT_FOLDER.fullmatch(sub.name)
        if match is None or int(match.group(1)) < 1:
            skipped.append(sub)
            continue
        folders.append((sub, cfg.repeats * int(match.group(1))))
    if skipped:
        log.warning(
            "skipped subfolders of %s that are not named 'N_name' with N >= 1 (N = repeats): %s",
            folder, name_list(skipped),
        )
    return folders


def _mask_files(image_folder: Path) -> dict[str, Path] | None:
    """Mask file per image stem, or None when the folder has no masks/ subfolder."""
    masks_dir = image_folder / MASKS_FOLDER
    if not masks_dir.is_dir():
        return None
    by_stem: dict[str, Path] = {}
    for path in sorted(masks_dir.iterdir()):
        if is_image(path):
            by_stem.setdefault(path.stem, path)
    return by_stem


def _control_files(image_folder: Path, control_folder: str) -> dict[str, tuple[Path, ...]]:
    """Control images per image stem: `<stem>.*` alone, or `<stem>_0.*`, `<stem>_1.*`, ... in index order."""
    folder = image_folder / control_folder
    if not folder.is_dir():
        return {}
    single: dict[str, Path] = {}
    numbered: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if not is_image(path):
            continue
        single.setdefault(path.stem, path)
        if match := re.fullmatch(r"(.+)_(\d+)", path.stem):
            numbered.setdefault(match.group(1), {}).setdefault(int(match.group(2)), path)
    controls = {stem: tuple(paths[i] for i in sorted(paths)) for stem, paths in numbered.items()}
    controls.update({stem: (path,) for stem, path in single.items() if stem not in controls})
    return controls


def _check_controls(images: list[ImageFile], folder: Path, control_folder: str) -> None:
    missing = [image.path for image in images if not image.controls]
    if missing:
        raise FileNotFoundError(
            f"control_folder='{control_folder}': {len(missing)} image(s) in {folder} have no control image in their "
            f"folder's '{control_folder}/' subfolder (same stem, or <stem>_0, <stem>_1, ...): {name_list(missing)}; "
            "add them, move unpaired images out, or clear control_folder for plain training"
        )
    counts = {len(image.controls) for image in images}
    if len(counts) > 1:
        raise ValueError(
            f"control_folder='{control_folder}': images have different numbers of control images ({sorted(counts)}); "
            "give every edit pair the same number of references"
        )


def scan_folder(folder: Path, cfg: DataConfig) -> list[ImageFile]:
    """Every image under `folder` with its caption, repeats and mask source, sorted by path."""
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist or is not a folder")
    images: list[ImageFile] = []
    masks_folder_seen = False
    for image_folder, repeats in _image_folders(folder, cfg):
        masks = _mask_files(image_folder) if cfg.masks in ("auto", "folder") else None
        masks_folder_seen |= masks is not None
        controls = _control_files(image_folder, cfg.control_folder) if cfg.control_folder else {}
        for path in sorted(p for p in image_folder.iterdir() if is_image(p)):
            caption_path = path.with_suffix(cfg.caption_extension)
            caption_missing = not caption_path.is_file()
            mask_path = None if masks is None else masks.get(path.stem)
            if mask_path is not None:
                mask_source = "file"
            elif cfg.masks == "alpha":
                mask_source = "alpha"
            elif cfg.masks == "auto" and masks is None:
                mask_source = "alpha_if_transparent"
            else:
                mask_source = "none"
            images.append(ImageFile(
                path=path,
                caption=cfg.default_caption if caption_missing else read_caption(caption_path),
                caption_missing=caption_missing,
                repeats=repeats,
                mask_source=mask_source,
                mask_path=mask_path,
                controls=controls.get(path.stem, ()),
            ))
    if cfg.control_folder:
        _check_controls(images, folder, cfg.control_folder)
    if cfg.masks == "folder" and not masks_folder_seen:
        raise FileNotFoundError(
            f"masks='folder' but neither {folder} nor its N_name subfolders have a '{MASKS_FOLDER}' "
            "subfolder; add one with a mask per image (same stem), or use masks='auto' / 'alpha' / 'none'"
        )
    return images


def folder_state(folder: Path) -> str:
    """Names, sizes and modification times of every file below `folder` (hidden files and caches excluded):
    a cheap identity of a dataset folder, which changes when anything in it is edited."""
    digest = hashlib.sha256(str(folder).encode())
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(n for n in filenames if not n.startswith(".")):
            path = os.path.join(dirpath, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def folder_contents(folder: Path) -> str:
    """sha256 of every file below `folder` (hidden files and caches excluded): its path inside the folder
    and its bytes. Unlike `folder_state` it does not depend on where the folder lives or when it was copied."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(n for n in filenames if not n.startswith(".")):
            path = os.path.join(dirpath, name)
            content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            digest.update(f"{Path(os.path.relpath(path, folder)).as_posix()}|{content}\n".encode())
    return digest.hexdigest()[:16]


# Where the caches live does not shape the batches: a run moved to other storage keeps its identity.
_PLACEMENT_OPTIONS = ("cache_dir", "cache_latents_to_disk")


def dataset_fingerprint(folder: Path, cfg: DataConfig, encoder_id: str) -> str:
    """Identity of an encoded dataset: the folder's contents, the data options and the encoders, so a run
    knows when its data changed, and a run moved to another machine (the same files elsewhere) does not."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in _PLACEMENT_OPTIONS}
    payload = json.dumps([folder_contents(folder), options, encoder_id], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def with_regularisation(fingerprint: str, regularisation: str | None) -> str:
    """Identity of training data plus regularisation images (`regularisation`: their fingerprint, or None):
    the class images shape the weights too. TrainLoRA and the CLI both build it here, so a handed-off run
    keeps its settings fingerprint."""
    return fingerprint if regularisation is None else f"{fingerprint}+reg:{regularisation}"


def weighted_fingerprint(fingerprint: str, mask_gamma: float, mask_min_weight: float, mask_hash: str = "") -> str:
    """Identity of a dataset whose loss its masks weight (WeightedMask; `mask_hash`: masks given instead)."""
    payload = json.dumps([fingerprint, mask_gamma, mask_min_weight, mask_hash])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
