"""Training adapters: merged into the base for training steps only, never in previews or exported files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from comfy_merge import comfy_merge
from dit_trainer.training.checkpoint import load_resumable
from dit_trainer.training.conditioning import Conditioning
from dit_trainer.training.config import TrainConfig
from dit_trainer.training.data.latents import LatentDataset
from dit_trainer.training.demo.model import BASE_CHECKPOINT
from dit_trainer.training.loop import PreviewSpec, render_previews, train
from dit_trainer.training.models.loader import load_dit
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT
from dit_trainer.training.network.comfy_format import PREFIX, read_safetensors, save_adapter
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.network.training_adapter import METADATA_KEY, SETTINGS_KEY, TrainingAdapter, file_digest
from dit_trainer.training.run_config import RunConfig, load_run_config, parse_run_config
from dit_trainer.training.runner import run_training
from demo_toml import write_demo_config
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)

# Wider than the trained network: the modulation and refiner layers are merged but never trained.
ADAPTER_LAYERS = NetworkConfig(rank=4, alpha=2.0, exclude_mod=False, train_refiners=True)
TRAINED = NetworkConfig(rank=2, alpha=2.0)


def tiny_model_and_data():
    torch.manual_seed(0)
    cfg = ZImageConfig(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64, cap_feat_dim=8,
                       t_mid_dim=32, axes_dims=[4, 6, 6])
    model = ZImageDiT(cfg).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    data = LatentDataset(torch.randn(4, 4, 4, 4, generator=g),
                         Conditioning(torch.randn(4, 3, 8, generator=g), torch.full((4,), 3)))
    return model, data


def adapter_file(path, seed: int, up_std: float = 0.3, algo: str = "lora", style: str = "comfy"):
    """A LoRA file for the tiny model (up ~ N(0, up_std), 0 for a zero adapter) and its tensors."""
    model, _ = tiny_model_and_data()
    torch.manual_seed(seed)
    network = LoRANetwork(model, "zimage", NetworkConfig(**{**ADAPTER_LAYERS.to_dict(), "algo": algo}))
    with torch.no_grad():
        for adapter in network.adapters:
            if algo in ("loha", "lokr"):  # every factor: their fresh init is a no-op
                for factor in adapter.parameters():
                    factor.normal_(0, up_std)
                continue
            adapter.lora_B.normal_(0, up_std)  # std 0: all zeros
            if adapter.magnitude is not None:
                adapter.magnitude.mul_(1 + 0.3 * torch.rand_like(adapter.magnitude))
    save_adapter(network, path, style=style)
    return path, load_file(str(path))


def tiny_run(training_adapter_path=None, strength: float = 1.0, network_cfg: NetworkConfig = TRAINED):
    model, data = tiny_model_and_data()
    network = LoRANetwork(model, "zimage", network_cfg).attach()
    adapter = None if training_adapter_path is None else TrainingAdapter(model, "zimage", training_adapter_path,
                                                                         strength)
    return model, network, data, adapter


def train_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(steps=4, batch_size=2, lr=5e-3, seed=3), **overrides})


def weights_seen_by_training_forwards(model, names) -> list[dict[str, torch.Tensor]]:
    """The named layers' weights at each forward with autograd on (training steps; previews sample under no_grad)."""
    modules, seen = dict(model.named_modules()), []

    def record(module, args):
        if torch.is_grad_enabled():
            seen.append({name: modules[name].weight.detach().cpu().clone() for name in names})

    model.register_forward_pre_hook(record)
    return seen


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_training_steps_see_comfyui_loraloader_merge_and_a_different_loss(tmp_path, strength):
    path, tensors = adapter_file(tmp_path / "undistill.safetensors", seed=5)
    model, network, data, adapter = tiny_run(path, strength)
    base = {name: m.weight.detach().clone() for name, m in model.named_modules() if name in adapter.names}
    seen = weights_seen_by_training_forwards(model, adapter.names)
    spec = PreviewSpec(data.cond.rows([0]), (4, 4, 4), decode=lambda latents: [latents], steps=2)
    # A preview after step 2 lifts the adapter: steps 3 and 4 must see it merged again.
    with_adapter = train(model, network, data, train_cfg(sample_every=2), previews=spec, training_adapter=adapter)
    assert len(seen) == 4 and len(adapter.names) == 17
    for name, weight in base.items():
        expected = comfy_merge(weight, tensors, PREFIX + name, strength).to(weight.dtype)
        for step in seen:
            assert torch.equal(step[name], expected), name
        assert not torch.equal(expected, weight), name
    model, network, data, _ = tiny_run()
    without = train(model, network, data, train_cfg())
    assert with_adapter.losses[0] != pytest.approx(without.losses[0], rel=1e-3)


@pytest.mark.parametrize("algo,style,dtype", [("lora", "kohya", torch.float32), ("dora", "comfy", torch.float32),
                                             ("lora", "comfy", torch.bfloat16), ("loha", "comfy", torch.float32),
                                             ("lokr", "kohya", torch.float32)])
def test_foreign_dora_and_bf16_merges_are_comfyui_merges(tmp_path, algo, style, dtype):
    path, _ = adapter_file(tmp_path / f"{algo}_{style}.safetensors", seed=6, algo=algo, style=style)
    _, comfy_tensors = adapter_file(tmp_path / f"{algo}_comfy_keys.safetensors", seed=6, algo=algo)
    model, _ = tiny_model_and_data()
    model.to(dtype)
    adapter = TrainingAdapter(model, "zimage", path, strength=0.6)
    modules = dict(model.named_modules())
    base = {name: modules[name].weight.detach().clone() for name in adapter.names}
    with adapter.merged():
        for name in adapter.names:
            # ComfyUI: float32 merge of the stored weight, rounded back to its dtype.
            expected = comfy_merge(base[name], comfy_tensors, PREFIX + name, 0.6).to(dtype)
            # DoRA: the engine's norm of W0 + s B A is computed without the product; LoHa / LoKr: s * (alpha / r)
            # multiplied in another order. fp32 rounding apart.
            torch.testing.assert_close(modules[name].weight, expected, rtol=0, atol=0 if algo == "lora" else 2e-6)
    assert all(torch.equal(modules[name].weight, base[name]) for name in adapter.names)


def test_export_and_checkpoint_hold_the_trained_network_only(tmp_path):
    zero, _ = adapter_file(tmp_path / "zero.safetensors", seed=5, up_std=0.0)
    real, _ = adapter_file(tmp_path / "real.safetensors", seed=5)
    exported = {}
    for label, path in (("without", None), ("zero", zero), ("real", real)):
        model, network, data, adapter = tiny_run(path)
        train(model, network, data, train_cfg(), run_dir=tmp_path / label, training_adapter=adapter)
        exported[label] = load_file(str(save_adapter(network, tmp_path / f"{label}.out.safetensors")))
        state = load_resumable(tmp_path / label)[1]
        assert state.trainable.keys() == network.state_dict().keys()
    # A zero training adapter merges W0 + 0 = W0: the run and its file are the run without one, bit for bit.
    assert exported["zero"].keys() == exported["without"].keys()
    for key, tensor in exported["without"].items():
        assert torch.equal(exported["zero"][key], tensor), key
    # A real one shapes the training but adds no tensor: not its refiner / modulation layers, not its factors.
    assert exported["real"].keys() == exported["without"].keys()
    assert not any("refiner" in key or "adaLN" in key for key in exported["real"])
    ups = [key for key in exported["real"] if key.endswith("lora_B.weight")]
    assert any(not torch.allclose(exported["real"][k], exported["without"][k], atol=1e-6) for k in ups)


def test_previews_are_sampled_on_the_plain_base(tmp_path):
    path, _ = adapter_file(tmp_path / "undistill.safetensors", seed=5)
    model, network, data, adapter = tiny_run(path)
    spec = PreviewSpec(data.cond.rows([0]), (4, 4, 4), decode=lambda latents: [latents], steps=3, seed=2)
    events = []
    train(model, network, data, train_cfg(sample_every=4), on_progress=events.append, previews=spec,
          training_adapter=adapter)
    preview = events[-1].previews[0]  # sampled at the last step, with the final weights
    assert torch.equal(render_previews(model, spec)[0], preview)  # the base is plain again after train()
    with adapter.merged():
        assert (render_previews(model, spec)[0] - preview).abs().max() > 1e-4  # the merged base samples otherwise


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("ending", ["normal", "stop", "exception", "previews"])
def test_the_base_comes_back_bit_for_bit(tmp_path, ending):
    path, _ = adapter_file(tmp_path / "undistill.safetensors", seed=5)
    model, network, data, adapter = tiny_run(path, strength=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = weights_seen_by_training_forwards(model, adapter.names)

    def on_progress(event):
        if ending == "exception" and event.step == 2:
            raise Interrupted("raised mid-run, as ComfyUI's Cancel raises from a progress update")

    def broken_decode(latents):
        raise Interrupted("a preview fails while the training adapter is lifted")

    run = dict(on_progress=on_progress, should_stop=lambda: ending == "stop", run_dir=tmp_path / "run",
               training_adapter=adapter)
    if ending == "previews":
        run["previews"] = PreviewSpec(data.cond.rows([0]), (4, 4, 4), broken_decode, steps=2)
    if ending in ("exception", "previews"):
        with pytest.raises(Interrupted):
            train(model, network, data, train_cfg(sample_every=2), **run)
    else:
        train(model, network, data, train_cfg(), **run)
    assert seen and not torch.equal(seen[0][adapter.names[0]], before[adapter.names[0] + ".weight"])  # it was merged
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == before[key].dtype and torch.equal(tensor, before[key]), key


def test_resume_refuses_another_training_adapter_or_strength(tmp_path):
    first, _ = adapter_file(tmp_path / "first.safetensors", seed=5)
    other, _ = adapter_file(tmp_path / "other.safetensors", seed=8)
    model, network, data, adapter = tiny_run(first)
    steps = []
    train(model, network, data, train_cfg(), on_progress=lambda e: steps.append(e.step),
          should_stop=lambda: len(steps) >= 2, run_dir=tmp_path / "run", training_adapter=adapter)
    recorded = load_resumable(tmp_path / "run")[1].extra["settings"][SETTINGS_KEY]
    assert recorded == {"sha256": file_digest(first), "strength": 1.0}
    for path, strength in ((other, 1.0), (first, 0.5), (None, 1.0)):
        model, network, data, adapter = tiny_run(path, strength)
        with pytest.raises(ValueError, match=f"cannot resume .*{SETTINGS_KEY}"):
            train(model, network, data, train_cfg(), run_dir=tmp_path / "run", resume_from=tmp_path / "run",
                  training_adapter=adapter)
    model, network, data, adapter = tiny_run(first)  # the same file continues
    result = train(model, network, data, train_cfg(), run_dir=tmp_path / "run", resume_from=tmp_path / "run",
                   training_adapter=adapter)
    assert result.steps_done == 4 and len(result.losses) == 4


def test_dora_under_the_adapter_and_a_trained_base_are_refused(tmp_path):
    path, _ = adapter_file(tmp_path / "undistill.safetensors", seed=5)
    model, network, data, adapter = tiny_run(path, network_cfg=NetworkConfig(algo="dora", rank=2))
    with pytest.raises(ValueError, match="DoRA .*layers.0.attention.qkv.*use algo='lora'"):
        train(model, network, data, train_cfg(), training_adapter=adapter)
    model, _, data, adapter = tiny_run(path)
    model.requires_grad_(True)
    with pytest.raises(ValueError, match="merged into frozen base weights"):
        train(model, model, data, train_cfg(), training_adapter=adapter)


def test_a_file_for_another_model_is_refused_when_built(tmp_path):
    path, _ = adapter_file(tmp_path / "undistill.safetensors", seed=5)
    torch.manual_seed(0)
    wider = ZImageDiT(ZImageConfig(in_channels=4, dim=48, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64,
                                   cap_feat_dim=8, t_mid_dim=32, axes_dims=[4, 10, 10]))
    with pytest.raises(ValueError, match="undistill.safetensors"):
        TrainingAdapter(wider, "zimage", path)


def test_cli_network_table_reads_the_training_adapter(tmp_path):
    cfg = parse_run_config({"network": {"rank": 4, "training_adapter": "undistill.safetensors",
                                        "training_adapter_strength": 0.5}, "data": {}}, tmp_path)
    assert cfg.network.training_adapter == str(tmp_path / "undistill.safetensors")
    assert cfg.network.training_adapter_strength == 0.5 and cfg.network.config.rank == 4
    assert parse_run_config({"data": {}}).network.training_adapter == ""
    with pytest.raises(ValueError, match=r"\[network\] training_adapter_strength must be a finite number"):
        parse_run_config({"network": {"training_adapter_strength": "1"}, "data": {}})


def demo_training_adapter(path, seed: int = 1):
    """A training adapter for the embedded demo base, on its attention / MLP and modulation layers."""
    torch.manual_seed(seed)
    undistill = LoRANetwork(load_dit(BASE_CHECKPOINT), "zimage", NetworkConfig(rank=4, alpha=4.0, exclude_mod=False))
    with torch.no_grad():
        for layer in undistill.adapters:
            layer.lora_B.normal_(0, 0.1)
    return save_adapter(undistill, path)


def test_the_cli_trains_with_it_and_resume_refuses_another(tmp_path):
    demo_training_adapter(tmp_path / "undistill.safetensors")
    demo_training_adapter(tmp_path / "other.safetensors", seed=2)

    def write(adapter: str, name: str = "turbo") -> RunConfig:
        return load_run_config(write_demo_config(tmp_path, f"""
            [network]
            rank = 4
            training_adapter = "{adapter}"
            [train]
            steps = 2
            batch_size = 4
            [output]
            dir = "runs"
            name = "{name}"
        """))

    result = run_training(write("undistill.safetensors"))
    _, meta = read_safetensors(result.adapter_path)
    assert json.loads(meta[METADATA_KEY])["sha256"] == file_digest(tmp_path / "undistill.safetensors")
    assert not any("adaLN" in key for key in read_safetensors(result.adapter_path)[0])
    plain = run_training(write("", name="plain"))
    assert result.train.losses[0] != pytest.approx(plain.train.losses[0], rel=1e-4)  # it trained on the merged base
    with pytest.raises(ValueError, match=f"cannot resume .*{SETTINGS_KEY}.sha256"):
        run_training(write("other.safetensors"), mode="resume")
    # `train` with another training adapter is another run: the old one is moved aside, not continued.
    assert run_training(write("other.safetensors")).train.steps_done == 2
    assert len(list((tmp_path / "runs").glob("turbo.replaced-*"))) == 1


def test_the_nodes_train_with_it_and_record_it(comfy_host, comfy_pack):
    from fake_comfy.executor import call_node
    from test_nodes_training import DEMO, DEMO_DATA, NETWORK, ONE_TINY_STEP

    path = demo_training_adapter(comfy_host.folder("loras") / "undistill.safetensors")
    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    assert "training_adapter" in nodes["BuildLoRANetwork"].INPUT_TYPES()["optional"]  # old workflows validate
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    base = {k: v.clone() for k, v in dit.model.state_dict().items()}
    seen = weights_seen_by_training_forwards(dit.model, ["layers.0.adaLN_modulation.0"])
    data = call_node(nodes["DatasetFromFolder"], dit, "[embedded demo] magenta shapes", **DEMO_DATA)[0]
    network, summary = call_node(nodes["BuildLoRANetwork"], dit, training_adapter="undistill.safetensors",
                                 training_adapter_strength=0.8, continue_from="None",
                                 **{**NETWORK, "algo": "lora"})
    assert network.training_adapter == path and "training adapter undistill.safetensors at 0.8" in summary
    out = call_node(nodes["TrainLoRA"], dit, network, data, name="turbo", unique_id="1", **ONE_TINY_STEP)
    saved = load_file(out["result"][1])
    merged = comfy_merge(base["layers.0.adaLN_modulation.0.weight"], load_file(str(path)),
                         PREFIX + "layers.0.adaLN_modulation.0", 0.8)
    assert seen and torch.equal(seen[0]["layers.0.adaLN_modulation.0"], merged)  # the step trained on the merged base
    assert not any("adaLN" in key for key in saved)  # the adapter's own layers stay out of the file
    assert all(torch.equal(tensor, base[key]) for key, tensor in dit.model.state_dict().items())
    settings = load_resumable(comfy_host.root / "output" / "dit_trainer" / "turbo")[1].extra["settings"]
    assert settings[SETTINGS_KEY] == {"sha256": file_digest(path), "strength": 0.8}
    _, meta = read_safetensors(out["result"][1])
    assert json.loads(meta[METADATA_KEY]) == {"file": "undistill.safetensors", **settings[SETTINGS_KEY]}
    # Another strength is another run: with resume on it starts over (the old run moved aside), never mixes.
    network = call_node(nodes["BuildLoRANetwork"], dit, training_adapter="undistill.safetensors",
                        training_adapter_strength=0.5, continue_from="None", **{**NETWORK, "algo": "lora"})[0]
    call_node(nodes["TrainLoRA"], dit, network, data, name="turbo", unique_id="1", **{**ONE_TINY_STEP, "resume": True})
    assert len(list((comfy_host.root / "output" / "dit_trainer").glob("turbo.replaced-*"))) == 1
