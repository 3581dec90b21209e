"""TrainLoRA's run.toml: the node's run, headless, with the same settings, so either side continues the other's run.

The shipped demo workflow (4 steps) runs on the fake ComfyUI host; its run folder's
run.toml then trains through the CLI. fp32, same seed: the adapters agree to float
rounding (the node's run also renders previews in between, which restore the weights bit
for bit; asserted < 1e-6 absolute, as the node's own resume test).
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from dit_trainer.training.checkpoint import ADAPTER_FILE, list_checkpoints
from dit_trainer.training.cli import main
from dit_trainer.training.run_config import RUN_CONFIG_FILE, load_run_config, tomllib
from dit_trainer.training.run_folder import read_record
from dit_trainer.training.runner import run_training
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.executor import execute
from test_workflows_demo import RUN, demo_prompt, node_id, upstream  # noqa: F401  (fixture)


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


@pytest.fixture
def train_prompt(demo_prompt):  # noqa: F811
    return upstream(demo_prompt, node_id(demo_prompt, "TrainLoRA"))


def test_node_run_toml_trains_headless_to_the_node_adapter(comfy_host, comfy_pack, train_prompt, tmp_path):
    execute(train_prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    run_dir = comfy_host.root / "output" / "dit_trainer" / RUN
    config = run_dir / RUN_CONFIG_FILE
    values = tomllib.loads(config.read_text(encoding="utf-8"))
    # Paths inside ComfyUI's folder are relative to the run folder: the tree can move as a whole.
    assert values["data"]["folder"].startswith("../../../input/")
    assert values["output"] == {"dir": "..", "name": RUN}
    assert values["train"]["steps"] == 4 and values["network"]["algo"] == "dora"
    assert values["data"]["mask_weights"] is True and values["data"]["mask_min_weight"] == 0.2  # its WeightedMask

    cfg = load_run_config(config)
    assert cfg.output.run_dir.resolve() == run_dir.resolve()  # it trains into the node's run folder
    cfg.output.dir = str(tmp_path / "headless")  # here: a fresh run, to compare the adapters
    headless = run_training(cfg)
    assert headless.train.steps_done == 4
    assert read_record(headless.run_dir)["fingerprint"] == read_record(run_dir)["fingerprint"]
    assert_same_adapter(load_file(headless.adapter_path), load_file(comfy_host.folder("loras") / f"{RUN}.safetensors"))


def test_a_cancelled_node_run_finishes_headless_and_comes_back_finished(comfy_host, comfy_pack, train_prompt):
    model_management = comfy_host.modules["comfy.model_management"]
    run_dir = comfy_host.root / "output" / "dit_trainer" / RUN
    comfy_host.on_update = lambda update: update.value == 2 and comfy_host.interrupt()
    with pytest.raises(model_management.InterruptProcessingException):
        execute(train_prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    comfy_host.on_update = None
    node_checkpoints = {p.name: (p / ADAPTER_FILE).read_bytes() for p in list_checkpoints(run_dir)}
    assert node_checkpoints and max(node_checkpoints) < "step_000004"

    # The CLI continues the node's checkpoint (same fingerprint), it does not start over.
    assert main(["train", str(run_dir / RUN_CONFIG_FILE)]) == 0
    after = list_checkpoints(run_dir)
    assert after[-1].name == "step_000004"
    assert all((p / ADAPTER_FILE).read_bytes() == node_checkpoints[p.name] for p in after if p.name in node_checkpoints)

    # Back in ComfyUI, queued again: the run is finished, nothing trains, the adapter is the CLI's step 4.
    comfy_host.updates.clear()
    execute(train_prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    assert [u.value for u in comfy_host.updates] == [4]
    resumed = load_file(comfy_host.folder("loras") / f"{RUN}.safetensors")

    train = node_id(train_prompt, "TrainLoRA")
    train_prompt[train]["inputs"]["name"] = "uninterrupted"
    execute(train_prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    assert_same_adapter(resumed, load_file(comfy_host.folder("loras") / "uninterrupted.safetensors"))


def test_run_toml_carries_the_base_storage_and_the_second_datasets(comfy_host, comfy_pack, train_prompt, tmp_path):
    """LoadDiT's storage and block swap, the held-out split and the regularisation images reach run.toml, and the
    CLI's run from it has the node's settings fingerprint (so either side continues the other's checkpoints)."""
    prompt = {k: {**n, "inputs": dict(n["inputs"])} for k, n in train_prompt.items()}
    prompt[node_id(prompt, "LoadDiT")]["inputs"].update(weight_dtype="fp8_scaled", blocks_to_swap=1)
    train = prompt[node_id(prompt, "TrainLoRA")]["inputs"]
    train.update(validation_split=0.25, validate_every=2, regularisation=[node_id(prompt, "DatasetFromFolder"), 0],
                 mixed_precision="bf16")  # an fp8 base computes in bf16
    execute(prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    run_dir = comfy_host.root / "output" / "dit_trainer" / train["name"]
    values = tomllib.loads((run_dir / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    assert values["model"]["dtype"] == "fp8_scaled" and values["model"]["blocks_to_swap"] == 1
    assert values["data"]["reg_folder"] == values["data"]["folder"]  # the same DatasetFromFolder feeds both
    assert values["train"]["validation_split"] == 0.25 and values["train"]["validation"]["every"] == 2

    cfg = load_run_config(run_dir / RUN_CONFIG_FILE)
    cfg.output.dir = str(tmp_path / "headless")
    headless = run_training(cfg)
    assert read_record(headless.run_dir)["fingerprint"] == read_record(run_dir)["fingerprint"]
    assert [r["step"] for r in headless.train.validation] == [0, 2, 4]
