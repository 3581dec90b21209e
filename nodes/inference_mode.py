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
  any core node calls them, and what they return is cloned into a normal tensor.
* Tensors that arrive from core nodes are passed through `normal` before the pack
  keeps them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def normal(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or a normal-tensor copy of an inference tensor."""
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        return tensor.clone()


def outside_inference_mode(method: F) -> F:
    """Run a node function with autograd available, whatever mode ComfyUI called it in."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def normal_tree(value: Any) -> Any:
    """`normal` applied to every tensor in nested dicts / lists / tuples (a CONDITIONING, a CLIP output)."""
    if isinstance(value, torch.Tensor):
        return normal(value)
    if isinstance(value, dict):
        return {k: normal_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(normal_tree(v) for v in value)
    return value


def comfy_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a ComfyUI model (VAE encode / decode, CLIP encode) as ComfyUI does, in inference
    mode, and hand back normal tensors the engine may train on."""
    with torch.inference_mode():
        out = function(*args, **kwargs)
    return normal_tree(out)
