"""Node-side rules of training and sampling: strength semantics, run folders, options parsing."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from comfy_merge import comfy_merge
from dit_trainer.training.demo.model import BASE_CHECKPOINT
from dit_trainer.training.models.loader import load_dit
from dit_trainer.training.network.comfy_format import PREFIX, save_adapter
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.executor import call_node

DEMO = "[embedded demo] dit_trainer_demo"


def random_adapter(path, algo: str, style: str = "comfy") -> dict[str, torch.Tensor]:
    """An adapter on the demo base with non-trivial B and magnitudes, saved in key style `style`."""
    torch.manual_seed(1)
    model = load_dit(BASE_CHECKPOINT)
    network = LoRANetwork(model, "zimage", NetworkConfig(algo=algo, rank=4, alpha=2.0))
    with torch.no_grad():
        for adapter in network.adapters:
            if adapter.algo in ("loha", "lokr"):  # every factor: their fresh init is a no-op
                for factor in adapter.parameters():
                    factor.normal_(0, 0.4)
                continue
            adapter.lora_B.normal_(0, 0.2)
            if adapter.magnitude is not None:
                adapter.magnitude.mul_(1 + 0.3 * torch.rand_like(adapter.magnitude))
    save_adapter(network, path, style=style)
    return load_file(str(path))


@pytest.mark.parametrize("algo", ["lora", "dora", "loha", "lokr"])
def test_sample_strength_equals_comfyui_loraloader_merge(comfy_host, comfy_pack, algo):
    tensors = random_adapter(comfy_host.folder("loras") / "random.safetensors", algo)
    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    sampler = nodes["SampleWithLoRA"]
    args = ("a magenta circle\na red square", "", 32, 32, 2, 1.0, 1.0, 5)
    prefixes = sorted({k[: -len(".alpha")] for k in tensors if k.endswith(".alpha")})
    for strength in (0.5, 1.0, 1.5):
        with_adapter = call_node(sampler, dit, "random.safetensors", strength, *args)[0]["samples"]
        merged = copy.deepcopy(dit)
        modules = dict(merged.model.named_modules())
        with torch.no_grad():
            for prefix in prefixes:
                weight = modules[prefix[len(PREFIX):]].weight
                weight.copy_(comfy_merge(weight, tensors, prefix, strength))
        as_loraloader = call_node(sampler, merged, "None", 1.0, *args)[0]["samples"]
        assert torch.allclose(with_adapter, as_loraloader, atol=1e-4), (algo, strength)
    base = call_node(sampler, dit, "None", 1.0, *args)[0]["samples"]
    assert not torch.allclose(base, with_adapter, atol=1e-3)  # the adapter does change the samples
    assert torch.equal(call_node(sampler, dit, "random.safetensors", 0.0, *args)[0]["samples"], base)


def test_sample_reads_a_kohya_file_like_our_own(comfy_host, comfy_pack):
    kohya = random_adapter(comfy_host.folder("loras") / "kohya.safetensors", "lora", style="kohya")
    assert all(k.startswith("lora_unet_") for k in kohya)
    random_adapter(comfy_host.folder("loras") / "ours.safetensors", "lora")
    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    args = ("a magenta circle", "", 32, 32, 2, 1.0, 1.0, 3)
    from_kohya = call_node(nodes["SampleWithLoRA"], dit, "kohya.safetensors", 0.7, *args)[0]["samples"]
    from_ours = call_node(nodes["SampleWithLoRA"], dit, "ours.safetensors", 0.7, *args)[0]["samples"]
    assert torch.allclose(from_kohya, from_ours, atol=1e-5)


def test_run_names_cannot_leave_the_output_folder(comfy_pack):
    safe_name = comfy_pack.nodes.host.safe_name
    assert safe_name("../../etc/passwd", "name") == "etc_passwd"
    assert safe_name("my run/v2", "name") == "my_run_v2"
    with pytest.raises(ValueError, match="TrainLoRA name"):
        safe_name("../..", "TrainLoRA name")


def test_train_options_merge_extra_json(comfy_pack):
    train_lora = comfy_pack.nodes.train_lora
    widgets = dict(steps=10, batch_size=1, grad_accum=1, lr=1e-4, optimizer="adamw", weight_decay=0.0,
                   schedule="cosine", warmup_steps=0, max_grad_norm=1.0, mixed_precision="no", seed=1, ema_decay=0.0,
                   save_every=5, keep_last=2, sample_every=0, loss="huber", huber_c=0.2, timestep_sampling="shift",
                   discrete_flow_shift=2.0)
    cfg = train_lora.train_config(widgets, '{"warmup_ratio": 0.1, "loss": {"huber_schedule": "snr"}}')
    assert cfg.warmup_ratio == 0.1 and cfg.loss.kind == "huber" and cfg.loss.huber_c == 0.2
    assert cfg.loss.huber_schedule == "snr" and cfg.timesteps.discrete_flow_shift == 2.0
    with pytest.raises(ValueError, match="not valid JSON"):
        train_lora.train_config(widgets, "{warmup")
    with pytest.raises(ValueError, match="unknown train option"):
        train_lora.train_config(widgets, '{"lr_warmup": 3}')
    with pytest.raises(ValueError, match="extra_options"):
        train_lora.train_config(widgets, '{"loss": {"kind_of": "l1"}}')


def test_loss_points_are_bin_means_without_non_finite_steps(comfy_pack):
    loss_points = comfy_pack.nodes.train_lora.loss_points
    losses = [float(i) for i in range(2500)]
    points = loss_points(losses)
    assert len(points) <= 1000 and points[-1][0] == 2500
    assert points[0] == [3, 1.0]  # steps 1-3, mean of 0, 1, 2
    assert loss_points([1.0, math.nan, 3.0], limit=10) == [[1, 1.0], [3, 3.0]]


def test_weighted_mask_takes_one_mask_per_image_or_one_for_all(comfy_pack):
    masks_per_item = comfy_pack.nodes.weighted_mask.masks_per_item
    one = torch.rand(1, 8, 8)
    assert all(torch.equal(m, one[0]) for m in masks_per_item(one, 3))
    three = torch.rand(3, 8, 8)
    assert torch.equal(masks_per_item(three, 3)[2], three[2])
    with pytest.raises(ValueError, match="batch of 2 masks for 3 dataset images"):
        masks_per_item(torch.rand(2, 8, 8), 3)


def test_rank_pattern_lines_parse_and_bad_lines_name_the_option(comfy_pack):
    build = comfy_pack.nodes.build_lora_network
    assert build.pattern_values("layers\\.0\\..* = 32\n\n(?=x)a=b = 4", "rank_pattern", int) == {
        "layers\\.0\\..*": 32, "(?=x)a=b": 4}
    with pytest.raises(ValueError, match="rank_pattern: line 'layers' is not 'regex = int'"):
        build.pattern_values("layers", "rank_pattern", int)


NETWORK = dict(algo="dora", rank=4, alpha=2.0, use_rslora=False, dora_axis="input", init="kaiming", dropout=0.0,
               rank_dropout=0.0, module_dropout=0.0, train_refiners=False, exclude_mod=True, include_patterns="",
               exclude_patterns="", rank_pattern="", alpha_pattern="", conv_dim=0, conv_alpha=1.0, split_qkv=False,
               loraplus_lr_ratio=0.0, verbose=False)
DEMO_DATA = dict(resolution=32, enable_buckets=False, bucket_step=16, min_side=16, max_side=64, no_upscale=False,
                 repeats=1, caption_extension=".txt", default_caption="", shuffle_caption=False, keep_tokens=0,
                 caption_separator=",", caption_dropout=0.0, masks="auto", cache_latents_to_disk=True)
ONE_TINY_STEP = dict(steps=1, batch_size=2, grad_accum=1, lr=1e-7, optimizer="adamw", weight_decay=0.0,
                     schedule="constant", warmup_steps=0, max_grad_norm=1.0, timestep_sampling="sigmoid",
                     discrete_flow_shift=3.0, loss="l2", huber_c=0.1, mixed_precision="no", seed=0, ema_decay=0.0,
                     save_every=0, keep_last=1, sample_every=0, sample_prompts="", resume=False)


def test_training_continues_from_the_chosen_file(comfy_host, comfy_pack):
    start = random_adapter(comfy_host.folder("loras") / "start.safetensors", "dora")
    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    data = call_node(nodes["DatasetFromFolder"], dit, "[embedded demo] magenta shapes", **DEMO_DATA)[0]
    for continue_from, name in (("start.safetensors", "continued"), ("None", "fresh")):
        network = call_node(nodes["BuildLoRANetwork"], dit, continue_from=continue_from, **NETWORK)[0]
        call_node(nodes["TrainLoRA"], dit, network, data, name=name, unique_id="1", **ONE_TINY_STEP)
    continued = load_file(comfy_host.folder("loras") / "continued.safetensors")
    fresh = load_file(comfy_host.folder("loras") / "fresh.safetensors")
    # One step at lr 1e-7 barely moves the weights: the continued run still holds the file's adapter.
    assert all(torch.allclose(continued[k], start[k], atol=1e-5) for k in start)
    assert not torch.allclose(fresh[next(k for k in start if k.endswith("lora_B.weight"))],
                              continued[next(k for k in start if k.endswith("lora_B.weight"))], atol=1e-3)
