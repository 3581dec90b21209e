"""How ComfyUI's Qwen-Image-Edit nodes hand an edit pair's control images to the text encoder.

Qwen-Image-Edit's Qwen2.5-VL reads the image it edits, so a caption trained on must be
encoded the way the user's inference node will encode the prompt, image included
(comfy_extras/nodes_qwen.py, ComfyUI 0.3.64):

* TextEncodeQwenImageEdit (the first Edit release): the image area-resized to about 1 MP,
  the prompt as it is.
* TextEncodeQwenImageEditPlus (Edit-2509 / 2511, several images): each image area-resized to
  about 384 x 384, the prompt prefixed with "Picture i: <|vision_start|><|image_pad|><|vision_end|>"
  per image, and the Plus system prompt as the llama template.

`comfy.utils.common_upscale(..., "area", "disabled")` is F.interpolate with mode "area".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

STYLES = ("TextEncodeQwenImageEditPlus", "TextEncodeQwenImageEdit")
PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_AREA = {"TextEncodeQwenImageEditPlus": 384 * 384, "TextEncodeQwenImageEdit": 1024 * 1024}


def _resized(pixels: torch.Tensor, area: int) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> IMAGE [1, h, w, 3] of about `area` pixels, aspect kept."""
    height, width = pixels.shape[-2:]
    scale = math.sqrt(area / (width * height))
    resized = F.interpolate(pixels[None].float(), size=(round(height * scale), round(width * scale)), mode="area")
    return resized.movedim(1, -1)


def tokenize_with_images(clip: Any, prompt: str, images: list[torch.Tensor], style: str) -> Any:
    """`clip.tokenize` of `prompt` with its control images, as the inference node `style` does it."""
    if style not in STYLES:
        raise ValueError(f"edit_text_encoder {style!r} is not one of {', '.join(STYLES)}")
    shown = [_resized(image, _AREA[style]) for image in images]
    if style == "TextEncodeQwenImageEdit":
        return clip.tokenize(prompt, images=shown)
    pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(shown)))
    return clip.tokenize(pictures + prompt, images=shown, llama_template=PLUS_TEMPLATE)
