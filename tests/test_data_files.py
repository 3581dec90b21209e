"""Reading a dataset folder: captions, repeat subfolders, bad files, masks, EXIF orientation."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_helpers import CountingEncoders, build, small_config, write_image, write_mask


def latent_mean(mask: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] mask -> its 2x2 block means [1, H/2, W/2] in [0, 1] (the PixelVAE's latent grid)."""
    return F.avg_pool2d(torch.from_numpy(mask).float()[None] / 255, 2)


def first_weights(dataset, item_index: int) -> torch.Tensor:
    """The loss weights [1, h, w] the weighted dataset gives item `item_index` in a batch of one."""
    target = dataset._latents[item_index]
    for batch, _ in zip(dataset.batches(1, seed=0), range(10 * len(dataset))):
        if torch.equal(batch.latents[0], target):
            return batch.weights[0]
    raise AssertionError("item never drawn")


def test_captions_come_from_same_stem_files_and_missing_ones_use_the_default(tmp_path, caplog):
    write_image(tmp_path / "cat.png", 32, 32, seed=1)
    (tmp_path / "cat.txt").write_text("\ufeffa cat\r\n", encoding="utf-8")  # BOM and CRLF are cleaned
    write_image(tmp_path / "dog.jpg", 32, 32, seed=2)
    (tmp_path / "dog.caption").write_text("a dog")
    write_image(tmp_path / "owl.png", 32, 32, seed=3)
    with caplog.at_level(logging.WARNING):
        dataset = build(tmp_path, small_config(default_caption="an animal"), CountingEncoders())
    by_name = {item.image_path.name: item for item in dataset.items}
    assert by_name["cat.png"].caption == "a cat" and not by_name["cat.png"].caption_missing
    assert by_name["dog.jpg"].caption == "an animal" and by_name["dog.jpg"].caption_missing
    assert by_name["owl.png"].caption == "an animal" and by_name["owl.png"].caption_missing
    warning = next(r.getMessage() for r in caplog.records if "caption" in r.getMessage())
    assert "dog.jpg" in warning and "owl.png" in warning and "cat.png" not in warning
    assert "missing captions: 2" in dataset.summary()

    other_extension = build(tmp_path, small_config(caption_extension=".caption"), CountingEncoders())
    assert {i.image_path.name: i.caption for i in other_extension.items}["dog.jpg"] == "a dog"


def test_repeat_subfolders_multiply_repeats_and_other_folders_are_skipped(tmp_path, caplog):
    write_image(tmp_path / "top.png", 32, 32, seed=1)
    write_image(tmp_path / "3_concept" / "a.png", 32, 32, seed=2)
    write_image(tmp_path / "3_concept" / "b.png", 32, 32, seed=3)
    write_image(tmp_path / "unrelated" / "c.png", 32, 32, seed=4)
    write_image(tmp_path / "0_empty" / "d.png", 32, 32, seed=5)
    with caplog.at_level(logging.WARNING):
        dataset = build(tmp_path, small_config(repeats=2), CountingEncoders())
    repeats = {item.image_path.name: item.repeats for item in dataset.items}
    assert repeats == {"top.png": 2, "a.png": 6, "b.png": 6}
    assert len(dataset) == 14
    assert any("unrelated" in r.getMessage() and "0_empty" in r.getMessage() for r in caplog.records)

    # One epoch shows every image exactly `repeats` times.
    index_of = {bytes(lat.numpy().tobytes()): i for i, lat in enumerate(dataset._latents)}
    seen = [0] * len(dataset.items)
    for batch, _ in zip(dataset.batches(1, seed=3), range(len(dataset))):
        seen[index_of[bytes(batch.latents[0].numpy().tobytes())]] += 1
    assert seen == [item.repeats for item in dataset.items]


def test_unreadable_and_truncated_images_are_skipped_with_one_warning_naming_them(tmp_path, caplog):
    write_image(tmp_path / "good.png", 32, 32, seed=1)
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    truncated = write_image(tmp_path / "truncated.png", 32, 32, seed=2).read_bytes()
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])  # header fine, pixels cut
    with caplog.at_level(logging.WARNING):
        dataset = build(tmp_path, small_config(), CountingEncoders())
    assert [item.image_path.name for item in dataset.items] == ["good.png"]
    skip_warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skip_warnings) == 1
    assert "garbage.png" in skip_warnings[0] and "truncated.png" in skip_warnings[0]
    assert "skipped: 2" in dataset.summary()


def test_an_empty_folder_is_an_error_naming_the_folder_and_the_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"no usable images in {tmp_path}.*\.png, \.jpg"):
        build(tmp_path, small_config(), CountingEncoders())
    (tmp_path / "broken.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"1 image file\(s\) could not be used: broken\.png"):
        build(tmp_path, small_config(), CountingEncoders())
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        build(tmp_path / "missing_folder", small_config(), CountingEncoders())


def test_the_alpha_channel_is_the_mask(tmp_path):
    alpha = np.zeros((32, 32), dtype=np.uint8)
    alpha[:, :12] = 255
    alpha[5:9, 20:30] = 100
    write_image(tmp_path / "cutout.png", 32, 32, seed=1, alpha=alpha)
    write_image(tmp_path / "plain.png", 32, 32, seed=2)
    dataset = build(tmp_path, small_config(), CountingEncoders())
    assert {i.image_path.name: i.has_mask for i in dataset.items} == {"cutout.png": True, "plain.png": False}
    weighted = dataset.with_mask_weights()
    assert torch.allclose(first_weights(weighted, 0), latent_mean(alpha), atol=1e-6)
    assert torch.equal(first_weights(weighted, 1), torch.ones(1, 16, 16))


def test_a_fully_opaque_alpha_is_no_mask_in_auto_mode_but_is_one_in_alpha_mode(tmp_path):
    write_image(tmp_path / "opaque.png", 32, 32, seed=1, alpha=np.full((32, 32), 255))
    assert not build(tmp_path, small_config(), CountingEncoders()).items[0].has_mask
    assert build(tmp_path, small_config(masks="alpha"), CountingEncoders()).items[0].has_mask
    assert not build(tmp_path, small_config(masks="none"), CountingEncoders()).items[0].has_mask


def test_masks_folder_gives_each_image_its_same_stem_mask(tmp_path):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    mask[0:2, :] = 60
    write_image(tmp_path / "a.png", 32, 32, seed=1)
    write_image(tmp_path / "b.png", 32, 32, seed=2, alpha=np.zeros((32, 32)))  # alpha ignored: masks/ wins
    write_mask(tmp_path / "masks" / "a.png", mask)
    write_image(tmp_path / "2_sub" / "c.png", 32, 32, seed=3)
    write_mask(tmp_path / "2_sub" / "masks" / "c.webp", 255 - mask)
    for mode in ("auto", "folder"):
        dataset = build(tmp_path, small_config(masks=mode), CountingEncoders())
        names = [i.image_path.name for i in dataset.items]
        assert {n: i.has_mask for n, i in zip(names, dataset.items)} == {"a.png": True, "b.png": False, "c.png": True}
        weighted = dataset.with_mask_weights()
        assert torch.allclose(first_weights(weighted, names.index("a.png")), latent_mean(mask), atol=1e-6)
        assert torch.allclose(first_weights(weighted, names.index("c.png")), latent_mean(255 - mask), atol=0.02)
        assert torch.equal(first_weights(weighted, names.index("b.png")), torch.ones(1, 16, 16))
    assert not any(i.has_mask for i in build(tmp_path, small_config(masks="none"), CountingEncoders()).items)


def test_folder_masks_without_a_masks_folder_is_an_error(tmp_path):
    write_image(tmp_path / "a.png", 32, 32)
    with pytest.raises(FileNotFoundError, match="masks='folder'.*'masks' subfolder"):
        build(tmp_path, small_config(masks="folder"), CountingEncoders())


def test_a_mask_of_another_size_is_an_error_naming_both_files(tmp_path):
    write_image(tmp_path / "a.png", 32, 32)
    write_mask(tmp_path / "masks" / "a.png", np.zeros((30, 32)))
    with pytest.raises(ValueError, match=r"masks[/\\]a\.png is 32x30 but its image .*a\.png is 32x32"):
        build(tmp_path, small_config(), CountingEncoders())


def test_exif_orientation_is_applied_before_bucketing(tmp_path):
    ys, xs = np.mgrid[0:24, 0:48]
    pixels = np.stack([xs * 5, ys * 10, np.full_like(xs, 128)], axis=-1).astype(np.uint8)  # stored 48 wide, 24 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": shown 24 wide, 48 tall
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95, subsampling=0)
    encoders = CountingEncoders()
    dataset = build(tmp_path, small_config(), encoders)
    # Aspect 1/2 -> bucket 24x40 (see test_data_buckets); cover = no resize, centre crop of rows 4..44.
    assert dataset.items[0].bucket == (24, 40)
    decoded = encoders.vae.decode(dataset._latents[0][None])[0].permute(1, 2, 0).numpy() * 255
    shown = np.rot90(pixels, k=-1)[4:44].astype(np.float32)
    stored_the_other_way = np.rot90(pixels, k=1)[4:44].astype(np.float32)
    assert np.abs(decoded - shown).mean() < 3  # JPEG error only
    assert np.abs(decoded - stored_the_other_way).mean() > 30


def test_summary_reports_buckets_masks_and_cache(tmp_path):
    write_image(tmp_path / "square.png", 32, 32, seed=1, alpha=np.zeros((32, 32)))
    write_image(tmp_path / "wide.png", 64, 32, seed=2)
    write_image(tmp_path / "3_x" / "tall.png", 32, 64, seed=3)
    summary = build(tmp_path, small_config(), CountingEncoders()).summary()
    assert "3 images, 5 examples per epoch, 3 bucket(s)" in summary
    assert "32x32: 1 images, 1 examples" in summary
    assert "masks: 1 of 3 images" in summary
    assert "latents: 0 from cache, 3 encoded" in summary
