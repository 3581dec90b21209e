"""DatasetFromFolder: images + same-stem captions (+ masks/) encoded with the connected CLIP and VAE."""

from __future__ import annotations

from pathlib import Path

from ..training.data.config import MASK_MODES, DataConfig
from ..training.data.files import dataset_fingerprint, folder_state
from ..training.data.folder_dataset import FolderDataset
from ..training.demo.dataset_folder import write_demo_dataset
from . import host
from .comfy_io import dataset_encoders
from .edit_text_encoding import STYLES
from .inference_mode import outside_inference_mode
from .sockets import CATEGORY, DITT_DATASET, DITT_MODEL, TrainingSet

DEMO_FOLDER = "[embedded demo] magenta shapes"
DEMO_INPUT_SUBFOLDER = "dit_trainer_demo_magenta_shapes"  # written under ComfyUI's input directory
_DEFAULTS = DataConfig()


def folder_path(folder: str) -> Path:
    """Where `folder` points: an absolute path, or a path under ComfyUI's input directory."""
    path = Path(folder.strip()).expanduser()
    return path if path.is_absolute() else host.input_dir() / path


def resolve_folder(folder: str) -> Path:
    """The dataset folder; the demo's is written on first use."""
    if folder == DEMO_FOLDER:
        return write_demo_dataset(host.input_dir() / DEMO_INPUT_SUBFOLDER)
    path = folder_path(folder)
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset folder {path} does not exist; give an absolute path or one relative to ComfyUI's input "
            f"directory ({host.input_dir()})"
        )
    return path


class DatasetFromFolder:
    DESCRIPTION = (
        "Reads a training folder: images with same-stem .txt captions, optional masks/ subfolder (white = train "
        "here) or alpha channel, 'N_name' subfolders repeated N times, and for edit models a control_folder of "
        "same-stem reference images. Images are encoded with the connected VAE "
        "and captions with the connected CLIP, cached on disk under the folder's .dit_cache/. With the embedded "
        "demo model leave CLIP and VAE unconnected."
    )
    CATEGORY = f"{CATEGORY}/data"
    RETURN_TYPES = (DITT_DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = (
        "The encoded dataset (latents in memory, caption embeddings cached).",
        "Images per bucket, masks, skipped files, cache use and the encoder id (the CLI's [data] encoder_id).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        d = _DEFAULTS
        return {
            "required": {
                "model": (DITT_MODEL, {"tooltip": "The base model the dataset is for (sets the latent format)."}),
                "folder": ("STRING", {"default": DEMO_FOLDER,
                                      "tooltip": f"Dataset folder: absolute, or relative to ComfyUI's input folder. "
                                                 f"'{DEMO_FOLDER}' writes and uses the demo's magenta shapes."}),
                "resolution": ("INT", {"default": d.resolution, "min": 16, "max": 8192, "step": 16,
                                       "tooltip": "Training area is resolution² pixels per image (1024 for Z-Image)."}),
                "enable_buckets": ("BOOLEAN", {"default": d.enable_buckets,
                                               "tooltip": "Aspect-ratio buckets. Off: every image is centre-cropped "
                                                          "to a resolution x resolution square."}),
                "bucket_step": ("INT", {"default": d.bucket_step, "min": 4, "max": 512, "step": 4,
                                        "tooltip": "Bucket sides are multiples of this; must be a multiple of "
                                                   "VAE downscale x 2 (16 for Z-Image, 4 for the demo)."}),
                "min_side": ("INT", {"default": d.min_side, "min": 4, "max": 8192, "step": 4,
                                     "tooltip": "Smallest bucket side (buckets only)."}),
                "max_side": ("INT", {"default": d.max_side, "min": 4, "max": 16384, "step": 4,
                                     "tooltip": "Largest bucket side (buckets only)."}),
                "no_upscale": ("BOOLEAN", {"default": d.no_upscale,
                                           "tooltip": "Buckets follow each image's own size and images are never "
                                                      "enlarged (needs buckets)."}),
                "repeats": ("INT", {"default": d.repeats, "min": 1, "max": 10000,
                                    "tooltip": "Times each image is seen per epoch ('N_name' subfolders multiply it)."}),
                "caption_extension": ("STRING", {"default": d.caption_extension,
                                                 "tooltip": "Caption files have the image's stem and this extension."}),
                "default_caption": ("STRING", {"default": d.default_caption,
                                               "tooltip": "Caption for images without a caption file (they are listed "
                                                          "in the log)."}),
                "shuffle_caption": ("BOOLEAN", {"default": d.shuffle_caption,
                                                "tooltip": "Shuffle the separator-split pieces of each caption per draw "
                                                           "(re-encodes new variants with the CLIP while training)."}),
                "keep_tokens": ("INT", {"default": d.keep_tokens, "min": 0, "max": 255,
                                        "tooltip": "With shuffle: the first N pieces stay in place."}),
                "caption_separator": ("STRING", {"default": d.caption_separator,
                                                 "tooltip": "Splits captions into pieces for shuffling."}),
                "caption_dropout": ("FLOAT", {"default": d.caption_dropout, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "Probability that a draw trains on the empty caption."}),
                "masks": (list(MASK_MODES), {"default": d.masks,
                                             "tooltip": "auto: masks/<stem>.* if the folder has masks/, else a "
                                                        "non-opaque alpha channel. folder / alpha: only that source. "
                                                        "none: no masks. Masks weigh the loss via WeightedMask."}),
                "cache_latents_to_disk": ("BOOLEAN", {"default": d.cache_latents_to_disk,
                                                      "tooltip": "Keep latents and caption embeddings under "
                                                                 "<folder>/.dit_cache, so the next run skips encoding."}),
            },
            "optional": {  # optional widgets: workflows saved before they existed still validate
                "control_folder": ("STRING", {"default": d.control_folder,
                                              "tooltip": "Edit training (Flux.1 Kontext, Flux.2): subfolder with each "
                                                         "image's control image, same stem (or <stem>_0, <stem>_1 ... "
                                                         "for several), encoded with the VAE. Empty: plain training."}),
                "edit_text_encoder": (list(STYLES), {
                    "default": STYLES[0],
                    "tooltip": "Qwen-Image-Edit reads the control image with the caption: encode captions as the "
                               "node you will prompt with does (Plus for Edit-2509 / 2511, the plain node for the "
                               "first Edit). Other models ignore it."}),
                "trigger_word": ("STRING", {"default": d.trigger_word,
                                            "tooltip": "Put in front of every caption that lacks it (after "
                                                       "shuffling, so it stays first); [trigger] in a caption "
                                                       "becomes it. Empty: off."}),
                "caption_prefix": ("STRING", {"default": d.caption_prefix,
                                              "tooltip": "Text added before every caption (kohya caption_prefix)."}),
                "caption_suffix": ("STRING", {"default": d.caption_suffix,
                                              "tooltip": "Text added after every caption (kohya caption_suffix)."}),
                "keep_tokens_separator": ("STRING", {"default": d.keep_tokens_separator,
                                                     "tooltip": "e.g. |||: 'fixed ||| shuffled ||| fixed end' keeps "
                                                                "the first and last parts in place when shuffling."}),
                "secondary_separator": ("STRING", {"default": d.secondary_separator,
                                                   "tooltip": "e.g. ;;;: words joined by it shuffle as one piece "
                                                              "and become ', ' in the caption."}),
                "class_word": ("STRING", {"default": d.class_word,
                                          "tooltip": "Differential output preservation (TrainLoRA dop_weight): the "
                                                     "word that replaces trigger_word in the class prompts, e.g. "
                                                     "'man'. Empty: off."}),
                "augment_variants": ("INT", {"default": d.augment_variants, "min": 0, "max": 64,
                                             "tooltip": "Augmented copies of each image, each encoded once and "
                                                        "cached under its own key; every draw picks one. 0 = no "
                                                        "augmentation. Costs one VAE pass and one latent per copy."}),
                "flip_aug": ("BOOLEAN", {"default": d.flip_aug,
                                         "tooltip": "Augmented copies flip left-right half of the time (not for "
                                                    "subjects whose sides differ, e.g. text or asymmetric logos)."}),
                "random_crop_scale": ("FLOAT", {"default": d.random_crop_scale, "min": 0.1, "max": 1.0, "step": 0.01,
                                                "tooltip": "Augmented copies crop a window of this to 1.0 of the "
                                                           "side and scale it back up; 1.0 = no crop. Not with "
                                                           "masks."}),
                "color_jitter": ("FLOAT", {"default": d.color_jitter, "min": 0.0, "max": 0.9, "step": 0.01,
                                           "tooltip": "Augmented copies scale brightness, contrast and saturation "
                                                      "by 1 +- this; 0 = none."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder (not needed for the embedded demo)."}),
                "vae": ("VAE", {"tooltip": "The model's VAE (not needed for the embedded demo)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder: str, **_):
        # ComfyUI re-runs a node when this value changes: edits inside the folder count as new input.
        path = folder_path(folder)
        return folder_state(path) if folder != DEMO_FOLDER and path.is_dir() else folder

    @outside_inference_mode  # latents and caption states are trained on later
    def load(self, model, folder: str, clip=None, vae=None, edit_text_encoder: str = STYLES[0], **options):
        encoders = dataset_encoders(model, clip, vae, "DatasetFromFolder", edit_text_encoder)
        path = resolve_folder(folder)
        cfg = DataConfig(**options)
        data = FolderDataset.from_folder(
            path, cfg, encoders.encode_images, encoders.encode_text, encoders.latent_downscale, encoders.encoder_id,
            patch=model.model.cfg.patch_size, text_reads_controls=encoders.text_reads_images,
        )
        summary = f"{path}\n{data.summary()}\nencoder id: {encoders.encoder_id}"
        fingerprint = dataset_fingerprint(path, cfg, encoders.encoder_id)
        return (TrainingSet(data, encoders, fingerprint, summary), summary)
