"""`dit-trainer train / resume / ema-merge` on the embedded demo model, end to end."""

import textwrap

import pytest
import torch

from dit_trainer.training.checkpoint import ADAPTER_FILE, list_checkpoints
from dit_trainer.training.cli import main
from dit_trainer.training.network.comfy_format import read_safetensors
from dit_trainer.training.posthoc_ema import merge_adapter_files
from dit_trainer.training.run_config import load_run_config


def write_config(tmp_path, steps: int, extra_train: str = "") -> str:
    config = tmp_path / "run.toml"
    config.write_text(textwrap.dedent(f"""
        [model]
        checkpoint = "embedded-demo"
        dtype = "fp32"

        [network]
        algo = "dora"
        rank = 4
        alpha = 4

        [data]
        folder = "embedded-demo"
        resolution = 32
        bucket_step = 4
        min_side = 32
        max_side = 32
        mask_min_weight = 0.2

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
    """))
    return str(config)


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
    block = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    cfg = parse_run_config(tomllib.loads(block))
    assert cfg.network.config.algo == "dora" and cfg.train.ema_decay == 0.99
    assert len(parse_prompts(cfg.sample.prompts)) == 2
