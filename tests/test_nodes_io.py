"""ComfyUI objects in and out of the nodes: latent formats, CLIP / VAE encoding, LATENT for VAEDecode."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from dit_trainer.training.models.latent_formats import FLUX, latent_format_for
from dit_trainer.training.models.loader import save_dit
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.executor import call_node
from fake_comfy.encoders import FakeCLIP, FakeVAE

DATA_OPTIONS = dict(resolution=32, enable_buckets=False, bucket_step=16, min_side=16, max_side=64, no_upscale=False,
                    repeats=1, caption_extension=".txt", default_caption="", shuffle_caption=False, keep_tokens=0,
                    caption_separator=",", caption_dropout=0.0, masks="auto", cache_latents_to_disk=True)


def test_flux_latent_format_is_comfyuis_process_in_and_out():
    z = torch.randn(2, 16, 4, 4)
    # comfy/latent_formats.py: Flux(SD3) scale_factor 0.3611, shift_factor 0.1159, (z - shift) * scale.
    assert torch.allclose(FLUX.to_model(z), (z - 0.1159) * 0.3611)
    assert torch.allclose(FLUX.to_vae(FLUX.to_model(z)), z, atol=1e-6)
    assert latent_format_for("zimage") is FLUX
    with pytest.raises(ValueError, match="known: .*zimage"):
        latent_format_for("sd15")


@pytest.fixture
def tiny_model(comfy_host, comfy_pack):
    """A tiny random Z-Image (Flux-VAE latents, 32-dim text) loaded by LoadDiT from models/diffusion_models."""
    torch.manual_seed(0)
    cfg = ZImageConfig(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64, cap_feat_dim=32,
                       t_mid_dim=64, axes_dims=[4, 6, 6])
    save_dit(ZImageDiT(cfg), comfy_host.folder("diffusion_models") / "tiny.safetensors")
    (dit,) = call_node(comfy_pack.NODE_CLASS_MAPPINGS["LoadDiT"], "tiny.safetensors", "fp32", "sdpa", False)
    assert not dit.demo and asdict(dit.latent_format) == asdict(FLUX)  # the pack is its own module tree
    return dit


def write_images(folder, count: int = 2) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo number {i}", encoding="utf-8")
        images.append(pixels)
    return images


def test_dataset_encodes_images_with_the_vae_into_model_space_and_captions_with_the_clip(comfy_host, comfy_pack,
                                                                                         tiny_model):
    images = write_images(comfy_host.root / "input" / "subject")
    clip, vae = FakeCLIP(), FakeVAE()
    dataset, summary = call_node(comfy_pack.NODE_CLASS_MAPPINGS["DatasetFromFolder"],
        tiny_model, "subject", clip=clip, vae=vae, **DATA_OPTIONS)
    assert "encoder id: comfyui:zimage:" in summary
    batch = next(dataset.data.batches(2, seed=0))
    expected = {}
    with torch.inference_mode():  # as ComfyUI runs its models
        for i, pixels in enumerate(images):
            raw = vae.encode(torch.from_numpy(pixels)[None].float() / 255)
            expected[f"photo number {i}"] = FLUX.to_model(raw)[0]
        states = {f"photo number {i}": clip.encode_from_tokens(clip.tokenize(f"photo number {i}"))["cond"][0, :3]
                  for i in range(2)}
    assert not batch.latents.is_inference() and not batch.cond.context.is_inference()  # trainable outside it
    for row in range(2):
        caption = next(c for c, s in states.items() if torch.allclose(batch.cond.context[row, :3], s))
        assert batch.cond.context_lens[row] == 3  # the attention mask, not CLIP's padding
        assert torch.allclose(batch.latents[row], expected[caption], atol=1e-5)


def test_a_different_vae_gets_a_different_cache_key(comfy_host, comfy_pack, tiny_model):
    write_images(comfy_host.root / "input" / "subject")
    node = comfy_pack.NODE_CLASS_MAPPINGS["DatasetFromFolder"]
    clip, vae = FakeCLIP(), FakeVAE()
    first = call_node(node, tiny_model, "subject", clip=clip, vae=vae, **DATA_OPTIONS)[1]
    again = call_node(node, tiny_model, "subject", clip=clip, vae=vae, **DATA_OPTIONS)[1]
    assert "latents: 0 from cache, 2 encoded" in first and "latents: 2 from cache, 0 encoded" in again
    other = FakeVAE()
    with torch.inference_mode():
        other.first_stage_model.weight.add_(1.0)
    changed = call_node(node, tiny_model, "subject", clip=clip, vae=other, **DATA_OPTIONS)[1]
    assert "latents: 0 from cache, 2 encoded" in changed


def test_dataset_needs_clip_and_vae_for_a_real_model(comfy_host, comfy_pack, tiny_model):
    write_images(comfy_host.root / "input" / "subject")
    with pytest.raises(ValueError, match="connect a CLIP and a VAE"):
        call_node(comfy_pack.NODE_CLASS_MAPPINGS["DatasetFromFolder"], tiny_model, "subject", **DATA_OPTIONS)


def test_sample_latent_decodes_with_stock_vae_decode_to_the_image_output(comfy_pack, tiny_model):
    clip, vae = FakeCLIP(), FakeVAE()
    latent, image = call_node(comfy_pack.NODE_CLASS_MAPPINGS["SampleWithLoRA"],
        tiny_model, "None", 1.0, "a photo\nanother photo", "", 32, 32, 2, 1.0, 3.0, 7, clip=clip, vae=vae)
    assert latent["samples"].shape == (2, 16, 4, 4) and image.shape == (2, 32, 32, 3)
    # Stock VAEDecode is vae.decode(samples): the LATENT must be raw VAE latents.
    with torch.inference_mode():
        assert torch.allclose(vae.decode(latent["samples"]), image, atol=1e-6)


def test_sample_without_vae_still_gives_a_latent_and_a_notice_image(comfy_pack, tiny_model):
    latent, image = call_node(comfy_pack.NODE_CLASS_MAPPINGS["SampleWithLoRA"],
        tiny_model, "None", 1.0, "a photo", "", 32, 32, 1, 1.0, 3.0, 0, clip=FakeCLIP())
    assert latent["samples"].shape == (1, 16, 4, 4)
    assert image.shape == (1, 32, 32, 3) and image.std() > 0  # drawn text, not a blank frame


def test_conditioning_input_replaces_the_prompt_text(comfy_pack, tiny_model):
    clip, vae = FakeCLIP(), FakeVAE()
    with torch.inference_mode():  # CLIPTextEncode's output, as the next node receives it
        out = clip.encode_from_tokens(clip.tokenize("a photo"), return_dict=True)
    conditioning = [[out["cond"], {"pooled_output": out["pooled_output"], "attention_mask": out["attention_mask"]}]]
    node = comfy_pack.NODE_CLASS_MAPPINGS["SampleWithLoRA"]
    from_text = call_node(node, tiny_model, "None", 1.0, "a photo", "", 32, 32, 2, 1.0, 3.0, 3, clip=clip, vae=vae)[0]
    from_cond = call_node(node, tiny_model, "None", 1.0, "ignored", "", 32, 32, 2, 1.0, 3.0, 3, positive=conditioning,
                            vae=vae)[0]
    assert torch.allclose(from_text["samples"], from_cond["samples"])


def test_demo_model_refuses_a_connected_clip(comfy_pack):
    (dit,) = call_node(comfy_pack.NODE_CLASS_MAPPINGS["LoadDiT"], "[embedded demo] dit_trainer_demo", "fp32", "sdpa", False)
    with pytest.raises(ValueError, match="demo model uses its own text encoder"):
        call_node(comfy_pack.NODE_CLASS_MAPPINGS["SampleWithLoRA"],
            dit, "None", 1.0, "a red circle", "", 32, 32, 1, 1.0, 1.0, 0, clip=FakeCLIP())


def test_dataset_node_reruns_when_the_folder_contents_change(comfy_host, comfy_pack):
    folder = comfy_host.root / "input" / "subject"
    write_images(folder)
    is_changed = comfy_pack.NODE_CLASS_MAPPINGS["DatasetFromFolder"].IS_CHANGED
    before = is_changed("subject")
    assert is_changed(str(folder)) == before  # absolute or input-relative: the same folder
    (folder / ".dit_cache").mkdir()
    (folder / ".dit_cache" / "entry").write_bytes(b"cache")
    assert is_changed("subject") == before  # our own cache does not count
    (folder / "1.txt").write_text("a longer caption than before", encoding="utf-8")
    assert is_changed("subject") != before


def test_qwen_latent_format_is_comfyuis_wan21_with_one_frame():
    from dit_trainer.training.models.latent_formats import WAN21

    z = torch.randn(2, 16, 1, 4, 6)
    mean = torch.tensor(WAN21.channel_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21.channel_std).view(1, 16, 1, 1, 1)
    # comfy/latent_formats.py Wan21.process_in: (latent - mean) * scale_factor / std, on 5-D video latents.
    assert torch.allclose(WAN21.to_model(z), ((z - mean) / std)[:, :, 0])
    assert WAN21.to_vae(WAN21.to_model(z)).shape == z.shape
    assert torch.allclose(WAN21.to_vae(WAN21.to_model(z)), z, atol=1e-5)
    assert latent_format_for("qwen_image") is WAN21
    with pytest.raises(ValueError, match="3 frames"):
        WAN21.to_model(torch.randn(1, 16, 3, 4, 4))


def test_zimage_turbo_or_base_comes_from_the_name_or_the_variant_widget(comfy_host, comfy_pack):
    from dit_trainer.training.prompts import sampling_defaults

    torch.manual_seed(0)
    cfg = ZImageConfig(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64, cap_feat_dim=32,
                       t_mid_dim=64, axes_dims=[4, 6, 6])
    for name in ("z_image_turbo_tiny.safetensors", "z_image_base_tiny.safetensors", "mine.safetensors"):
        save_dit(ZImageDiT(cfg), comfy_host.folder("diffusion_models") / name)
    load = comfy_pack.NODE_CLASS_MAPPINGS["LoadDiT"]
    variant = lambda name, **kw: call_node(load, name, "fp32", "sdpa", False, **kw)[0].model.variant  # noqa: E731
    assert variant("z_image_turbo_tiny.safetensors") == "zimage-turbo"
    assert variant("z_image_base_tiny.safetensors") == "zimage-base"
    assert variant("mine.safetensors") == "zimage"
    assert variant("mine.safetensors", variant="z-image base") == "zimage-base"
    turbo, base, other = (sampling_defaults(v) for v in ("zimage-turbo", "zimage-base", "zimage"))
    assert (turbo.steps, turbo.cfg, base.steps, base.cfg, other.steps) == (8, 1.0, 50, 5.0, 20)
