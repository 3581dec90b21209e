"""Experiment tracking through accelerate's TensorBoard tracker, read back from the event files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from dit_trainer.training.config import TrainConfig
from dit_trainer.training.run_config import load_run_config
from dit_trainer.training.runner import run_training
from dit_trainer.training.trackers import LOG_FOLDER, TrackingConfig, check_installed
from demo_toml import write_demo_config

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard is in the test extra")

STEPS = 4


def write_config(tmp_path, log_with: str) -> Path:
    return write_demo_config(tmp_path, f"""
        [network]
        rank = 4
        alpha = 4

        [train]
        steps = {STEPS}
        batch_size = 4
        lr = 3e-3
        schedule = "linear"
        scale_weight_norms = 0.02
        sample_every = 2

        [train.tracking]
        log_with = [{log_with}]
        project = "tracked"

        [sample]
        prompts = "a magenta circle --d 3 --s 2 --w 32 --h 32"

        [output]
        dir = "runs"
        name = "tracked"
    """)


def test_tensorboard_logs_every_step_scalars_and_the_previews(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_training(load_run_config(write_config(tmp_path, '"tensorboard"')))
    (events,) = (result.run_dir / LOG_FOLDER / "tracked").glob("events.out.tfevents.*")
    log = event_accumulator.EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
    log.Reload()
    scalars = {tag: [(e.step, e.value) for e in log.Scalars(tag)] for tag in log.Tags()["scalars"]}
    assert {"loss", "lr", "grad_norm", "skipped_nonfinite_steps", "max_norm/keys_scaled", "max_norm/mean_norm",
            "max_norm/max_norm"} <= set(scalars)
    steps = list(range(1, STEPS + 1))
    assert [s for s, _ in scalars["loss"]] == steps
    assert all(math.isclose(v, loss, rel_tol=1e-6) for (_, v), loss in zip(scalars["loss"], result.train.losses))
    lrs = [v for _, v in scalars["lr"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 3e-3  # the linear decay, after each step
    assert all(v > 0 for _, v in scalars["grad_norm"])
    assert all(v == 0 for _, v in scalars["skipped_nonfinite_steps"])
    assert all(v <= 0.02 * (1 + 1e-5) for _, v in scalars["max_norm/max_norm"])  # the norms after rescaling
    images = log.Tags()["images"]
    assert images == ["samples"] and [e.step for e in log.Images("samples")] == [2, 4]
    assert (log.Images("samples")[0].width, log.Images("samples")[0].height) == (32, 32)


def test_no_tracker_by_default_and_a_missing_one_names_its_package(tmp_path, monkeypatch):
    assert TrainConfig().tracking.log_with == []
    with pytest.raises(ValueError, match="unknown tracker"):
        TrackingConfig(log_with=["tensorbord"])
    monkeypatch.setattr("accelerate.tracking._available_trackers", [])
    with pytest.raises(ValueError, match="pip install tensorboard"):
        check_installed(TrackingConfig(log_with=["tensorboard"]))


def test_readme_tracking_table_is_valid():
    from dit_trainer.training.run_config import tomllib

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```toml\n(\[train\.tracking\].*?)```", readme, re.S)
    cfg = TrainConfig.from_dict(tomllib.loads(block)["train"])
    assert cfg.tracking.log_with == ["tensorboard"]
