"""A tiny deterministic text encoder for the demo: one fixed pseudo-random vector per word.

Nothing is learned: a word's vector comes from a SHAKE-256 digest of the word, so
any word, including one never seen in pretraining, gets a distinct embedding that
is identical across processes, machines and library versions.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch

_WORD = re.compile(r"[a-z]+")


class DemoTextEncoder:
    """Maps prompts to per-word context vectors; holds only a cache of word vectors."""

    def __init__(self, dim: int = 32, max_tokens: int = 8) -> None:
        if dim < 1 or max_tokens < 1:
            raise ValueError(f"dim and max_tokens must be >= 1, got dim={dim}, max_tokens={max_tokens}")
        self.dim = dim
        self.max_tokens = max_tokens
        self._vectors: dict[str, torch.Tensor] = {}

    def tokenize(self, prompt: str) -> list[str]:
        """Lowercase words (runs of letters), truncated to `max_tokens`."""
        return _WORD.findall(prompt.lower())[: self.max_tokens]

    def word_vector(self, word: str) -> torch.Tensor:
        """The word's fixed float32 [dim] vector, scaled to RMS 1."""
        vector = self._vectors.get(word)
        if vector is None:
            # Bytes -> uniform in [-1, 1) via a fixed formula (not a numpy/torch RNG,
            # whose streams may change between versions).
            raw = hashlib.shake_256(word.encode("utf-8")).digest(4 * self.dim)
            values = np.frombuffer(raw, dtype="<u4").astype(np.float64) / 2**31 - 1.0
            values /= np.sqrt(np.mean(values**2))
            vector = torch.from_numpy(values.astype(np.float32))
            self._vectors[word] = vector
        return vector

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of prompts.

        Returns `context` float32 [B, L, dim], L = longest token count in the batch
        (at least 1), zeros past each item's length, and `lengths` int64 [B].
        An empty prompt counts as one all-zero token (length 1) so that masked
        attention always has a key to attend to.
        """
        tokens = [self.tokenize(p) for p in prompts]
        lengths = torch.tensor([max(len(t), 1) for t in tokens], dtype=torch.int64)
        longest = int(lengths.max()) if len(tokens) else 1
        context = torch.zeros(len(tokens), longest, self.dim, dtype=torch.float32)
        for i, words in enumerate(tokens):
            for j, word in enumerate(words):
                context[i, j] = self.word_vector(word)
        return context, lengths
