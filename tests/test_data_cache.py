"""Latent and text-embedding caches: reuse on a second run, invalidation on any change."""

import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import CountingEncoders, build, small_config, write_image
from dit_trainer.training.data.folder_dataset import FolderDataset
from dit_trainer.training.storage import NonFiniteError


def make_folder(folder, n: int = 4):
    for i in range(n):
        write_image(folder / f"img{i}.png", 32 + 8 * (i % 2), 32, seed=i)
        (folder / f"img{i}.txt").write_text(["a red cat", "a blue dog", "an old tree", "a green frog"][i % 4])
    return folder


def take(dataset, n: int, batch_size: int = 2, seed: int = 0):
    return list(itertools.islice(dataset.batches(batch_size, seed), n))


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.latents, b.latents)
        assert torch.equal(a.cond.context, b.cond.context) and torch.equal(a.cond.context_lens, b.cond.context_lens)


def test_a_second_run_encodes_nothing_and_gives_the_same_batches(tmp_path):
    make_folder(tmp_path)
    first_encoders, second_encoders = CountingEncoders(), CountingEncoders()
    first = build(tmp_path, small_config(), first_encoders)
    assert first_encoders.image_calls == 4 and first_encoders.text_calls >= 1
    second = build(tmp_path, small_config(), second_encoders)
    batches = take(second, 6)
    assert second_encoders.image_calls == 0 and second_encoders.text_calls == 0
    assert_same_batches(take(first, 6), batches)
    assert "latents: 4 from cache, 0 encoded" in second.summary()


def test_changing_one_image_re_encodes_only_that_image(tmp_path):
    make_folder(tmp_path)
    build(tmp_path, small_config(), CountingEncoders())
    write_image(tmp_path / "img2.png", 32, 32, seed=99)  # same size, new bytes
    encoders = CountingEncoders()
    dataset = build(tmp_path, small_config(), encoders)
    assert encoders.image_calls == 1 and encoders.text_calls == 0
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "img2.png"))).permute(2, 0, 1).float() / 255
    assert torch.equal(dataset._latents[2], encoders.vae.encode(pixels[None])[0])  # 32x32: its own bucket


def test_changing_one_caption_re_encodes_only_that_caption(tmp_path):
    make_folder(tmp_path)
    build(tmp_path, small_config(), CountingEncoders())
    (tmp_path / "img1.txt").write_text("a purple whale")
    encoders = CountingEncoders()
    dataset = build(tmp_path, small_config(), encoders)
    take(dataset, 8)
    assert encoders.image_calls == 0
    assert encoders.text_calls == 1 and encoders.captions_seen == ["a purple whale"]


def test_changing_the_encoder_id_or_the_resolution_re_encodes(tmp_path):
    make_folder(tmp_path)
    build(tmp_path, small_config(), CountingEncoders())
    other_encoder = CountingEncoders()
    build(tmp_path, small_config(), other_encoder, encoder_id="demo-v2")
    assert other_encoder.image_calls == 4 and sorted(set(other_encoder.captions_seen)) == sorted(
        ["a red cat", "a blue dog", "an old tree", "a green frog"])
    # A new resolution moves every image to another bucket: new latents, same captions.
    other_resolution = CountingEncoders()
    dataset = build(tmp_path, small_config(resolution=48), other_resolution)
    assert other_resolution.image_calls == 4 and other_resolution.text_calls == 0
    assert all(item.bucket[0] * item.bucket[1] > 32 * 40 for item in dataset.items)


def test_masks_are_cached_with_their_latents(tmp_path):
    alpha = np.zeros((32, 32), dtype=np.uint8)
    alpha[:16] = 255
    write_image(tmp_path / "a.png", 32, 32, alpha=alpha)
    first = build(tmp_path, small_config(), CountingEncoders())
    encoders = CountingEncoders()
    second = build(tmp_path, small_config(), encoders)
    assert encoders.image_calls == 0 and second.items[0].has_mask
    assert torch.equal(second._masks[0], first._masks[0])
    # Another mask mode is another key: the same image is encoded again, without its mask.
    unmasked = CountingEncoders()
    assert not build(tmp_path, small_config(masks="none"), unmasked).items[0].has_mask
    assert unmasked.image_calls == 1


def test_disk_cache_off_writes_nothing_and_encodes_every_run(tmp_path):
    make_folder(tmp_path)
    for _ in range(2):
        encoders = CountingEncoders()
        build(tmp_path, small_config(cache_latents_to_disk=False), encoders)
        assert encoders.image_calls == 4
    assert not (tmp_path / ".dit_cache").exists()


def test_cache_files_live_in_cache_dir_and_are_written_atomically(tmp_path):
    make_folder(tmp_path / "data")
    cache = tmp_path / "elsewhere"
    build(tmp_path / "data", small_config(cache_dir=str(cache)), CountingEncoders())
    assert len(list((cache / "latents").glob("*.safetensors"))) == 4
    assert len(list((cache / "text").glob("*.safetensors"))) == 4
    assert not list(cache.rglob("*.tmp"))
    assert not (tmp_path / "data" / ".dit_cache").exists()


def test_a_corrupt_cache_file_is_re_encoded_with_a_warning(tmp_path, caplog):
    make_folder(tmp_path, n=2)
    first = build(tmp_path, small_config(), CountingEncoders())
    victim = sorted((tmp_path / ".dit_cache" / "latents").glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    encoders = CountingEncoders()
    with caplog.at_level(logging.WARNING):
        second = build(tmp_path, small_config(), encoders)
    assert encoders.image_calls == 1
    assert any(victim.name in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(first._latents, second._latents))


def test_each_caption_variant_is_encoded_once_then_read_from_disk(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"img{i}.png", 32, 32, seed=i)
        (tmp_path / f"img{i}.txt").write_text(f"{['red', 'blue', 'green'][i]} cat, sits, on a mat")
    cfg = small_config(shuffle_caption=True, keep_tokens=1, caption_dropout=0.1)
    encoders = CountingEncoders()
    dataset = build(tmp_path, cfg, encoders)
    assert encoders.text_calls == 0  # nothing to pre-encode: every caption is random
    first = take(dataset, 40)
    assert len(encoders.captions_seen) == len(set(encoders.captions_seen))  # no string encoded twice
    assert "" in encoders.captions_seen  # dropout happened, and "" was encoded once
    assert 6 <= len(set(encoders.captions_seen)) <= 3 * 2 + 1
    again = CountingEncoders()
    assert_same_batches(first, take(build(tmp_path, cfg, again), 40))
    assert again.text_calls == 0 and again.image_calls == 0


def test_a_text_encoder_that_returns_nan_is_named_before_training(tmp_path):
    write_image(tmp_path / "a.png", 32, 32)
    (tmp_path / "a.txt").write_text("a caption")
    encoders = CountingEncoders()
    broken = lambda captions: (torch.full((len(captions), 3, 8), float("nan")), torch.full((len(captions),), 3))  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"text encoder's output for 'a caption'.*text-encoder file"):
        FolderDataset.from_folder(tmp_path, small_config(), encoders.encode_images, broken, 2, "broken-text")


def test_a_vae_that_returns_nan_is_named_with_the_image(tmp_path):
    write_image(tmp_path / "a.png", 32, 32)
    encoders = CountingEncoders()
    broken = lambda images: encoders.encode_images(images) * float("nan")  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"VAE's latents of .*a\.png.*VAE file"):
        FolderDataset.from_folder(tmp_path, small_config(), broken, encoders.encode_text, 2, "broken-vae")
