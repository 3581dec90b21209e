"""Run folders: continue a matching run, move any other aside, lock out a second process, never replace
a file another run (or the user) made."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from dit_trainer.training.network.export import export_adapter
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from dit_trainer.training.run_folder import (
    RECORD,
    RUN_ID_KEY,
    RunLocked,
    free_adapter_path,
    prepare_run,
    read_record,
    run_lock,
)
from dit_trainer.training.run_settings import differences, fingerprint, run_settings

TRAIN = {"lr": 1e-4, "steps": 100, "sample_every": 10, "save_every": 50, "keep_last": 3,
         "gradient_checkpointing": False, "max_nonfinite_steps": 10}


def settings(**train_changes) -> dict:
    return run_settings({**TRAIN, **train_changes}, {"rank": 8, "verbose": False}, "base", "data")


def with_checkpoint(run_dir):
    state = run_dir / "checkpoints" / "step_000010" / "state.safetensors"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"x")
    return state


def test_a_matching_run_continues_and_keeps_its_id(tmp_path):
    run_dir = tmp_path / "my_run"
    first = prepare_run(run_dir, settings(), True)
    assert not first.continuing and first.moved_aside is None  # nothing to continue yet
    with_checkpoint(run_dir)
    again = prepare_run(run_dir, settings(), True)
    assert again.continuing and again.run_id == first.run_id
    assert read_record(run_dir)["fingerprint"] == fingerprint(settings())


def test_other_settings_move_the_old_run_aside_untouched(tmp_path):
    run_dir = tmp_path / "my_run"
    first = prepare_run(run_dir, settings(), True)
    state = with_checkpoint(run_dir)
    other = prepare_run(run_dir, settings(lr=2e-4), True)
    assert not other.continuing and other.run_id != first.run_id
    assert other.moved_aside.name.startswith("my_run.replaced-")
    assert (other.moved_aside / state.relative_to(run_dir)).is_file()
    assert json.loads((other.moved_aside / RECORD).read_text())["run_id"] == first.run_id
    assert not (run_dir / "checkpoints").exists()


def test_resume_off_moves_a_matching_run_aside_too(tmp_path):
    run_dir = tmp_path / "r"
    prepare_run(run_dir, settings(), True)
    with_checkpoint(run_dir)
    assert not prepare_run(run_dir, settings(), False).continuing
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]) == 1


def test_fingerprint_ignores_options_that_do_not_change_the_weights():
    base = fingerprint(settings())
    assert fingerprint(settings(sample_every=0, save_every=10, gradient_checkpointing=True, keep_last=1)) == base
    assert fingerprint(run_settings(TRAIN, {"rank": 8, "verbose": True}, "base", "data")) == base
    for changed in (settings(lr=2e-4), settings(steps=200),
                    run_settings(TRAIN, {"rank": 16}, "base", "data"),
                    run_settings(TRAIN, {"rank": 8}, "base", "other data"),
                    run_settings(TRAIN, {"rank": 8}, "other base", "data")):
        assert fingerprint(changed) != base
    assert differences(settings(), settings(lr=2e-4)) == {"train.lr": (1e-4, 2e-4)}


def test_a_second_process_is_locked_out_and_a_dead_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = textwrap.dedent(f"""
        import sys, time
        from dit_trainer.training.run_folder import run_lock
        with run_lock({str(run_dir)!r}, "name"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"in use by another training process \(pid {process.pid} .*pick another name"):
            with run_lock(run_dir, "name"):
                pass
    finally:
        process.kill()  # as kill -9 would: no clean-up runs in the holder
        process.wait()
    with run_lock(run_dir, "name"):  # the OS released the dead holder's lock
        assert (tmp_path / ".run.lock").is_file()


def adapter_file(path, run_id: str | None) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    network = LoRANetwork(model, "zimage", NetworkConfig(include_patterns=["0"], rank=2))
    export_adapter(network, path, extra_metadata={RUN_ID_KEY: run_id} if run_id else None)


def test_a_file_someone_else_made_is_never_replaced(tmp_path):
    (tmp_path / "mine.safetensors").write_bytes(b"the user's own lora")
    assert free_adapter_path(tmp_path, "mine", "run1") == tmp_path / "mine_2.safetensors"
    adapter_file(tmp_path / "mine_2.safetensors", "run1")
    assert free_adapter_path(tmp_path, "mine", "run1") == tmp_path / "mine_2.safetensors"  # this run's own file
    assert free_adapter_path(tmp_path, "mine", "run2") == tmp_path / "mine_3.safetensors"
    adapter_file(tmp_path / "ours.safetensors", "run1")
    (tmp_path / "ours_ema.safetensors").write_bytes(b"someone's file")
    assert free_adapter_path(tmp_path, "ours", "run1", ema=True) == tmp_path / "ours_2.safetensors"
    assert (tmp_path / "mine.safetensors").read_bytes() == b"the user's own lora"
