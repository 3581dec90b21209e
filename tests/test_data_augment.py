"""Augmentation: the transforms' formulas, seeded variants, and their own cache entries."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dit_trainer.training.data.augment import Augmentation, augment_pixels, crop_and_flip, draw_augmentation
from dit_trainer.training.data.config import DataConfig
from dit_trainer.training.data.images import decode_image, fit_to_bucket
from data_helpers import CountingEncoders, build, small_config, write_image

PLAIN = Augmentation(False, (0.0, 0.0, 1.0), 1.0, 1.0, 1.0)


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 8, 12, generator=torch.Generator().manual_seed(seed))


def test_transforms_follow_their_formulas():
    image = pixels()
    torch.testing.assert_close(augment_pixels(PLAIN, image), image)
    torch.testing.assert_close(augment_pixels(Augmentation(True, (0.0, 0.0, 1.0), 1, 1, 1), image), image.flip(-1))
    bright = augment_pixels(Augmentation(False, (0.0, 0.0, 1.0), 1.2, 1.0, 1.0), image)
    torch.testing.assert_close(bright, (image * 1.2).clamp(0, 1))
    contrast = augment_pixels(Augmentation(False, (0.0, 0.0, 1.0), 1.0, 0.5, 1.0), image)
    torch.testing.assert_close(contrast, (image - image.mean()) * 0.5 + image.mean())
    gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    torch.testing.assert_close(augment_pixels(Augmentation(False, (0.0, 0.0, 1.0), 1.0, 1.0, 0.0), image),
                               gray.expand(3, -1, -1))
    # Crop: the window (left 0.25, top 0.5 of the free space, half the side) resized back to 8x12.
    cropped = crop_and_flip(Augmentation(False, (0.25, 0.25, 0.5), 1, 1, 1), image)
    window = image[:, 2:6, 3:9]
    torch.testing.assert_close(cropped, F.interpolate(window[None], size=(8, 12), mode="bilinear")[0])


def test_variants_are_seeded_by_image_and_index():
    a = [draw_augmentation(True, 0.8, 0.1, "abc", i) for i in range(40)]
    assert a == [draw_augmentation(True, 0.8, 0.1, "abc", i) for i in range(40)]
    assert a != [draw_augmentation(True, 0.8, 0.1, "abd", i) for i in range(40)]
    assert 10 < sum(v.flip for v in a) < 30
    assert all(0.8 <= v.crop[2] <= 1 and v.crop[0] <= 1 - v.crop[2] + 1e-9 for v in a)
    assert all(0.9 <= f <= 1.1 for v in a for f in (v.brightness, v.contrast, v.saturation))
    plain = draw_augmentation(False, 1.0, 0.0, "abc", 3)
    assert not plain.flip and plain.crop[2] == 1.0 and plain.brightness == 1.0


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"img{i}.png", 32, 32, seed=i)
        (tmp_path / f"img{i}.txt").write_text(f"image {i}")
    return tmp_path


def test_each_variant_is_encoded_once_and_cached_under_its_own_key(folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = small_config(augment_variants=3, flip_aug=True, color_jitter=0.2, cache_dir=cache)
    encoders = CountingEncoders()
    data = build(folder, cfg, encoders)
    assert encoders.image_calls == 3 * (1 + 3)  # the plain latents and three variants per image
    assert len(list((cache / "latents").glob("*.safetensors"))) == 12
    # Every variant's latents are the VAE's code of the augmented bucket image.
    image = fit_to_bucket(decode_image((folder / "img0.png").read_bytes())[0], data._placements[0])
    for aug, latents in data._variants[0]:
        torch.testing.assert_close(encoders.vae.decode(latents[None])[0], augment_pixels(aug, image), atol=1e-5,
                                   rtol=0)
    again = CountingEncoders()
    build(folder, cfg, again)
    assert again.image_calls == 0  # a second run reads every variant from the cache
    other = CountingEncoders()
    build(folder, small_config(augment_variants=3, flip_aug=True, color_jitter=0.3, cache_dir=cache), other)
    assert other.image_calls == 3 * 3  # other augmentation: new variant entries, the plain latents are reused


def test_batches_pick_variants_from_the_seed_and_resume_mid_stream(folder):
    cfg = small_config(augment_variants=4, flip_aug=True, cache_latents_to_disk=False)
    data = build(folder, cfg, CountingEncoders())
    full = list(itertools.islice(data.batches(1, seed=3), 12))
    plain = {data._latents[i].numpy().tobytes() for i in range(3)}
    variants = {lat.numpy().tobytes() for v in data._variants for _, lat in v}
    seen = {b.latents[0].numpy().tobytes() for b in full}
    assert seen <= variants and not seen & plain  # training draws only augmented variants
    assert len(seen) > 3  # and more than one variant per image
    tail = list(itertools.islice(data.batches(1, seed=3, start=5), 7))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(full[5:], tail))


def test_flipped_variants_carry_flipped_masks_and_crops_refuse_masks(folder):
    mask = torch.zeros(32, 32)
    mask[:, :8] = 1.0  # the left quarter
    data = build(folder, small_config(augment_variants=6, flip_aug=True, cache_latents_to_disk=False),
                 CountingEncoders()).with_mask_weights(masks=[mask, None, None])
    flips = {aug.flip for aug, _ in data._variants[0]}
    assert flips == {True, False}
    for batch in itertools.islice(data.batches(1, seed=0), 12):
        index = next(i for i, v in enumerate(data._variants) for _, lat in v if torch.equal(lat, batch.latents[0]))
        if index != 0:
            continue
        aug = next(a for a, lat in data._variants[0] if torch.equal(lat, batch.latents[0]))
        expected = data._weights[0].flip(-1) if aug.flip else data._weights[0]
        assert torch.equal(batch.weights[0], expected)
    (folder / "masks").mkdir()
    write_image(folder / "masks" / "img0.png", 32, 32, seed=9)
    with pytest.raises(ValueError, match="cropped variants would need cropped masks"):
        build(folder, small_config(augment_variants=2, random_crop_scale=0.8, cache_latents_to_disk=False),
              CountingEncoders())


def test_augmentation_options_are_checked():
    with pytest.raises(ValueError, match="need augment_variants"):
        DataConfig(flip_aug=True)
    with pytest.raises(ValueError, match="no augmentation on"):
        DataConfig(augment_variants=2)
    with pytest.raises(ValueError, match="random_crop_scale"):
        DataConfig(augment_variants=2, random_crop_scale=0.0)
