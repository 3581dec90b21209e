"""Caption processing for one draw, in the order of kohya sd-scripts' `process_caption`
(library/train_util.py):

1. caption dropout: with probability `caption_dropout` the caption is "" and nothing else is drawn;
2. a caption file with several lines: one line is picked;
3. wildcards: each `{a|b|c}` group becomes one of its options; `{{` and `}}` are literal braces;
4. with `shuffle_caption`: split on the separator, strip the pieces, keep the first
   `keep_tokens` in place, shuffle the rest, join with ", ". Without shuffling the
   caption is not re-joined (kohya does the same), so `keep_tokens` alone changes nothing.

Deviations from kohya, on purpose:
* every draw comes from a `torch.Generator` the caller seeds per batch (reproducible
  and resumable), not from Python's global `random`;
* wildcards are always on (kohya: `enable_wildcard`); a caption without braces is unchanged,
  and a multi-line caption picks a random line (kohya without wildcards takes the first);
* empty pieces ("a,,b") and empty lines are dropped instead of kept.
Nested groups are not supported (kohya has none either): `}}` is a literal brace, so
`{a|{b|c}}` cannot be told apart from a group followed by an escaped brace.
"""

from __future__ import annotations

import re

import torch

from .config import DataConfig

_GROUP = re.compile(r"\{([^{}]+)\}")
# Escaped braces are parked on control characters that cannot occur in a text caption.
_OPEN, _CLOSE = "\x00", "\x01"


def _pick(options: list[str], generator: torch.Generator | None) -> str:
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def expand_wildcards(caption: str, generator: torch.Generator | None) -> str:
    """Replace every `{a|b|...}` group by one of its options, drawn left to right."""
    text = caption.replace("{{", _OPEN).replace("}}", _CLOSE)
    text = _GROUP.sub(lambda group: _pick(group.group(1).split("|"), generator), text)
    return text.replace(_OPEN, "{").replace(_CLOSE, "}")


def _lines(caption: str) -> list[str]:
    return [line.strip() for line in caption.split("\n") if line.strip()]


def process_caption(caption: str, cfg: DataConfig, generator: torch.Generator) -> str:
    """One training draw of `caption` (see the module docstring for the order of steps)."""
    if cfg.caption_dropout > 0 and float(torch.rand((), generator=generator)) < cfg.caption_dropout:
        return ""
    lines = _lines(caption)
    if not lines:
        return ""
    text = lines[0] if len(lines) == 1 else _pick(lines, generator)
    text = expand_wildcards(text, generator)
    if cfg.shuffle_caption:
        pieces = [piece.strip() for piece in text.split(cfg.caption_separator) if piece.strip()]
        kept, shuffled = pieces[: cfg.keep_tokens], pieces[cfg.keep_tokens :]
        order = torch.randperm(len(shuffled), generator=generator).tolist()
        text = ", ".join(kept + [shuffled[i] for i in order])
    return text


def fixed_caption(caption: str, cfg: DataConfig) -> str | None:
    """The caption every draw gives when processing involves no randomness, else None.

    Such captions are encoded once up front, so training never needs the text encoder for them.
    """
    lines = _lines(caption)
    if cfg.caption_dropout > 0 or cfg.shuffle_caption or len(lines) > 1:
        return None
    text = lines[0] if lines else ""
    if _GROUP.search(text.replace("{{", _OPEN).replace("}}", _CLOSE)):
        return None
    return expand_wildcards(text, None)
