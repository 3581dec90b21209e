"""Edit pairs: control images beside the training images, encoded to the target's bucket."""

import pytest
import torch

from data_helpers import CountingEncoders, build, small_config, write_image
from dit_trainer.training.data.buckets import cover
from dit_trainer.training.data.images import decode_image, fit_to_bucket
from dit_trainer.training.demo.pixel_vae import PixelVAE


def control_latents(path, bucket) -> torch.Tensor:
    """What the pair's reference must be: the control image covered and centre-cropped to the bucket, encoded."""
    rgb, _ = decode_image(path.read_bytes())
    placement = cover((rgb.shape[-1], rgb.shape[-2]), bucket)
    return PixelVAE().encode(fit_to_bucket(rgb, placement)[None])[0]


def pairs(folder, controls: dict[str, list[tuple[int, int]]]):
    """Training images a.png, b.png (32x32) with control images of the given sizes in control/."""
    paths = {}
    for seed, (stem, sizes) in enumerate(controls.items()):
        write_image(folder / f"{stem}.png", 32, 32, seed=seed)
        (folder / f"{stem}.txt").write_text(f"edit {stem}")
        names = [f"{stem}.png"] if len(sizes) == 1 else [f"{stem}_{i}.png" for i in range(len(sizes))]
        paths[stem] = [write_image(folder / "control" / n, w, h, seed=100 + 10 * seed + i)
                       for i, (n, (w, h)) in enumerate(zip(names, sizes))]
    return paths


def test_every_batch_carries_each_pairs_reference_at_the_target_bucket(tmp_path):
    controls = pairs(tmp_path, {"a": [(48, 40)], "b": [(20, 24)]})  # other sizes than the targets
    dataset = build(tmp_path, small_config(control_folder="control"), CountingEncoders())
    assert "edit pairs: 1 control image(s)" in dataset.summary()
    by_target = {}
    for item, latents in zip(dataset.items, dataset._latents):
        by_target[item.image_path.stem] = latents
    seen = set()
    for batch, _ in zip(dataset.batches(1, seed=0), range(6)):
        (reference,) = batch.cond.reference_latents
        stem = next(s for s, lat in by_target.items() if torch.equal(lat, batch.latents[0]))
        assert torch.allclose(reference[0], control_latents(controls[stem][0], (32, 32)), atol=1e-6)
        seen.add(stem)
    assert seen == {"a", "b"}
    assert len(dataset.preview_references()) == 1 and dataset.preview_references()[0].shape[0] == 1


def test_several_references_keep_their_order_and_come_from_the_cache_next_time(tmp_path):
    controls = pairs(tmp_path, {"a": [(32, 32), (40, 40)], "b": [(32, 32), (16, 16)]})
    cfg = small_config(control_folder="control", enable_buckets=False)
    encoders = CountingEncoders()
    dataset = build(tmp_path, cfg, encoders)
    batch = next(dataset.batches(2, seed=0))
    assert len(batch.cond.reference_latents) == 2
    first_stem = next(i.image_path.stem for i, lat in zip(dataset.items, dataset._latents)
                      if torch.equal(lat, batch.latents[0]))
    for index, reference in enumerate(batch.cond.reference_latents):
        assert torch.allclose(reference[0], control_latents(controls[first_stem][index], (32, 32)), atol=1e-6)
    calls = encoders.image_calls
    assert calls == 6  # 2 targets + 4 control images
    again = CountingEncoders()
    cached = build(tmp_path, cfg, again)
    assert again.image_calls == 0
    assert torch.equal(next(cached.batches(2, seed=0)).cond.reference_latents[1], batch.cond.reference_latents[1])


def test_an_image_without_its_control_image_is_named(tmp_path):
    pairs(tmp_path, {"a": [(32, 32)]})
    write_image(tmp_path / "lonely.png", 32, 32, seed=9)
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\).*no control image.*lonely\.png"):
        build(tmp_path, small_config(control_folder="control"), CountingEncoders())


def test_pairs_with_different_reference_counts_are_refused(tmp_path):
    pairs(tmp_path, {"a": [(32, 32)], "b": [(32, 32), (32, 32)]})
    with pytest.raises(ValueError, match=r"different numbers of control images \(\[1, 2\]\)"):
        build(tmp_path, small_config(control_folder="control"), CountingEncoders())


def test_the_control_folder_is_not_read_as_training_images_and_no_setting_means_no_references(tmp_path):
    pairs(tmp_path, {"a": [(32, 32)]})
    dataset = build(tmp_path, small_config(), CountingEncoders())
    assert [i.image_path.name for i in dataset.items] == ["a.png"]
    assert next(dataset.batches(1, seed=0)).cond.reference_latents == ()
    assert dataset.preview_references() == ()


@pytest.mark.parametrize("bad", ["../elsewhere", ".hidden", "masks", "a/b"])
def test_a_control_folder_must_be_a_plain_subfolder_name(bad):
    with pytest.raises(ValueError, match="control_folder"):
        small_config(control_folder=bad)
