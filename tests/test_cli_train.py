"""`dit-trainer train / resume / ema-merge` on the embedded demo model, end to end."""

import json
import textwrap

import pytest
import torch

from dit_trainer.training.checkpoint import ADAPTER_FILE, list_checkpoints
from dit_trainer.training.cli import main
from dit_trainer.training.network.comfy_format import read_safetensors
from dit_trainer.training.posthoc_ema import merge_adapter_files
from dit_trainer.training.run_config import load_run_config
from dit_trainer.training.runner import run_training
from demo_toml import write_demo_config


def write_config(tmp_path, steps: int, extra_train: str = "") -> str:
    tables = f"""
        [network]
        algo = "dora"
        rank = 4
        alpha = 4

        [train]
        steps = {steps}
        batch_size = 4
        lr = 3e-3
        save_every = 2
        keep_last = 0
        seed = 5
        {extra_train}

        [train.timesteps]
        method = "sigmoid"

        [sample]
        prompts = "a magenta circle --d 3 --s 4 --w 32 --h 32"

        [output]
        dir = "runs"
        name = "cli_demo"
    """
    return str(write_demo_config(tmp_path, tables, data="mask_min_weight = 0.2\n"))


def test_train_then_resume_then_ema_merge(tmp_path):
    config = write_config(tmp_path, steps=4)
    assert main(["train", config]) == 0
    run_dir = tmp_path / "runs" / "cli_demo"
    adapter, meta = read_safetensors(run_dir / "cli_demo.safetensors")
    assert meta["dit_trainer_algo"] == "dora" and meta["ss_steps"] == "4"
    assert any(k.endswith(".dora_scale") for k in adapter)

    # Extend the same run to 6 steps: resume continues from step 4, it does not start over
    # (starting over would rewrite the step 2 and 4 checkpoints).
    before = {p.name: (p / ADAPTER_FILE).read_bytes() for p in list_checkpoints(run_dir)}
    write_config(tmp_path, steps=6)
    assert main(["resume", config]) == 0
    after = list_checkpoints(run_dir)
    assert [p.name for p in after] == ["step_000002", "step_000004", "step_000006"]
    assert all((p / ADAPTER_FILE).read_bytes() == before[p.name] for p in after[:2])
    _, meta = read_safetensors(run_dir / "cli_demo.safetensors")
    assert meta["ss_steps"] == "6"

    out = tmp_path / "merged.safetensors"
    assert main(["ema-merge", str(run_dir), "--out", str(out), "--beta", "0.5"]) == 0
    merged, _ = read_safetensors(out)
    expected, _ = merge_adapter_files([c / ADAPTER_FILE for c in list_checkpoints(run_dir)], "beta", 0.5)
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key


def test_config_errors_name_the_key(tmp_path):
    config = write_config(tmp_path, steps=2, extra_train="learning_rate = 1e-4")
    with pytest.raises(ValueError, match="learning_rate"):
        load_run_config(config)
    assert main(["train", config]) == 2  # the CLI prints the error and exits 2


def test_readme_example_config_is_valid():
    import re
    import tomllib
    from pathlib import Path

    from dit_trainer.training.prompts import parse_prompts
    from dit_trainer.training.run_config import parse_run_config

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    # Every example in the README parses; a fragment (one table's options) joins the minimal [data] table.
    configs = [parse_run_config({"data": {"folder": "embedded-demo"}, **tomllib.loads(block)}) for block in blocks]
    (cfg,) = [c for c, block in zip(configs, blocks) if "[network]" in block]
    assert cfg.network.config.algo == "dora" and cfg.train.ema_decay == 0.99
    assert len(parse_prompts(cfg.sample.prompts)) == 2


def test_real_model_trains_from_dataset_caches_without_encoders(tmp_path, caplog):
    """The CLI has no VAE / text encoder of a real model: it trains from DatasetFromFolder's caches."""
    import torch.nn.functional as F
    from data_helpers import write_image

    from dit_trainer.training.data.config import DataConfig
    from dit_trainer.training.data.folder_dataset import FolderDataset
    from dit_trainer.training.demo.model import demo_text_encoder
    from dit_trainer.training.models.loader import save_dit
    from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT

    torch.manual_seed(0)
    model = ZImageDiT(ZImageConfig(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64,
                                   cap_feat_dim=32, t_mid_dim=32, axes_dims=[4, 6, 6]))
    save_dit(model, tmp_path / "base.safetensors")
    folder = tmp_path / "data"
    for i in range(3):
        write_image(folder / f"{i}.png", 64, 64, seed=i)
        (folder / f"{i}.txt").write_text(f"photo number {i}")

    def vae_8x(images):  # a stand-in real VAE: 8x down, 16 channels
        return F.avg_pool2d(images, 8).repeat(1, 6, 1, 1)[:, :16]

    options = dict(resolution=64, bucket_step=16, min_side=64, max_side=64)
    FolderDataset.from_folder(folder, DataConfig(**options), vae_8x, demo_text_encoder().encode, 8, "test-vae-8x")

    config = tmp_path / "real.toml"
    config.write_text(textwrap.dedent(f"""
        [model]
        checkpoint = "base.safetensors"
        dtype = "fp32"
        [network]
        rank = 2
        [data]
        folder = "data"
        encoder_id = "test-vae-8x"
        resolution = 64
        bucket_step = 16
        min_side = 64
        max_side = 64
        [train]
        steps = 2
        batch_size = 3
        [output]
        dir = "runs"
        name = "real"
    """))
    assert main(["train", str(config)]) == 0
    # The advisor warns about this toy run's settings (a real model at 64 px, 2 passes per image).
    advice = [r.getMessage() for r in caplog.records if r.getMessage().startswith("settings advisor")]
    assert any("resolution 64 is outside 256-2048" in a for a in advice)
    assert any("shows each image only 2.0 times" in a for a in advice)
    tensors, meta = read_safetensors(tmp_path / "runs" / "real" / "real.safetensors")
    assert meta["ss_steps"] == "2" and any(k.startswith("diffusion_model.layers.0.") for k in tensors)

    write_image(folder / "3.png", 64, 64, seed=3)  # not in the cache: the CLI cannot encode it
    (folder / "3.txt").write_text("photo number 3")
    with pytest.raises(ValueError, match="not found in the dataset cache"):
        run_training(load_run_config(config))


def test_validation_split_in_the_cli(tmp_path, capsys):
    config = write_config(tmp_path, steps=4, extra_train="validation_split = 0.25\n        validation = { every = 2 }")
    assert main(["train", config]) == 0
    run_dir = tmp_path / "runs" / "cli_demo"
    records = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert f"validation loss {records[-1]['loss']:.4f} at step 4" in capsys.readouterr().out
