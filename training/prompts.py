"""Sample prompts in the kohya / musubi-tuner line format, turned into preview specs.

One prompt per line; `#` starts a comment line. Options follow the prompt text:

    a magenta circle --n blurry --w 1024 --h 1024 --s 20 --l 4.0 --g 3.5 --fs 3.0 --d 42

    --n  negative prompt        --w / --h  width / height in pixels
    --s  sampling steps         --l        CFG scale (kohya's `scale`)
    --g  distilled guidance     --fs       flow shift (musubi's discrete_flow_shift)
    --d  seed

An option missing from a line takes the caller's default; a line without --d gets
seed `default seed + line index`, so previews stay comparable from one sample step to
the next. Distilled guidance (default 3.5, as ComfyUI's FluxGuidance) is read by
guidance-distilled models (Flux.1-dev, Flux.2 dev); models without a guidance input
ignore it, as they do in ComfyUI.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .conditioning import Conditioning, as_conditioning
from .encoders import Encoders
from .loop import PreviewSpec

DEFAULT_GUIDANCE = 3.5  # --g when a line gives none: ComfyUI's FluxGuidance default
# What a variant samples well with, for lines without --s / --l: Z-Image Turbo is distilled to
# 8 steps without CFG; Base wants about 50 steps at CFG 5 (Tongyi-MAI's model cards).
VARIANT_SAMPLING = {"zimage-turbo": {"steps": 8, "cfg": 1.0}, "zimage-base": {"steps": 50, "cfg": 5.0}}


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 20
    cfg: float = 1.0
    guidance: float | None = None
    shift: float = 3.0
    seed: int = 0


def sampling_defaults(variant: str, **defaults) -> SamplePrompt:
    """Prompt defaults for a base model: its variant's steps / CFG over `defaults`."""
    return replace(SamplePrompt(prompt="", **defaults), **VARIANT_SAMPLING.get(variant, {}))


# option -> (field, converter)
OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "n": ("negative", str),
    "w": ("width", int),
    "h": ("height", int),
    "s": ("steps", int),
    "l": ("cfg", float),
    "g": ("guidance", float),
    "fs": ("shift", float),
    "d": ("seed", int),
}


def parse_prompt_line(line: str, defaults: SamplePrompt, index: int = 0) -> SamplePrompt:
    """One line -> SamplePrompt; an unknown option or a bad value names the option and the line."""
    parts = re.split(r"\s--(?=[a-z]+\b)", " " + line.strip())
    prompt = replace(defaults, prompt=parts[0].strip(), seed=defaults.seed + index)
    for part in parts[1:]:
        name, _, value = part.partition(" ")
        if name not in OPTIONS:
            raise ValueError(f"sample prompt {line!r}: unknown option --{name}; known: {', '.join('--' + o for o in OPTIONS)}")
        field_name, convert = OPTIONS[name]
        try:
            prompt = replace(prompt, **{field_name: convert(value.strip())})
        except ValueError as err:
            kind = "an integer" if convert is int else "a number"
            raise ValueError(f"sample prompt {line!r}: --{name} needs {kind}, got {value.strip()!r}") from err
    if not prompt.prompt:
        raise ValueError(f"sample prompt {line!r} has options but no prompt text")
    if prompt.width < 16 or prompt.height < 16 or prompt.steps < 1:
        raise ValueError(f"sample prompt {line!r}: width/height must be >= 16 and steps >= 1")
    return prompt


def parse_prompts(text: str, defaults: SamplePrompt | None = None) -> list[SamplePrompt]:
    """All prompts of a prompt file's text; blank and `#` lines are skipped."""
    defaults = defaults or SamplePrompt(prompt="")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [parse_prompt_line(line, defaults, i) for i, line in enumerate(lines)]


def preview_specs(prompts: list[SamplePrompt], encoders: Encoders, patch: int = 2,
                  reference_latents: tuple[torch.Tensor, ...] = (),
                  text_images: list[torch.Tensor] | None = None) -> list[PreviewSpec]:
    """One PreviewSpec per prompt (sizes and seeds may differ from line to line).

    `patch`: latent cells per model token side, so sizes are whole tokens. `reference_latents`
    (one-row model-space latents) are the reference images every preview of an edit model sees;
    `text_images` the same images as pixels, for a text encoder that reads them.
    """
    specs = []
    downscale = encoders.latent_downscale
    multiple = downscale * patch
    for p in prompts:
        if p.width % multiple or p.height % multiple:
            raise ValueError(f"sample prompt {p.prompt!r}: --w {p.width} / --h {p.height} must be multiples of {multiple}")
        guidance = DEFAULT_GUIDANCE if p.guidance is None else p.guidance
        cond = encode_prompts(encoders, [p.prompt], text_images).with_guidance(guidance)
        cond = dataclasses.replace(cond, reference_latents=reference_latents)
        negative = encode_prompts(encoders, [p.negative], text_images) if p.cfg != 1.0 else None
        specs.append(
            PreviewSpec(
                cond=cond,
                latent_shape=(encoders.latent_channels, p.height // downscale, p.width // downscale),
                decode=encoders.decode,
                neg_cond=negative,
                steps=p.steps,
                cfg=p.cfg,
                shift=p.shift,
                seed=p.seed,
                captions=[p.prompt],
                label=f"preview {p.prompt!r} at {p.width}x{p.height}",
            )
        )
    return specs


def encode_prompts(encoders: Encoders, prompts: list[str], images: list[torch.Tensor] | None = None) -> Conditioning:
    """Prompts through the text encoder; `images` (the same for every prompt) for one that reads them."""
    if images:
        return as_conditioning(encoders.encode_text(prompts, images=[images] * len(prompts)), len(prompts))
    return as_conditioning(encoders.encode_text(prompts), len(prompts))
