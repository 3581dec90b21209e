"""Sample prompts in the kohya / musubi line format, and the preview specs built from them."""

import pytest

from dit_trainer.training.demo.encoders import demo_encoders
from dit_trainer.training.prompts import SamplePrompt, parse_prompt_line, parse_prompts, preview_specs

DEFAULTS = SamplePrompt(prompt="", width=64, height=32, steps=12, cfg=1.0, shift=3.0, seed=100)


def test_every_option_is_read():
    p = parse_prompt_line("a red -- dashed circle --n blurry, dark --w 512 --h 768 --s 28 --l 4.5 --g 3.5 --fs 2.0 --d 42", DEFAULTS)
    assert p == SamplePrompt("a red -- dashed circle", "blurry, dark", 512, 768, 28, 4.5, 3.5, 2.0, 42)


def test_missing_options_take_the_defaults_and_seeds_follow_the_line():
    text = "# previews\n\na magenta circle\n  \na magenta square --d 7\na magenta diamond --s 4\n"
    prompts = parse_prompts(text, DEFAULTS)
    assert [p.prompt for p in prompts] == ["a magenta circle", "a magenta square", "a magenta diamond"]
    assert [p.seed for p in prompts] == [100, 7, 102]  # default seed + line index, unless --d
    assert [p.steps for p in prompts] == [12, 12, 4]
    assert all((p.width, p.height, p.cfg) == (64, 32, 1.0) for p in prompts)


@pytest.mark.parametrize(
    "line,match",
    [("a cat --x 3", "unknown option --x"), ("a cat --w wide", "--w needs an integer"), ("--w 64", "no prompt text"),
     ("a cat --w 8", "width/height must be >= 16")],
)
def test_bad_lines_name_the_problem(line, match):
    with pytest.raises(ValueError, match=match):
        parse_prompt_line(line, DEFAULTS)


def test_preview_specs_encode_each_prompt_at_its_size():
    prompts = parse_prompts("a magenta circle --w 32 --h 16 --l 4 --n a red circle\na blue square", DEFAULTS)
    first, second = preview_specs(prompts, demo_encoders())
    assert first.latent_shape == (12, 8, 16) and second.latent_shape == (12, 16, 32)  # pixel VAE: 2x down
    assert first.cfg == 4.0 and first.neg_cond is not None and second.neg_cond is None  # cfg 1: no negative
    assert first.captions == ["a magenta circle"] and int(first.cond.context_lens[0]) == 3
    with pytest.raises(ValueError, match="multiples of 4"):
        preview_specs(parse_prompts("a cat --w 34 --h 32"), demo_encoders())
