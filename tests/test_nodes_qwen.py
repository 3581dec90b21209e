"""Qwen-Image and Qwen-Image-Edit through the nodes: video-shaped Wan 2.1 latents in and out, the edit
pair's control image read by the text encoder (as TextEncodeQwenImageEdit does) and by the model as a
reference latent, ComfyUI-keyed adapters saved."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dit_trainer.training.models.loader import save_dit
from dit_trainer.training.models.qwen_image import QwenImageConfig, QwenImageDiT
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.core_nodes import CORE_LIKE, VAELoader
from fake_comfy.executor import PromptExecutor
from test_nodes_flux import graph, pictures

EDIT = QwenImageConfig(in_channels=16, num_layers=1, num_heads=2, head_dim=16, joint_attention_dim=32,
                       axes_dim=[4, 6, 6], zero_cond_t=True)


@pytest.fixture
def executor(comfy_host, comfy_pack, monkeypatch):
    monkeypatch.setattr(VAELoader, "shape", {"frames": True})  # the Wan 2.1 VAE's [B, 16, 1, h, w]
    torch.manual_seed(0)
    model = QwenImageDiT(EDIT)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    save_dit(model, comfy_host.folder("diffusion_models") / "qwen_edit.safetensors",
             {"variant": "qwen-image-edit-2511"})
    folder = comfy_host.root / "input" / "pairs"
    pictures(folder, ["0", "1"])
    pictures(folder / "control", ["0", "1"], size=48, seed=1)
    for stem in ("0", "1"):
        (folder / f"{stem}.txt").write_text("make it brighter")
    return PromptExecutor(comfy_host, {**comfy_pack.NODE_CLASS_MAPPINGS, **CORE_LIKE})


def test_qwen_edit_pairs_train_with_the_control_image_in_text_and_latents(comfy_host, executor):
    prompt = graph("qwen_edit.safetensors", "pairs", "qwen_edit", control_folder="control", reference=True)
    prompt["10"]["inputs"]["positive"] = ["13", 0]  # Qwen has no FluxGuidance: ReferenceLatent straight in
    run = executor.execute(prompt)
    dit, dataset = run.outputs["1"][0], run.outputs["5"][0]
    assert dit.architecture == "qwen_image" and dit.model.cfg.zero_cond_t  # the 2511 variant from metadata
    assert dataset.encoders.text_reads_images
    batch = next(dataset.data.batches(2, seed=0))
    (reference,) = batch.cond.reference_latents
    assert reference.shape == (2, 16, 4, 4)  # model space, one frame: the 48 px control at its 32 px bucket
    # The text encoder saw each pair's control image: the caption is the same, the states are not.
    assert not torch.equal(batch.cond.context[0], batch.cond.context[1])
    assert run.ui["6"]["dit_trainer_samples"]
    latent = run.outputs["10"][0]["samples"]
    assert latent.shape == (1, 16, 1, 4, 4)  # a LATENT stock VAEDecode of the Wan VAE takes
    keys = load_file(str(comfy_host.folder("loras") / "qwen_edit.safetensors"))
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert not any(".img_mod." in k for k in keys)  # exclude_mod is on by default


def test_control_images_change_the_text_states_only_where_the_encoder_reads_them(comfy_host, executor):
    prompt = graph("qwen_edit.safetensors", "pairs", "plain", reference=True)
    prompt["10"]["inputs"]["positive"] = ["13", 0]
    plain = next(executor.execute(prompt).outputs["5"][0].data.batches(2, seed=0))
    assert plain.cond.reference_latents == ()
    assert torch.equal(plain.cond.context[0], plain.cond.context[1])  # same caption, no image: same states


@pytest.mark.parametrize("style,area,prefix", [("TextEncodeQwenImageEditPlus", 384 * 384, "picture"),
                                                ("TextEncodeQwenImageEdit", 1024 * 1024, "make")])
def test_captions_meet_the_image_as_the_inference_node_shows_it(comfy_pack, style, area, prefix):
    from fake_comfy.encoders import FakeCLIP

    encoding = comfy_pack.nodes.edit_text_encoding
    clip = FakeCLIP()
    tokens = encoding.tokenize_with_images(clip, "make it brighter", [torch.rand(3, 600, 800)], style)
    (shown,) = clip.images_seen
    assert shown.shape[0] == 1 and shown.shape[-1] == 3  # IMAGE layout, as ComfyUI's node passes it
    assert abs(shown.shape[1] * shown.shape[2] / area - 1) < 0.01 and abs(shown.shape[2] / shown.shape[1] - 4 / 3) < 0.01
    assert isinstance(tokens[0], tuple) and tokens[1].startswith(prefix)  # the image token, then the text
    assert clip.template_seen == (encoding.PLUS_TEMPLATE if style.endswith("Plus") else None)
