"""WeightedMask: per-pixel loss weights from the dataset's own masks or a connected MASK batch."""

from __future__ import annotations

import hashlib

import torch

from ..training.data.files import weighted_fingerprint
from .inference_mode import outside_inference_mode
from .sockets import CATEGORY, DITT_DATASET, TrainingSet


def masks_per_item(mask: torch.Tensor, count: int) -> list[torch.Tensor]:
    """MASK [B, H, W] -> one [H, W] mask per dataset image: B == count, or one mask for all."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.shape[0] not in (1, count):
        raise ValueError(
            f"WeightedMask: got a batch of {mask.shape[0]} masks for {count} dataset images; "
            f"connect {count} masks (in the dataset's file order) or a single mask for all images"
        )
    return [mask[0 if mask.shape[0] == 1 else i] for i in range(count)]


class WeightedMask:
    DESCRIPTION = (
        "Weights the training loss per pixel: w = mask^gamma * (1 - min_weight) + min_weight, and the loss is the "
        "weighted mean. Uses the dataset's own masks (masks/ folder or alpha), or a connected MASK "
        "(1 = train here; LoadImage's MASK is 1 where the image is transparent or painted in the mask editor)."
    )
    CATEGORY = f"{CATEGORY}/data"
    RETURN_TYPES = (DITT_DATASET,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The dataset with per-pixel loss weights.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": (DITT_DATASET, {"tooltip": "A dataset from DatasetFromFolder."}),
                "mask_gamma": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 10.0, "step": 0.01,
                                         "tooltip": "Exponent on the mask: >1 sharpens a soft mask, <1 widens it."}),
                "mask_min_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "Weight outside the mask. 0 ignores unmasked pixels; a little "
                                                         "(0.05-0.2) keeps the background from drifting."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Masks replacing the dataset's own: one per image (dataset file order) "
                                             "at each image's size, or one mask for all images."}),
            },
        }

    @outside_inference_mode  # the loss weights take part in backward
    def apply(self, dataset: TrainingSet, mask_gamma: float, mask_min_weight: float, mask: torch.Tensor | None = None):
        masks = None if mask is None else masks_per_item(mask, len(dataset.data.items))
        weighted = dataset.data.with_mask_weights(mask_gamma, mask_min_weight, masks)
        mask_hash = "" if mask is None else hashlib.sha256(mask.detach().float().cpu().numpy().tobytes()).hexdigest()
        fingerprint = weighted_fingerprint(dataset.fingerprint, mask_gamma, mask_min_weight, mask_hash)
        summary = f"{dataset.summary}\nmask weights: gamma {mask_gamma:g}, min weight {mask_min_weight:g}"
        return (TrainingSet(weighted, dataset.encoders, fingerprint, summary),)
