"""ComfyUI as the nodes see it: model folders, directories, progress, websocket, interrupt.

Every ComfyUI module the pack uses is imported here and nowhere else, so the node
files read as plain translation code and a test can swap the host for a fake.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from PIL import Image
from server import PromptServer

from ..training.plots import save_png

PACK_FOLDER = "dit_trainer"  # our subfolder of ComfyUI's output and temp directories
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def model_files(kind: str) -> list[str]:
    """Files ComfyUI lists for a model folder kind ('loras', 'diffusion_models', ...)."""
    return folder_paths.get_filename_list(kind)


def model_path(kind: str, name: str) -> Path:
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(kind))
        raise FileNotFoundError(
            f"'{name}' is not in ComfyUI's {kind} folders ({folders}); put the file there or pick another"
        )
    return Path(path)


def model_folder(kind: str) -> Path:
    """The first folder of a model kind: where new files of that kind are written."""
    return Path(folder_paths.get_folder_paths(kind)[0])


def input_dir() -> Path:
    return Path(folder_paths.get_input_directory())


def pack_output_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / PACK_FOLDER


def safe_name(name: str, option: str) -> str:
    """A file / folder name that cannot leave its parent: odd characters become '_'."""
    cleaned = _UNSAFE_NAME.sub("_", name.strip()).strip("._")
    if not cleaned:
        raise ValueError(f"{option} {name!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return cleaned


def device() -> torch.device:
    return comfy.model_management.get_torch_device()


def free_vram() -> None:
    """Unload every model ComfyUI holds on the GPU (checkpoints, text encoders, VAEs) and return
    the cached blocks to the driver, before our DiT moves there."""
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def return_cached_vram() -> None:
    """Hand the allocator's cached blocks back, so ComfyUI's own models see the memory as free."""
    comfy.model_management.soft_empty_cache()


def interrupted() -> bool:
    return comfy.model_management.processing_interrupted()


def raise_interrupted() -> None:
    """End the node as ComfyUI's Cancel does, clearing the flag like ComfyUI's own check."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    raise comfy.model_management.InterruptProcessingException()


def send(event: str, data: dict[str, Any]) -> None:
    """A websocket message to the frontend (our web extension listens for `dit_trainer.*`)."""
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data)


def save_temp_pngs(images: list[Image.Image], prefix: str) -> list[dict[str, str]]:
    """Write images into ComfyUI's temp directory; returns the records /view serves them by."""
    folder = Path(folder_paths.get_temp_directory()) / PACK_FOLDER
    records = []
    for i, image in enumerate(images):
        filename = f"{prefix}_{i:02d}.png"
        save_png(image, folder / filename, "start ComfyUI with a writable --temp-directory")
        records.append({"filename": filename, "subfolder": PACK_FOLDER, "type": "temp"})
    return records


class Progress:
    """ComfyUI's node progress bar; every update is also ComfyUI's interrupt check."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, value: int, total: int) -> None:
        self.bar.update_absolute(value, total)
