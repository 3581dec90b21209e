"""Caption processing: keep_tokens, shuffle, wildcards, dropout, their order and determinism."""

from collections import Counter

import pytest
import torch

from dit_trainer.training.data.captions import expand_wildcards, fixed_caption, process_caption
from dit_trainer.training.data.config import DataConfig

DRAWS = 3000


def draws(caption: str, cfg: DataConfig, n: int = DRAWS, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [process_caption(caption, cfg, generator) for _ in range(n)]


def pieces(caption: str) -> list[str]:
    return caption.split(", ")


def test_shuffle_keeps_the_first_keep_tokens_and_permutes_the_rest_uniformly():
    cfg = DataConfig(shuffle_caption=True, keep_tokens=2)
    results = draws("a, b, c, d, e, f", cfg)
    assert all(pieces(r)[:2] == ["a", "b"] for r in results)
    assert all(sorted(pieces(r)[2:]) == ["c", "d", "e", "f"] for r in results)
    # Each shuffled piece lands in each of the 4 free positions with probability 1/4.
    for position in range(2, 6):
        counts = Counter(pieces(r)[position] for r in results)
        for piece in "cdef":
            assert abs(counts[piece] / DRAWS - 0.25) < 0.035, (position, counts)


def test_keep_tokens_zero_shuffles_everything_and_strips_pieces():
    results = draws("  x ,y,  z  ", DataConfig(shuffle_caption=True), n=600)
    assert {tuple(sorted(pieces(r))) for r in results} == {("x", "y", "z")}
    assert len(set(results)) == 6  # all 3! orders occur


def test_custom_separator_splits_but_joins_with_comma_space():
    results = draws("p|q|r", DataConfig(shuffle_caption=True, caption_separator="|"), n=200)
    assert {tuple(sorted(pieces(r))) for r in results} == {("p", "q", "r")}


def test_without_shuffle_the_caption_is_untouched_even_with_keep_tokens():
    # kohya only splits and re-joins when shuffling (or tag dropout) is on.
    caption = "a photo,of   a cat ,  sitting"
    assert set(draws(caption, DataConfig(keep_tokens=1), n=50)) == {caption}


def test_empty_pieces_are_dropped():
    results = draws("a,, b ,", DataConfig(shuffle_caption=True), n=100)
    assert {tuple(sorted(pieces(r))) for r in results} == {("a", "b")}


def test_same_seed_same_draws_different_seed_different_draws():
    cfg = DataConfig(shuffle_caption=True, keep_tokens=1, caption_dropout=0.2)
    caption = "{red|green|blue} cat, sits, on a mat, at noon, quietly"
    assert draws(caption, cfg, n=50, seed=7) == draws(caption, cfg, n=50, seed=7)
    assert draws(caption, cfg, n=50, seed=7) != draws(caption, cfg, n=50, seed=8)


def test_wildcard_options_are_picked_uniformly_and_groups_independently():
    results = draws("a {red|green|blue} {cat|dog}", DataConfig())
    colours = Counter(r.split()[1] for r in results)
    animals = Counter(r.split()[2] for r in results)
    assert set(colours) == {"red", "green", "blue"} and set(animals) == {"cat", "dog"}
    assert all(abs(c / DRAWS - 1 / 3) < 0.035 for c in colours.values())
    assert all(abs(c / DRAWS - 1 / 2) < 0.035 for c in animals.values())
    pairs = Counter((r.split()[1], r.split()[2]) for r in results)
    assert all(abs(c / DRAWS - 1 / 6) < 0.03 for c in pairs.values()) and len(pairs) == 6


def test_double_braces_are_literal_braces():
    assert expand_wildcards("a {{b}} {c}", torch.Generator().manual_seed(0)) == "a {b} c"
    assert set(draws("{{x|y}}", DataConfig(), n=20)) == {"{x|y}"}


def test_wildcards_expand_before_the_caption_is_split_for_shuffling():
    # The chosen option "a, b" must be split into two pieces, which only happens if
    # wildcards are expanded first (kohya's order).
    results = draws("{a, b|c}, d", DataConfig(shuffle_caption=True), n=400)
    assert {tuple(sorted(pieces(r))) for r in results} == {("a", "b", "d"), ("c", "d")}


def test_multi_line_captions_pick_one_line_per_draw():
    counts = Counter(draws("first line\n\n  second line  \n", DataConfig(), n=400))
    assert set(counts) == {"first line", "second line"}
    assert abs(counts["first line"] / 400 - 0.5) < 0.1


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_caption_dropout_empties_the_whole_caption_at_its_rate(rate):
    results = draws("{x|y}, a, b", DataConfig(caption_dropout=rate, shuffle_caption=True, keep_tokens=1))
    dropped = sum(r == "" for r in results) / DRAWS
    assert abs(dropped - rate) < 0.035
    assert all(r == "" or len(pieces(r)) == 3 for r in results)  # never a partial caption


def test_fixed_caption_is_none_exactly_when_a_draw_is_random():
    plain = DataConfig()
    assert fixed_caption("  a cat, on a mat \n", plain) == "a cat, on a mat"
    assert fixed_caption("{{literal}} braces", plain) == "{literal} braces"
    assert fixed_caption("a {red|blue} cat", plain) is None
    assert fixed_caption("one\ntwo", plain) is None
    assert fixed_caption("a cat", DataConfig(shuffle_caption=True)) is None
    assert fixed_caption("a cat", DataConfig(caption_dropout=0.1)) is None
    # Whenever it is not None, it is what every draw gives.
    assert set(draws("{{literal}} braces", plain, n=5)) == {"{literal} braces"}


def test_prefix_and_suffix_wrap_the_caption_and_stay_fixed():
    cfg = DataConfig(caption_prefix="photo of", caption_suffix="high quality")
    assert draws("a dog", cfg, n=3) == ["photo of a dog high quality"] * 3
    assert fixed_caption("a dog", cfg) == "photo of a dog high quality"
    # With shuffling the prefix is the first piece, so keep_tokens=1 keeps it in front.
    shuffled = draws("a, b, c", DataConfig(caption_prefix="ohwx,", shuffle_caption=True, keep_tokens=1), n=200)
    assert all(r.startswith("ohwx, ") for r in shuffled) and len(set(shuffled)) == 6


def test_keep_tokens_separator_keeps_the_head_and_tail_and_shuffles_the_middle():
    cfg = DataConfig(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)
    results = draws("ohwx, man ||| a, b, c ||| masterpiece", cfg, n=600)
    assert all(pieces(r)[:2] == ["ohwx", "man"] and pieces(r)[-1] == "masterpiece" for r in results)
    assert {tuple(sorted(pieces(r)[2:5])) for r in results} == {("a", "b", "c")}
    assert len(set(results)) == 6
    # Without shuffling the separator is resolved, not left in the text.
    assert fixed_caption("x ||| y, z", DataConfig(keep_tokens_separator="|||")) == "x, y, z"


def test_secondary_separator_moves_words_as_one_piece():
    cfg = DataConfig(shuffle_caption=True, secondary_separator=";;;")
    results = draws("red;;;hat, b, c", cfg, n=600)
    assert all("red, hat" in r for r in results)  # never split apart by the shuffle
    assert len(set(results)) == 6
    assert fixed_caption("a;;;b", DataConfig(secondary_separator=";;;")) == "a, b"


def test_trigger_word_goes_first_once_and_fills_placeholders():
    cfg = DataConfig(trigger_word="ohwx", shuffle_caption=True)
    results = draws("a, b, c", cfg, n=300)
    assert all(pieces(r)[0] == "ohwx" for r in results) and len(set(results)) == 6
    plain = DataConfig(trigger_word="ohwx")
    assert fixed_caption("photo of [trigger] man", plain) == "photo of ohwx man"
    assert fixed_caption("ohwx on a beach", plain) == "ohwx on a beach"
    assert fixed_caption("", plain) == "ohwx"
    dropped = draws("a", DataConfig(trigger_word="ohwx", caption_dropout=1.0), n=5)
    assert dropped == [""] * 5  # unconditional draws stay unconditional


def test_defaults_leave_captions_as_before_and_bad_separators_are_refused():
    assert fixed_caption("a ,b", DataConfig()) == "a ,b"  # not re-joined without shuffling
    with pytest.raises(ValueError, match="must differ from caption_separator"):
        DataConfig(keep_tokens_separator=",")
