"""Where the nodes leave ComfyUI's inference mode, and how tensors cross that line.

ComfyUI runs every node inside `torch.inference_mode()` (execution.py). Tensors made
there are inference tensors: autograd cannot save them for backward, they cannot be
changed in place outside inference mode, and they have no version counter. They also
stay that way when a later node receives them (model weights, latents, CONDITIONING,
MASK). The rules of the pack:

* LoadDiT, DatasetFromFolder, WeightedMask and TrainLoRA run outside inference mode
  (`outside_inference_mode`): the weights, latents and loss weights they make are
  trained against later, with autograd on. SampleWithLoRA and EMAMerge only read, and
  stay inside it as every ComfyUI node does.
* ComfyUI's own CLIP and VAE are always called inside inference mode (`comfy_call`), as
  any core node calls them, also when TrainLoRA re-encodes a caption or decodes a preview.
* What arrives from core nodes (CONDITIONING, MASK) is never kept as it came: the nodes
  keep their own copies (padded, resized), made outside inference mode.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def outside_inference_mode(method: F) -> F:
    """Run a node function with autograd available, whatever mode ComfyUI called it in."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def comfy_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a ComfyUI model (VAE encode / decode, CLIP encode) as ComfyUI does, in inference mode."""
    with torch.inference_mode():
        return function(*args, **kwargs)
