"""Ctrl-C and SIGTERM never lose a run: the CLI, the checkpoint write itself, and ComfyUI as host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import dit_trainer.training.loop as loop
from dit_trainer.training import signals
from dit_trainer.training.checkpoint import list_checkpoints, load_state
from dit_trainer.training.config import TrainConfig
from dit_trainer.training.demo.model import BASE_CHECKPOINT
from dit_trainer.training.demo.run import concept_dataset
from dit_trainer.training.models.loader import load_dit
from dit_trainer.training.network.network import NetworkConfig, seeded_network
from test_bad_inputs import write_config

TESTS = Path(__file__).resolve().parent
posix_only = pytest.mark.skipif(os.name != "posix", reason="sends POSIX signals")


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not come true in time")
        time.sleep(0.1)


@posix_only
def test_held_signals_arrive_after_the_protected_block():
    with signals.graceful_stop(), signals.active_run():
        with signals.protected():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert signals.stop_requested() is None  # not yet: the block must finish first
        assert signals.stop_requested() == "SIGTERM"


@posix_only
def test_cli_sigterm_stops_with_a_checkpoint_and_resume_finishes(tmp_path):
    config = write_config(tmp_path, {"train": {"steps": 100_000, "save_every": 0}})  # save_every 0: no periodic saves
    run_dir = tmp_path / "runs" / "run"
    process = subprocess.Popen([sys.executable, "-m", "dit_trainer.training.cli", "train", str(config)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "dit_trainer_run.json").is_file() or process.poll() is not None)
        time.sleep(3)  # a few steps
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-2000:]
    (checkpoint,) = list_checkpoints(run_dir)
    step = load_state(checkpoint).step
    assert step >= 1 and f"stopped by SIGTERM at step {step} of 100000; checkpoint {checkpoint}" in out
    assert f"saved resumable checkpoint of step {step}" in err
    resumed = subprocess.run([sys.executable, "-m", "dit_trainer.training.cli", "resume",
                              str(write_config(tmp_path, {"train": {"steps": step + 2, "save_every": 0}}))],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"done at step {step + 2}" in resumed.stdout, resumed.stderr[-2000:]


@posix_only
def test_a_second_ctrl_c_during_the_checkpoint_write_does_not_cut_it_short(tmp_path, monkeypatch):
    """First Ctrl-C: stop after the step. Second, while the checkpoint is written: held until it is complete."""
    model = load_dit(BASE_CHECKPOINT)
    network = seeded_network(model, "zimage", NetworkConfig(rank=2), 0).attach()
    data = concept_dataset(4, seed=0)
    cfg = TrainConfig(steps=50, batch_size=2, lr=1e-3, save_every=0)
    real_save = loop.save_state

    def save_while_interrupted(directory, state, files=None):
        os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
        time.sleep(0.05)
        return real_save(directory, state, files)

    monkeypatch.setattr(loop, "save_state", save_while_interrupted)

    def first_ctrl_c(event):
        if event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), signals.graceful_stop():
        loop.train(model, network, data, cfg, on_progress=first_ctrl_c, run_dir=tmp_path / "run")
    (checkpoint,) = list_checkpoints(tmp_path / "run")
    assert checkpoint.name == "step_000003" and load_state(checkpoint).step == 3  # complete, and loadable


HOST_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    from pathlib import Path
    import fake_comfy
    from fake_comfy.executor import PromptExecutor

    root = Path(sys.argv[1])
    host = fake_comfy.install(root)
    pack = fake_comfy.import_pack()  # on the main thread, as ComfyUI imports packs
    prompt = json.loads(sys.argv[2])
    worker = threading.Thread(target=lambda: PromptExecutor(host, pack.NODE_CLASS_MAPPINGS).execute(prompt),
                              daemon=True)
    worker.start()
    while len(host.updates) < 3:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)  # docker stop
    time.sleep(60)
    print("SIGTERM did not end the server", flush=True)
""")


@posix_only
def test_comfyui_sigterm_saves_the_running_training_then_stops_the_server(tmp_path):
    from test_bad_inputs import DATA, DEMO, DEMO_FOLDER, NETWORK, TRAIN

    prompt = {
        "1": {"class_type": "LoadDiT", "inputs": {"checkpoint": DEMO, "weight_dtype": "fp32", "attention": "sdpa",
                                                 "gradient_checkpointing": False}},
        "2": {"class_type": "BuildLoRANetwork", "inputs": {"model": ["1", 0], "continue_from": "None", **NETWORK}},
        "3": {"class_type": "DatasetFromFolder", "inputs": {"model": ["1", 0], "folder": DEMO_FOLDER, **DATA}},
        "4": {"class_type": "TrainLoRA", "inputs": {"model": ["1", 0], "network": ["2", 0], "dataset": ["3", 0],
                                                   "name": "served", **{**TRAIN, "steps": 100_000, "save_every": 0}}},
    }
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", HOST_SCRIPT, str(tmp_path / "comfyui"), json.dumps(prompt)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr[-3000:]  # the server did stop
    assert "asking the running training to save a checkpoint" in result.stderr
    (checkpoint,) = list_checkpoints(tmp_path / "comfyui" / "output" / "dit_trainer" / "served")
    assert load_state(checkpoint).step >= 3
