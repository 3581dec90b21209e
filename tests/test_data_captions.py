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
