"""The conditioning record: everything a model reads besides the noisy latents and sigma.

One record type carries what every architecture needs, so datasets, caches, sample
prompts, the sampler and the loop pass it through without knowing which model runs:

    context            (B, L, D) text states, zero past each row's length
    context_lens       (B,) valid text tokens per row
    pooled             (B, P) pooled text vector (Flux.1: CLIP-L), or None
    guidance           (B,) distilled-guidance value (Flux.1-dev, Flux.2 dev), or None
    reference_latents  one (B, C, h, w) model-space latent per reference image
                       (Kontext / Flux.2 edit training), or none

Each model class names the optional fields it reads in `conditioning_fields`;
`model_inputs` hands a model exactly those. A pooled vector or guidance value the model
has no input for is dropped, as ComfyUI does (its CLIP gives every model a pooled
output; FluxGuidance on a schnell model changes nothing), but reference images a model
cannot see are an error: training an edit pair on them would silently learn the wrong task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

OPTIONAL_FIELDS = ("pooled", "guidance", "reference_latents")


@dataclass
class Conditioning:
    context: torch.Tensor
    context_lens: torch.Tensor
    pooled: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    reference_latents: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.reference_latents = tuple(self.reference_latents)
        if self.context.ndim != 3:
            raise ValueError(f"text states must be [batch, tokens, width], got shape {tuple(self.context.shape)}")
        rows = self.context.shape[0]
        for name, tensor in (("context_lens", self.context_lens), ("pooled", self.pooled),
                             ("guidance", self.guidance), *(("reference latent", r) for r in self.reference_latents)):
            if tensor is not None and tensor.shape[0] != rows:
                raise ValueError(f"conditioning {name} has {tensor.shape[0]} rows but the text states have {rows}")

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    @property
    def tokens(self) -> int:
        return self.context.shape[1]

    @classmethod
    def collate(cls, records: Sequence[Conditioning]) -> Conditioning:
        """Stack records row-wise; text states are zero-padded to the longest."""
        if not records:
            raise ValueError("no conditioning records to collate")
        longest = max(1, max(r.tokens for r in records))  # an all-empty batch still has one (zero) token
        pooled = [r.pooled for r in records]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("some conditioning records have a pooled vector and some do not; encode every prompt "
                             "with the same text encoder")
        guidance = [r.guidance for r in records]
        if any(g is None for g in guidance) and not all(g is None for g in guidance):
            raise ValueError("some conditioning records carry a guidance value and some do not")
        counts = {len(r.reference_latents) for r in records}
        if len(counts) > 1:
            raise ValueError(f"conditioning records have different numbers of reference images ({sorted(counts)}); "
                             "give every training pair the same number of control images")
        references = tuple(torch.cat(parts) for parts in zip(*(r.reference_latents for r in records)))
        return cls(
            context=torch.cat([F.pad(r.context, (0, 0, 0, longest - r.tokens)) for r in records]),
            context_lens=torch.cat([r.context_lens for r in records]),
            pooled=None if pooled[0] is None else torch.cat(pooled),
            guidance=None if guidance[0] is None else torch.cat(guidance),
            reference_latents=references,
        )

    def rows(self, index: torch.Tensor | Sequence[int]) -> Conditioning:
        """The records of the given rows, in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Conditioning(self.context[index], self.context_lens[index], pick(self.pooled), pick(self.guidance),
                            tuple(r[index] for r in self.reference_latents))

    def expand(self, batch: int) -> Conditioning:
        """A one-row record repeated to `batch` rows (one negative prompt for a batch of positives)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"cannot expand a conditioning of {self.batch} rows to {batch}")
        return self.rows([0] * batch)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """On `device`; floating tensors (states, pooled, references) cast to `dtype` when given."""
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
        return Conditioning(move(self.context), self.context_lens.to(device), move(self.pooled),
                            None if self.guidance is None else self.guidance.to(device),
                            tuple(move(r) for r in self.reference_latents))

    def with_guidance(self, value: float | None) -> Conditioning:
        """Every row at distilled-guidance `value` (None removes it)."""
        guidance = None if value is None else torch.full((self.batch,), float(value))
        return replace(self, guidance=guidance)

    def model_inputs(self, model: torch.nn.Module) -> dict[str, object]:
        """Keyword arguments for `model(x, sigma, **inputs)`: the text and the optional fields the model reads."""
        reads = set(getattr(model, "conditioning_fields", ()))
        if self.reference_latents and "reference_latents" not in reads:
            raise ValueError(
                f"the conditioning carries {len(self.reference_latents)} reference image(s), but the "
                f"{getattr(model, 'architecture', type(model).__name__)} model has no reference-image input; train "
                "edit pairs on an edit model (Flux.1 Kontext, Flux.2, Qwen-Image-Edit) or drop the control images"
            )
        inputs: dict[str, object] = {"context": self.context, "context_lens": self.context_lens}
        if "pooled" in reads:
            inputs["pooled"] = self.pooled
        if "guidance" in reads:
            inputs["guidance"] = self.guidance
        if "reference_latents" in reads and self.reference_latents:
            inputs["reference_latents"] = list(self.reference_latents)
        return inputs


def as_conditioning(output: Conditioning | tuple[torch.Tensor, torch.Tensor], prompts: int) -> Conditioning:
    """A text encoder's output as a record: encoders of text-only models may return (states, lengths)."""
    if isinstance(output, tuple) and len(output) == 2:
        output = Conditioning(*output)
    if not isinstance(output, Conditioning):
        raise TypeError("the text encoder must return a Conditioning or (states [N, L, D], lengths [N])")
    if output.batch != prompts or tuple(output.context_lens.shape) != (prompts,):
        raise ValueError(
            f"the text encoder returned states {tuple(output.context.shape)} and lengths "
            f"{tuple(output.context_lens.shape)} for {prompts} captions; expected [{prompts}, L, D] and [{prompts}]"
        )
    lens = output.context_lens
    if int(lens.max()) > output.tokens or int(lens.min()) < 0:
        raise ValueError(f"text encoder lengths {lens.tolist()} fall outside 0..{output.tokens}")
    return output
