"""Stand-ins for the core nodes the tests' workflows use, doing what ComfyUI's do to their data.

They run inside the executor's inference mode, so what they return (model weights,
CONDITIONING, LATENT, MASK) is made of inference tensors, as in ComfyUI. FluxGuidance and
ReferenceLatent set conditioning values the way `node_helpers.conditioning_set_values`
does (comfy_extras/nodes_flux.py, nodes_edit_model.py).
"""

from __future__ import annotations

import torch

from .encoders import FakeCLIP, FakeVAE


class CLIPLoader:
    """Stand-ins for core loader / encode nodes: they run inside the executor's inference mode, so what
    they return (model weights, CONDITIONING, MASK) is made of inference tensors, as in ComfyUI."""

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (FakeCLIP(),)


class VAELoader(CLIPLoader):
    RETURN_TYPES = ("VAE",)
    shape = {}  # FakeVAE arguments: Flux.2-shaped latents in the Flux.2 tests

    def load(self):
        return (FakeVAE(**self.shape),)


class CLIPTextEncode:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {})}}

    def encode(self, clip, text):
        out = clip.encode_from_tokens(clip.tokenize(text), return_dict=True)
        return ([[out["cond"], {"pooled_output": out["pooled_output"], "attention_mask": out["attention_mask"]}]],)


class SolidMask:
    """LoadImage's MASK, reduced: 1 in the left half of each image."""

    RETURN_TYPES = ("MASK",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"size": ("INT", {"min": 8, "max": 512})}}

    def make(self, size):
        mask = torch.zeros(1, size, size)
        mask[..., : size // 2] = 1.0
        return (mask,)


CORE_LIKE = {"CLIPLoader": CLIPLoader, "VAELoader": VAELoader, "CLIPTextEncode": CLIPTextEncode,
             "SolidMask": SolidMask}

def _set_values(conditioning: list, values: dict, append: bool = False) -> list:
    out = []
    for states, extra in conditioning:
        extra = dict(extra)
        for key, value in values.items():
            extra[key] = extra.get(key, []) + value if append and key in extra else value
        out.append([states, extra])
    return out


class FluxGuidance:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "guidance": ("FLOAT", {"min": 0.0, "max": 100.0})}}

    def append(self, conditioning, guidance):
        return (_set_values(conditioning, {"guidance": guidance}),)


class VAEEncode:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def encode(self, vae, pixels):
        return ({"samples": vae.encode(pixels[:, :, :, :3])},)


class ReferenceLatent:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}, "optional": {"latent": ("LATENT",)}}

    def append(self, conditioning, latent=None):
        if latent is None:
            return (conditioning,)
        return (_set_values(conditioning, {"reference_latents": [latent["samples"]]}, append=True),)


class SolidImage:
    """LoadImage's IMAGE, reduced: one random picture of the given size."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"size": ("INT", {"min": 8, "max": 512}), "seed": ("INT", {"min": 0, "max": 1000})}}

    def make(self, size, seed):
        return (torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed)),)


CORE_LIKE = {"CLIPLoader": CLIPLoader, "VAELoader": VAELoader, "CLIPTextEncode": CLIPTextEncode,
             "SolidMask": SolidMask, "FluxGuidance": FluxGuidance, "VAEEncode": VAEEncode,
             "ReferenceLatent": ReferenceLatent, "SolidImage": SolidImage}
