"""Encoder-output caches keyed by content, so a second run starts without encoding.

* Latents: one safetensors file per image, <cache_dir>/latents/<key>.safetensors, with
  key = sha256(format version, encoder_id, latent downscale, image bytes, mask source and
  mask bytes, bucket, resize, crop), and for each augmented variant (augment.py) one more
  file whose key also holds the augmentation's parameters. See `latent_key`.
* Text: one file per caption string, <cache_dir>/text/<key>.safetensors (its states and,
  for encoders that give one, its pooled vector), with
  key = sha256(format version, encoder_id, caption), plus an in-memory LRU. Shuffled,
  dropped and wildcard variants are separate strings, each encoded once on first use.
  A text encoder that also reads the edit pair's control images (Qwen-Image-Edit, as
  TextEncodeQwenImageEdit) gets them with the caption, and their bytes join the key.

A changed image, mask, caption, encoder or bucket gives a new key, so a stale entry is
never read. Old entries are not pruned: another dataset, or the same one under other
settings, may share the folder and still need them. Deleting the cache folder is always safe.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import torch

from ..conditioning import Conditioning, as_conditioning
from ..encoders import TextEncoder
from ..storage import atomic_save_safetensors, finite_or_raise, read_safetensors
from .buckets import Placement
from .images import decode_image

log = logging.getLogger(__name__)

CACHE_FIX = "set cache_dir to a writable folder with free space, or turn cache_latents_to_disk off"
CACHE_FORMAT_VERSION = "1"  # bump when the stored tensors change meaning
# With caption shuffling the number of distinct caption strings grows without bound,
# so only this much of their embeddings stays in memory; the rest is re-read from disk.
TEXT_MEMORY_BUDGET_BYTES = 2 << 30


def content_key(*parts: bytes | str) -> str:
    """sha256 over length-prefixed parts, so that no two part lists hash alike."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def latent_key(
    encoder_id: str, downscale: int, image_bytes: bytes, mask_source: str, mask_bytes: bytes, placement: Placement,
    augmentation: str = "",
) -> str:
    """`augmentation` (Augmentation.key) names an augmented variant; the plain image's key has none."""
    geometry = f"bucket={placement.bucket} resized={placement.resized} crop={placement.crop} downscale={downscale}"
    parts = (CACHE_FORMAT_VERSION, encoder_id, geometry, image_bytes, mask_source, mask_bytes)
    return content_key(*parts, f"augmentation {augmentation}") if augmentation else content_key(*parts)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a cache entry atomically; a folder that cannot take it is an error naming the cache options."""
    atomic_save_safetensors(tensors, path, metadata, CACHE_FIX)


def load_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors in `path`, or None when it is missing or unreadable (then it is re-encoded)."""
    if not path.is_file():
        return None
    try:
        return read_safetensors(path, "cache entry")[0]
    except (ValueError, OSError) as error:  # a truncated or foreign file is a cache miss, not a failure
        log.warning("ignoring unreadable cache file %s (%s); it will be re-encoded", path, error)
        return None


def _nbytes(record: Conditioning) -> int:
    return sum(t.numel() * t.element_size() for t in (record.context, record.pooled) if t is not None)


def _stored(record: Conditioning) -> dict[str, torch.Tensor]:
    tensors = {"states": record.context[0]}
    if record.pooled is not None:
        tensors["pooled"] = record.pooled[0]
    return tensors


def _from_stored(tensors: dict[str, torch.Tensor]) -> Conditioning | None:
    states = tensors.get("states")
    if states is None:
        return None
    pooled = tensors.get("pooled")
    return Conditioning(states[None], torch.tensor([states.shape[0]]), None if pooled is None else pooled[None])


class TextEmbeddingCache:
    """Caption string -> its one-row conditioning record (states trimmed to its length, pooled
    vector), from memory, disk, or the encoder."""

    def __init__(self, encode_text: TextEncoder, encoder_id: str, folder: Path | None) -> None:
        self.encode_text = encode_text
        self.encoder_id = encoder_id
        self.folder = folder  # None: memory only
        self._memory: OrderedDict[str, Conditioning] = OrderedDict()
        self._memory_bytes = 0
        self._digests: dict[Path, str] = {}

    def key(self, caption: str, images: tuple[Path, ...] = ()) -> str:
        return content_key(CACHE_FORMAT_VERSION, self.encoder_id, caption, *(self._digest(p) for p in images))

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._digests[path]

    def _remember(self, key: str, record: Conditioning) -> None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        self._memory[key] = record
        self._memory_bytes += _nbytes(record)
        while self._memory_bytes > TEXT_MEMORY_BUDGET_BYTES and len(self._memory) > 1:
            _, evicted = self._memory.popitem(last=False)
            self._memory_bytes -= _nbytes(evicted)

    def _lookup(self, key: str) -> Conditioning | None:
        record = self._memory.get(key)
        if record is None and self.folder is not None:
            stored = load_tensors(self.folder / f"{key}.safetensors")
            record = None if stored is None else _from_stored(stored)
        if record is not None:
            self._remember(key, record)
        return record

    def get(self, captions: list[str], images: list[tuple[Path, ...]] | None = None) -> list[Conditioning]:
        """One-row records per caption (with its control images, for encoders that read them); all
        uncached ones go to the encoder in one call."""
        requests = list(zip(captions, images or [()] * len(captions)))
        keys = {request: self.key(*request) for request in dict.fromkeys(requests)}
        found = {request: self._lookup(key) for request, key in keys.items()}
        missing = [request for request, record in found.items() if record is None]
        if missing:
            for request, record in zip(missing, self._encode(missing)):
                if self.folder is not None:
                    save_tensors(self.folder / f"{keys[request]}.safetensors", _stored(record))
                self._remember(keys[request], record)
                found[request] = record
        return [found[request] for request in requests]

    def _encode(self, requests: list[tuple[str, tuple[Path, ...]]]) -> list[Conditioning]:
        captions = [caption for caption, _ in requests]
        with torch.no_grad():
            if any(images for _, images in requests):
                pixels = [[decode_image(path.read_bytes())[0] for path in images] for _, images in requests]
                output = self.encode_text(captions, images=pixels)
            else:
                output = self.encode_text(captions)
            output = as_conditioning(output, len(captions))
        # A broken text encoder (bad weights, fp16 overflow) must be named here, not surface later
        # as "non-finite losses" with advice about the learning rate.
        tensors = {"states": output.context} | ({} if output.pooled is None else {"pooled": output.pooled})
        more = f" and {len(captions) - 1} more caption(s)" if len(captions) > 1 else ""
        finite_or_raise(tensors, f"the text encoder's output for {captions[0]!r}{more} (check the text-encoder file "
                                 "and its dtype)")
        # Trimmed to each length: the contract says states past it are zero padding.
        return [
            Conditioning(output.context[i : i + 1, : int(n)].detach().cpu().clone(), torch.tensor([int(n)]),
                         None if output.pooled is None else output.pooled[i : i + 1].detach().cpu().clone())
            for i, n in enumerate(output.context_lens)
        ]
