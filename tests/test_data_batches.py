"""Batch streams: determinism, exact resume with `start`, one bucket per batch, padding, mask weights."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit_trainer.training.data.masks import mask_weights
from data_helpers import CountingEncoders, build, small_config, write_image

CAPTIONS = ["red cat", "a big blue dog, running", "tree", "green frog, on a leaf, at night", "owl"]
SIZES = [(32, 32), (64, 32), (32, 32), (32, 64), (32, 32)]  # three buckets


@pytest.fixture
def folder(tmp_path):
    for i, ((width, height), caption) in enumerate(zip(SIZES, CAPTIONS)):
        write_image(tmp_path / f"img{i}.png", width, height, seed=i)
        (tmp_path / f"img{i}.txt").write_text(caption)
    write_image(tmp_path / "2_more" / "extra.png", 32, 32, seed=10)
    (tmp_path / "2_more" / "extra.txt").write_text("{small|large} {boat|ship}, on water")
    return tmp_path


def memory_only(**overrides):
    return small_config(cache_latents_to_disk=False, **overrides)


def take(dataset, n: int, batch_size: int = 2, seed: int = 0, start: int = 0):
    return list(itertools.islice(dataset.batches(batch_size, seed, start), n))


def same(a, b) -> bool:
    return (torch.equal(a.latents, b.latents) and torch.equal(a.cond.context, b.cond.context)
            and torch.equal(a.cond.context_lens, b.cond.context_lens))


def item_indices(dataset, batch) -> list[int]:
    """Which items a batch holds, recognised by their (unique, random-image) latents."""
    index_of = {lat.numpy().tobytes(): i for i, lat in enumerate(dataset._latents)}
    return [index_of[lat.numpy().tobytes()] for lat in batch.latents]


def test_same_seed_gives_the_same_sequence_and_another_seed_another(folder):
    cfg = memory_only(shuffle_caption=True, caption_dropout=0.2)
    first, second = build(folder, cfg, CountingEncoders()), build(folder, cfg, CountingEncoders())
    a, b = take(first, 25), take(second, 25)
    assert all(same(x, y) for x, y in zip(a, b))
    assert all(same(x, y) for x, y in zip(a, take(first, 25)))  # a second stream from the same dataset too
    other = take(first, 25, seed=1)
    assert not all(same(x, y) for x, y in zip(a, other) if x.latents.shape == y.latents.shape)


@pytest.mark.parametrize("start", [1, 4, 7, 13])  # within the first epoch, at its end, and later epochs
def test_start_gives_exactly_the_tail_of_the_full_sequence(folder, start):
    cfg = memory_only(shuffle_caption=True, keep_tokens=1, caption_dropout=0.1)
    full = take(build(folder, cfg, CountingEncoders()), start + 6, batch_size=3)
    tail = take(build(folder, cfg, CountingEncoders()), 6, batch_size=3, start=start)
    assert all(same(x, y) for x, y in zip(full[start:], tail))


def test_start_is_exact_with_the_caption_options_dop_prompts_and_augmentation(folder):
    cfg = memory_only(shuffle_caption=True, caption_prefix="photo,", caption_suffix="end", keep_tokens_separator="|||",
                      secondary_separator=";;;", trigger_word="ohwx", class_word="cat", augment_variants=2,
                      flip_aug=True, color_jitter=0.1)
    full = take(build(folder, cfg, CountingEncoders()), 11, batch_size=2)
    tail = take(build(folder, cfg, CountingEncoders()), 6, batch_size=2, start=5)
    assert all(same(x, y) and torch.equal(x.class_cond.context, y.class_cond.context) for x, y in zip(full[5:], tail))


def test_start_skips_batches_without_encoding_them(folder):
    cfg = memory_only(shuffle_caption=True)  # every caption is random: nothing is encoded up front
    encoders = CountingEncoders()
    dataset = build(folder, cfg, encoders)
    assert encoders.text_calls == 0
    batch = next(dataset.batches(2, seed=0, start=50))
    assert encoders.text_calls == 1 and len(encoders.captions_seen) == batch.latents.shape[0]
    assert encoders.image_calls == len(dataset.items)  # only the build's own encodes


def test_every_batch_comes_from_one_bucket_and_an_epoch_covers_every_example(folder):
    dataset = build(folder, memory_only(), CountingEncoders())
    buckets = [item.bucket for item in dataset.items]
    # 5 examples at 32x32 (3 images + one repeated twice) -> batches of 4 and 1; 64x32 and 32x64: 1 each.
    per_epoch = 4
    for epoch in range(3):
        batches = take(dataset, per_epoch, batch_size=4, start=epoch * per_epoch)
        seen = []
        for batch in batches:
            indices = item_indices(dataset, batch)
            assert len({buckets[i] for i in indices}) == 1
            assert batch.latents.shape[-2:] == (buckets[indices[0]][1] // 2, buckets[indices[0]][0] // 2)
            seen += indices
        assert sorted(seen) == sorted(i for i, item in enumerate(dataset.items) for _ in range(item.repeats))
        assert sorted(len(b.latents) for b in batches) == [1, 1, 1, 4]


def test_context_is_each_caption_zero_padded_to_the_longest_in_the_batch(folder):
    encoders = CountingEncoders()
    dataset = build(folder, memory_only(), encoders)
    fixed_items = [i for i, item in enumerate(dataset.items) if "{" not in item.caption]
    checked = 0
    for batch in take(dataset, 12, batch_size=4):
        assert batch.cond.context.shape[1] == int(batch.cond.context_lens.max())
        for row, index in enumerate(item_indices(dataset, batch)):
            length = int(batch.cond.context_lens[row])
            assert not batch.cond.context[row, length:].any()
            if index in fixed_items:
                states, lens = encoders.text.encode([dataset.items[index].caption])
                assert length == int(lens[0])
                assert torch.equal(batch.cond.context[row, :length], states[0, :length])
                checked += 1
    assert checked > 10


@pytest.mark.parametrize("gamma, min_weight", [(1.0, 0.0), (2.0, 0.0), (0.5, 0.25), (3.0, 1.0)])
def test_mask_weights_formula(gamma, min_weight):
    mask = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5, -0.5])
    clamped = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.0, 0.0])
    expected = clamped**gamma * (1 - min_weight) + min_weight
    assert torch.allclose(mask_weights(mask, gamma, min_weight), expected)


@pytest.mark.parametrize("gamma, min_weight, option", [(0.0, 0.0, "gamma"), (-1.0, 0.0, "gamma"),
                                                       (1.0, -0.1, "min_weight"), (1.0, 1.5, "min_weight")])
def test_mask_weights_reject_bad_parameters(gamma, min_weight, option):
    with pytest.raises(ValueError, match=option):
        mask_weights(torch.ones(2), gamma, min_weight)


def test_no_masks_anywhere_means_no_weights(folder):
    weighted = build(folder, memory_only(), CountingEncoders()).with_mask_weights(gamma=2.0, min_weight=0.1)
    assert all(batch.weights is None for batch in take(weighted, 5))


def test_override_masks_get_their_images_resize_and_crop(folder):
    encoders = CountingEncoders()
    dataset = build(folder, memory_only(), encoders)
    assert all(batch.weights is None for batch in take(dataset, 3))  # weighting is opt-in
    # Each mask is its image's own red channel; after the same resize and crop, the latent
    # mask must equal the 2x2 mean of the red channel of the decoded (bucket-sized) image.
    from PIL import Image
    masks = [torch.from_numpy(np.array(Image.open(item.image_path).convert("RGB"))[..., 0]).float() / 255
             for item in dataset.items]
    masks[0] = None
    gamma, min_weight = 2.0, 0.2
    weighted = dataset.with_mask_weights(gamma, min_weight, masks=masks)
    assert [item.has_mask for item in weighted.items] == [False] + [True] * (len(masks) - 1)
    assert not dataset._weights  # the original dataset is unchanged
    for batch in take(weighted, 12, batch_size=3):
        assert batch.weights.shape == (batch.latents.shape[0], 1, *batch.latents.shape[-2:])
        for row, index in enumerate(item_indices(weighted, batch)):
            if index == 0:
                assert torch.equal(batch.weights[row], torch.ones_like(batch.weights[row]))
                continue
            red = encoders.vae.decode(batch.latents[row : row + 1])[:, :1]
            expected = F.avg_pool2d(red, 2)[0].clamp(0, 1) ** gamma * (1 - min_weight) + min_weight
            assert torch.allclose(batch.weights[row], expected, atol=1e-5)


def test_override_masks_must_match_count_and_image_size(folder):
    dataset = build(folder, memory_only(), CountingEncoders())
    with pytest.raises(ValueError, match=f"got 2 masks for {len(dataset.items)} dataset images"):
        dataset.with_mask_weights(masks=[None, None])
    masks = [None] * len(dataset.items)
    masks[1] = torch.ones(32, 32)  # img1 is 64 wide, 32 tall
    with pytest.raises(ValueError, match=r"img1\.png.*64x32.*\[32, 64\]"):
        dataset.with_mask_weights(masks=masks)


def test_batches_reject_bad_arguments(folder):
    dataset = build(folder, memory_only(), CountingEncoders())
    with pytest.raises(ValueError, match="batch_size"):
        dataset.batches(0, seed=0)
    with pytest.raises(ValueError, match="start"):
        dataset.batches(2, seed=0, start=-1)
