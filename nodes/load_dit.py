"""LoadDiT: a base diffusion transformer from models/diffusion_models, or the embedded demo."""

from __future__ import annotations

from ..kernels.attention import BACKENDS
from ..training.demo.model import BASE_CHECKPOINT, missing_checkpoint_error
from ..training.models.latent_formats import latent_format_for
from ..training.models.setup import WEIGHT_STORAGE, load_base
from ..training.models.zimage import zimage_variant
from . import host
from .inference_mode import outside_inference_mode
from .sockets import CATEGORY, DITT_MODEL, DitModel

DEMO_CHECKPOINT = "[embedded demo] dit_trainer_demo"
VARIANT_CHOICES = {"auto": "", "z-image turbo": "zimage-turbo", "z-image base": "zimage-base"}
AFTER_USE = {"offload to host memory": False, "keep on GPU": True}  # -> DitModel.keep_on_gpu


class LoadDiT:
    DESCRIPTION = (
        "Loads a diffusion transformer (Z-Image, Flux.1 dev / schnell / Kontext, Flux.2 dev / klein) from "
        "models/diffusion_models for training and sampling "
        "with this pack, or the embedded demo model (a tiny Z-Image that runs on a CPU, no downloads)."
    )
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (DITT_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The frozen base model; adapters are attached only inside TrainLoRA / SampleWithLoRA.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (
                    [DEMO_CHECKPOINT, *host.model_files("diffusion_models")],
                    {"tooltip": "Safetensors file in models/diffusion_models (ComfyUI, official or diffusers "
                                "layout), or the embedded demo model. Pickled .ckpt/.pt files are refused."},
                ),
                "weight_dtype": (
                    list(WEIGHT_STORAGE),
                    {"default": "bf16",
                     "tooltip": "Storage of the frozen base weights. bf16 halves memory against fp32; fp32 is "
                                "exact and best on CPU. fp8_e4m3fn / fp8_scaled hold the transformer blocks' "
                                "Linear weights in 8 bits (one scale per tensor / per output row; fp8_scaled "
                                "is the more accurate) and compute in bf16. ComfyUI fp8 / scaled_fp8 files "
                                "stay fp8 as stored whatever is picked here."},
                ),
                "attention": (
                    list(BACKENDS),
                    {"default": "auto",
                     "tooltip": "auto picks FlashAttention-4 (Hopper/Blackwell), then flash-attn 2 (Ampere/Ada), "
                                "then PyTorch SDPA. An explicit choice that cannot run raises with the reason."},
                ),
                "gradient_checkpointing": (
                    "BOOLEAN",
                    {"default": False,
                     "tooltip": "Recompute block activations during backward: much less memory, about 30% slower."},
                ),
            },
            "optional": {  # an optional widget: workflows saved before it existed still validate
                "variant": (list(VARIANT_CHOICES), {
                    "default": "auto",
                    "tooltip": "Z-Image Turbo and Base have the same shapes: auto reads the file's metadata or "
                               "name; set it when neither says. Previews use the variant's sampling (Turbo: 8 "
                               "steps, no CFG; Base: 50 steps, CFG 5) where a prompt line gives no --s / --l."}),
                "blocks_to_swap": ("INT", {
                    "default": 0, "min": 0, "max": 100,
                    "tooltip": "Keep the last N transformer blocks in host memory and copy each to the GPU one "
                               "block ahead of use (forward and backward). Saves about N blocks of VRAM for "
                               "some speed; 0 keeps every block on the GPU."}),
                "compile": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "torch.compile each transformer block (dynamic sequence lengths, so buckets do "
                               "not recompile). The first step compiles for a minute or more."}),
                "after_use": (list(AFTER_USE), {
                    "default": "offload to host memory",
                    "tooltip": "After TrainLoRA / SampleWithLoRA: move this model back to host memory so the "
                               "GPU is free for ComfyUI's own models (KSampler), or keep it on the GPU for "
                               "faster repeated runs."}),
            },
        }

    @outside_inference_mode  # the weights are trained against later: they must not be inference tensors
    def load(self, checkpoint: str, weight_dtype: str, attention: str, gradient_checkpointing: bool,
             variant: str = "auto", blocks_to_swap: int = 0, compile: bool = False,
             after_use: str = "offload to host memory"):
        demo = checkpoint == DEMO_CHECKPOINT
        if demo:
            if not BASE_CHECKPOINT.is_file():
                raise missing_checkpoint_error()
            path = BASE_CHECKPOINT
        else:
            path = host.model_path("diffusion_models", checkpoint)
        model = load_base(path, weight_dtype, attention, blocks_to_swap, compile, option="LoadDiT: weight_dtype")
        architecture = model.architecture
        if architecture == "zimage" and not demo:
            model.variant = zimage_variant(checkpoint, model.source_metadata) if variant == "auto" else VARIANT_CHOICES[variant]
        elif variant != "auto":
            raise ValueError(f"LoadDiT: variant {variant!r} is for Z-Image; {checkpoint} is {model.variant}. Set variant "
                             "to auto")
        return (
            DitModel(
                model=model,
                architecture=architecture,
                name=checkpoint,
                base_hash=model.base_hash,
                latent_format=latent_format_for("demo" if demo else architecture),
                demo=demo,
                gradient_checkpointing=gradient_checkpointing,
                keep_on_gpu=AFTER_USE[after_use],
            ),
        )
