"""Caption processing for one draw, in the order of kohya sd-scripts' `process_caption`
(library/train_util.py):

1. caption dropout: with probability `caption_dropout` the caption is "" and nothing else is drawn;
2. a caption file with several lines: one line is picked;
3. wildcards: each `{a|b|c}` group becomes one of its options; `{{` and `}}` are literal braces;
4. `caption_prefix` / `caption_suffix` are added (kohya: prefix + " " + caption + " " + suffix);
5. with `shuffle_caption`: split on the separator, strip the pieces, keep the first
   `keep_tokens` in place, shuffle the rest, join with ", ". Without shuffling the
   caption is not re-joined (kohya does the same), so `keep_tokens` alone changes nothing.
   With `keep_tokens_separator` (kohya's, e.g. "|||") in the caption, "fixed ||| shuffled |||
   fixed suffix": the part before it stays in place, the part after it is shuffled and an
   optional third part after a second separator stays at the end (keep_tokens is then unused);
   `secondary_separator` (kohya's, e.g. ";;;") joins words into one piece that moves as a unit
   and becomes ", " in the result;
6. `trigger_word`: "[trigger]" in the caption becomes the word; a caption without the word gets
   it in front ("word, caption"), after shuffling, so it is always first (ai-toolkit's
   trigger_word). A dropped caption stays empty: the unconditional draws teach no trigger.

Deviations from kohya, on purpose:
* every draw comes from a `torch.Generator` the caller seeds per batch (reproducible
  and resumable), not from Python's global `random`;
* wildcards are always on (kohya: `enable_wildcard`); a caption without braces is unchanged,
  and a multi-line caption picks a random line (kohya without wildcards takes the first);
* empty pieces ("a,,b") and empty lines are dropped instead of kept;
* prefix and suffix go on the picked line of a multi-line caption (kohya: on the whole text, so
  only the first and last lines get them);
* a keep_tokens_separator is resolved without shuffling too (kohya leaves it in the text).
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


def _pieces(text: str, separator: str) -> list[str]:
    return [piece.strip() for piece in text.split(separator) if piece.strip()]


def _arrange(text: str, cfg: DataConfig, generator: torch.Generator | None) -> str:
    """Steps 4 and 5: prefix / suffix, then the fixed, shuffled and fixed-suffix pieces joined."""
    text = " ".join(part for part in (cfg.caption_prefix, text, cfg.caption_suffix) if part)
    by_separator = bool(cfg.keep_tokens_separator) and cfg.keep_tokens_separator in text
    if cfg.shuffle_caption or by_separator:
        if by_separator:
            fixed, flexible, *tail = text.split(cfg.keep_tokens_separator, 2)
            kept, suffix = _pieces(fixed, cfg.caption_separator), _pieces("".join(tail), cfg.caption_separator)
            moving = _pieces(flexible, cfg.caption_separator)
        else:
            pieces = _pieces(text, cfg.caption_separator)
            kept, moving, suffix = pieces[: cfg.keep_tokens], pieces[cfg.keep_tokens :], []
        if cfg.shuffle_caption:
            moving = [moving[i] for i in torch.randperm(len(moving), generator=generator).tolist()]
        text = ", ".join(kept + moving + suffix)
    return text.replace(cfg.secondary_separator, ", ") if cfg.secondary_separator else text


def with_trigger(text: str, trigger_word: str) -> str:
    """Step 6: "[trigger]" becomes the word; a caption without it gets it in front."""
    if not trigger_word or trigger_word in text:
        return text
    if "[trigger]" in text:
        return text.replace("[trigger]", trigger_word)
    return f"{trigger_word}, {text}" if text else trigger_word


def class_prompt(caption: str, cfg: DataConfig) -> str:
    """A processed caption with the trigger word replaced by the class word (differential output preservation)."""
    return caption.replace(cfg.trigger_word, cfg.class_word)


def process_caption(caption: str, cfg: DataConfig, generator: torch.Generator) -> str:
    """One training draw of `caption` (see the module docstring for the order of steps)."""
    if cfg.caption_dropout > 0 and float(torch.rand((), generator=generator)) < cfg.caption_dropout:
        return ""
    lines = _lines(caption)
    text = "" if not lines else lines[0] if len(lines) == 1 else _pick(lines, generator)
    text = expand_wildcards(text, generator)
    return with_trigger(_arrange(text, cfg, generator), cfg.trigger_word)


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
    return with_trigger(_arrange(expand_wildcards(text, None), cfg, None), cfg.trigger_word)
