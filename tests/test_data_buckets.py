"""Aspect-ratio buckets, resize/crop placement, and DataConfig validation."""

import math

import pytest

from dit_trainer.training.data.buckets import ImageTooSmall, aspect_error, bucket_sizes, place_image
from dit_trainer.training.data.config import DataConfig
from dit_trainer.training.data.folder_dataset import FolderDataset

CONFIGS = [
    DataConfig(),  # 1024², step 64, sides 256..2048
    DataConfig(resolution=512, bucket_step=32, min_side=128, max_side=1024),
    DataConfig(resolution=768, bucket_step=16, min_side=256, max_side=1536),
]
IMAGE_SIZES = [(1024, 1024), (4000, 3000), (3000, 4000), (1920, 1080), (640, 2400), (300, 200), (5000, 700),
               (333, 999), (1, 1), (2048, 2048), (1000, 1001), (97, 61)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_bucket_sizes_are_step_multiples_within_the_sides_and_the_area(cfg):
    sizes = bucket_sizes(cfg.resolution, cfg.min_side, cfg.max_side, cfg.bucket_step)
    assert len(sizes) > 5
    square = cfg.resolution // cfg.bucket_step * cfg.bucket_step
    assert (square, square) in sizes
    for width, height in sizes:
        assert width % cfg.bucket_step == 0 and height % cfg.bucket_step == 0
        assert cfg.min_side <= width <= cfg.max_side and cfg.min_side <= height <= cfg.max_side
        assert width * height <= cfg.resolution**2
        assert (height, width) in sizes  # portrait and landscape alike


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_an_image_gets_the_bucket_of_closest_aspect_and_a_centred_covering_resize(cfg, size):
    sizes = bucket_sizes(cfg.resolution, cfg.min_side, cfg.max_side, cfg.bucket_step)
    placement = place_image(size, cfg)
    assert placement.bucket in sizes
    best = min(aspect_error(size, b) for b in sizes)
    assert aspect_error(size, placement.bucket) <= best + 1e-9
    (rw, rh), (bw, bh), (left, top) = placement.resized, placement.bucket, placement.crop
    assert rw >= bw and rh >= bh  # the resize covers the bucket: crop, never pad
    assert min(rw - bw, rh - bh) <= 1  # ... and is the smallest that does
    assert abs(rw / rh - size[0] / size[1]) <= (size[0] / size[1]) * (1 / min(rw, rh)) + 1e-9  # aspect kept
    assert left == (rw - bw) // 2 and top == (rh - bh) // 2  # centre crop


def test_an_image_of_a_bucket_size_keeps_its_size():
    cfg = DataConfig()
    for size in [(1024, 1024), (768, 1344), (1344, 768)]:
        assert size in bucket_sizes(cfg.resolution, cfg.min_side, cfg.max_side, cfg.bucket_step)
        placement = place_image(size, cfg)
        assert placement.bucket == size and placement.resized == size and placement.crop == (0, 0)


def test_tall_and_wide_images_are_treated_alike():
    cfg = DataConfig()
    for width, height in IMAGE_SIZES:
        wide, tall = place_image((width, height), cfg), place_image((height, width), cfg)
        assert tall.bucket == wide.bucket[::-1]


@pytest.mark.parametrize("cfg", [DataConfig(no_upscale=True), DataConfig(resolution=512, bucket_step=32,
                                 min_side=128, max_side=640, no_upscale=True)])
@pytest.mark.parametrize("size", [s for s in IMAGE_SIZES if min(s) >= 64])
def test_no_upscale_never_enlarges(cfg, size):
    placement = place_image(size, cfg)
    (rw, rh), (bw, bh) = placement.resized, placement.bucket
    assert rw <= size[0] and rh <= size[1]
    assert bw <= rw and bh <= rh
    assert bw % cfg.bucket_step == 0 and bh % cfg.bucket_step == 0
    assert bw * bh <= cfg.resolution**2 and max(bw, bh) <= cfg.max_side
    if size[0] * size[1] <= cfg.resolution**2 and max(size) <= cfg.max_side:
        # Small enough already: the bucket is the image rounded down to the step, no resize at all.
        assert (bw, bh) == (size[0] // cfg.bucket_step * cfg.bucket_step, size[1] // cfg.bucket_step * cfg.bucket_step)


def test_no_upscale_shrinks_a_large_image_to_about_the_target_area():
    cfg = DataConfig(no_upscale=True)
    bw, bh = place_image((4000, 3000), cfg).bucket
    assert 0.85 * cfg.resolution**2 <= bw * bh <= cfg.resolution**2
    assert abs(math.log(bw / bh) - math.log(4 / 3)) < 0.08


def test_no_upscale_refuses_an_image_smaller_than_one_step():
    with pytest.raises(ImageTooSmall, match="no_upscale"):
        place_image((40, 500), DataConfig(no_upscale=True))


def test_without_buckets_every_image_fills_one_square():
    cfg = DataConfig(resolution=500, bucket_step=64, enable_buckets=False)
    for size in IMAGE_SIZES:
        placement = place_image(size, cfg)
        assert placement.bucket == (448, 448)
        assert min(placement.resized) == 448


@pytest.mark.parametrize("bad, option", [
    (dict(resolution=0), "resolution"),
    (dict(resolution=32), "resolution"),  # below the bucket step
    (dict(bucket_step=-8), "bucket_step"),
    (dict(min_side=100), "min_side"),  # not a multiple of 64
    (dict(min_side=1024, max_side=512), "max_side"),
    (dict(resolution=4096), "resolution"),  # above max_side
    (dict(enable_buckets=False, no_upscale=True), "no_upscale"),
    (dict(repeats=0), "repeats"),
    (dict(repeats=1.5), "repeats"),
    (dict(keep_tokens=-1), "keep_tokens"),
    (dict(caption_extension="txt"), "caption_extension"),
    (dict(caption_separator=""), "caption_separator"),
    (dict(caption_dropout=1.5), "caption_dropout"),
    (dict(masks="yes"), "masks"),
    (dict(shuffle_caption="true"), "shuffle_caption"),
])
def test_bad_options_raise_naming_the_option(bad, option):
    with pytest.raises(ValueError, match=option):
        DataConfig(**bad)


def test_bucket_step_must_give_whole_latent_patches(tmp_path):
    cfg = DataConfig(resolution=36, bucket_step=6, min_side=12, max_side=48)
    with pytest.raises(ValueError, match=r"bucket_step 6 is not a multiple of 4.*use bucket_step 12"):
        FolderDataset.from_folder(tmp_path, cfg, lambda x: x, lambda c: c, latent_downscale=2, encoder_id="x", patch=2)
