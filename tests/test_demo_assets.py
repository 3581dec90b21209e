"""The demo's deterministic assets: shapes dataset, text encoder, pixel VAE and concept score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_trainer.training.demo.pixel_vae import PixelVAE, to_tensor, to_uint8
from dit_trainer.training.demo.score import concept_score, dominant_colour
from dit_trainer.training.demo.shapes import (
    BACKGROUND,
    COLOURS,
    HELD_OUT_COLOUR,
    IMAGE_SIZE,
    SHAPES,
    TRAINING_COLOURS,
    caption,
    concept_prompts,
    concept_samples,
    pretrain_samples,
    render,
    write_folder,
)
from dit_trainer.training.demo.text_encoder import DemoTextEncoder

# --- shapes -----------------------------------------------------------------


def test_render_is_deterministic_per_seed() -> None:
    first = render("circle", "red", np.random.default_rng(7))
    again = render("circle", "red", np.random.default_rng(7))
    other = render("circle", "red", np.random.default_rng(8))
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("shape", SHAPES)
def test_render_has_only_background_and_shape_colour_inside_the_image(shape: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        image = render(shape, "blue", rng)
        values = {tuple(p) for p in image.reshape(-1, 3)}
        assert values == {BACKGROUND, COLOURS["blue"]}
        # Shape covers a sensible share: never vanishing, never filling the frame.
        mask = (image != BACKGROUND).any(axis=2)
        assert 0.03 < mask.mean() < 0.75


def test_sample_sets_are_deterministic() -> None:
    a, b = pretrain_samples(12, seed=3), pretrain_samples(12, seed=3)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))


def test_pretrain_samples_never_show_the_held_out_colour() -> None:
    samples = pretrain_samples(96, seed=1)
    assert len(samples) == 96
    assert all(HELD_OUT_COLOUR not in s.caption for s in samples)
    assert all(dominant_colour(s.image) == s.colour != HELD_OUT_COLOUR for s in samples)
    # Balanced: every (shape, colour) pair appears equally often.
    pairs = [(s.shape, s.colour) for s in samples]
    counts = {p: pairs.count(p) for p in set(pairs)}
    assert len(counts) == len(SHAPES) * len(TRAINING_COLOURS)
    assert set(counts.values()) == {96 // len(counts)}


def test_concept_samples_all_show_the_held_out_colour() -> None:
    samples = concept_samples(8, seed=2)
    assert len(samples) == 8
    assert {s.shape for s in samples} == set(SHAPES)
    assert all(s.caption == caption(s.shape, HELD_OUT_COLOUR) for s in samples)
    assert all(dominant_colour(s.image) == HELD_OUT_COLOUR for s in samples)
    assert concept_prompts() == [f"a {HELD_OUT_COLOUR} {shape}" for shape in SHAPES]


def test_write_folder_round_trips_images_and_captions(tmp_path: Path) -> None:
    samples = concept_samples(3, seed=4) + pretrain_samples(3, seed=4)
    write_folder(samples, tmp_path / "data")
    files = sorted((tmp_path / "data").iterdir())
    assert [f.name for f in files if f.suffix == ".png"] == [f"{i:04d}.png" for i in range(6)]
    assert {f.stem for f in files if f.suffix == ".txt"} == {f.stem for f in files if f.suffix == ".png"}
    assert len(files) == 12  # no temp files left behind
    for i, sample in enumerate(samples):
        assert (tmp_path / "data" / f"{i:04d}.txt").read_text(encoding="utf-8") == sample.caption
        assert np.array_equal(np.asarray(Image.open(tmp_path / "data" / f"{i:04d}.png")), sample.image)


# --- text encoder -----------------------------------------------------------


def test_word_vectors_are_stable_and_distinct() -> None:
    one, two = DemoTextEncoder(), DemoTextEncoder()
    magenta = one.word_vector(HELD_OUT_COLOUR)
    assert torch.equal(magenta, two.word_vector(HELD_OUT_COLOUR))
    assert magenta.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)
    words = list(COLOURS) + list(SHAPES) + ["a"]
    vectors = torch.stack([one.word_vector(w) for w in words])
    cosine = torch.nn.functional.normalize(vectors, dim=1) @ torch.nn.functional.normalize(vectors, dim=1).T
    off_diagonal = cosine[~torch.eye(len(words), dtype=torch.bool)]
    assert off_diagonal.max().item() < 0.9


def test_word_vectors_match_the_recorded_values() -> None:
    # Pinned values: a salted hash or a version-dependent RNG would change them
    # between processes or machines, and a shipped demo checkpoint would stop matching.
    expected = torch.tensor([0.12743738, 0.90115839, -1.82017076, -0.77881098])
    assert torch.allclose(DemoTextEncoder().word_vector("magenta")[:4], expected, atol=1e-6)


def test_encode_shapes_lengths_and_padding() -> None:
    encoder = DemoTextEncoder(dim=16, max_tokens=4)
    context, lengths = encoder.encode(["A Magenta circle!", "red", "", "one two three four five six"])
    assert context.shape == (4, 4, 16) and context.dtype == torch.float32
    assert lengths.tolist() == [3, 1, 1, 4] and lengths.dtype == torch.int64
    assert torch.equal(context[0, 1], encoder.word_vector("magenta"))
    assert torch.equal(context[0, 3], torch.zeros(16))
    assert torch.equal(context[1, 1:], torch.zeros(3, 16))
    assert torch.equal(context[2], torch.zeros(4, 16))  # empty prompt: one zero token
    assert torch.equal(context[3, 3], encoder.word_vector("four"))

    empty, empty_lengths = encoder.encode([""])
    assert empty.shape == (1, 1, 16) and empty_lengths.tolist() == [1]


# --- pixel VAE --------------------------------------------------------------


def test_pixel_vae_round_trip_is_uint8_exact() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8) for _ in range(3)]
    vae = PixelVAE()
    latents = vae.encode(to_tensor(images))
    assert latents.shape == (3, PixelVAE.latent_channels, 16, 24) and PixelVAE.latent_channels == 12
    assert latents.min() >= -1 and latents.max() <= 1
    assert np.array_equal(to_uint8(vae.decode(latents)), np.stack(images))


def test_pixel_vae_rejects_bad_shapes() -> None:
    vae = PixelVAE()
    with pytest.raises(ValueError, match="not divisible by 2"):
        vae.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 3, 16, 16))


# --- score ------------------------------------------------------------------


@pytest.mark.parametrize("colour", list(COLOURS))
def test_rendered_samples_score_as_their_colour(colour: str) -> None:
    rng = np.random.default_rng(5)
    images = [render(SHAPES[i % len(SHAPES)], colour, rng) for i in range(40)]
    assert all(dominant_colour(image) == colour for image in images)
    assert concept_score(images, colour) == 1.0


def test_concept_score_separates_concept_from_pretraining() -> None:
    assert concept_score([s.image for s in concept_samples(24, seed=6)]) == 1.0
    assert concept_score([s.image for s in pretrain_samples(48, seed=6)]) == 0.0


def test_concept_score_survives_noise() -> None:
    rng = np.random.default_rng(9)
    clean = [s.image for s in concept_samples(40, seed=9)]
    noisy = [np.clip(im + rng.normal(0, 15, im.shape), 0, 255).astype(np.uint8) for im in clean]
    assert concept_score(noisy) >= 0.9


def test_blank_image_has_no_dominant_colour() -> None:
    blank = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    blank[:] = BACKGROUND
    assert dominant_colour(blank) is None
    assert concept_score([blank]) == 0.0
