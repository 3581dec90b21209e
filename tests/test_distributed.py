"""Several processes under `accelerate launch` (gloo on CPU) train what one process with the global batch trains.

The launches use the shipped one-node accelerate config with `--num_processes 2`: torchrun
starts two CLI processes and, without CUDA, accelerate joins them with gloo. accelerate's
own `--cpu` flag starts several processes only through mpirun, which is not needed here.

Tolerance: the two ways sum the same gradients in a different order (two halves and an
all-reduce against one batch), so the weights differ by float rounding that AdamW's
normalisation carries along. After 4 steps (EMA and max-norm on) the adapters and their EMA
twins differ by less than 1e-6 relative (Frobenius norm over all tensors; measured 2e-8 to
1e-7) and each step's loss by less than 1e-6 relative. Slicing wrongly (both processes training the same rows, or the
two halves not summed) changes the losses at the first step by far more.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import dit_trainer
from dit_trainer.training.checkpoint import list_checkpoints, load_state
from dit_trainer.training.conditioning import Conditioning
from dit_trainer.training.data.latents import LatentBatch
from dit_trainer.training.distributed import Processes, local_batch, local_rows, loss_share
from dit_trainer.training.losses import flow_loss
from dit_trainer.training.network.comfy_format import read_safetensors
from dit_trainer.training.run_config import load_run_config
from dit_trainer.training.runner import run_training
from demo_toml import write_demo_config

REPO = Path(dit_trainer.__file__).resolve().parent
ONE_NODE = REPO / "accelerate" / "one_node.yaml"
STEPS = 4
NAME = "ddp"
LAUNCH_SECONDS: list[float] = []  # printed at the end: each launch's wall time


def write_config(folder: Path, batch_size: int, steps: int = STEPS, fsdp: bool = False) -> Path:
    return write_demo_config(folder, f"""
        [network]
        algo = "dora"
        rank = 4
        alpha = 4

        [train]
        steps = {steps}
        batch_size = {batch_size}
        lr = 3e-3
        seed = 5
        save_every = 2
        keep_last = 0
        ema_decay = 0.5
        scale_weight_norms = 0.05
        fsdp = {str(fsdp).lower()}

        [output]
        dir = "runs"
        name = "{NAME}"
    """, data="mask_min_weight = 0.2\n")


def free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config: Path, command: str = "train") -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO.parent), env.get("PYTHONPATH", "")) if p)
    env["HF_HOME"] = str(config.parent / "hf_home")  # no user default accelerate config
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ONE_NODE), "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "dit_trainer.training.cli", command, config.name], env


def launch(config: Path, command: str = "train") -> subprocess.CompletedProcess:
    args, env = launch_command(config, command)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)
    LAUNCH_SECONDS.append(time.perf_counter() - start)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def in_process(config: Path, mode: str = "train"):
    cwd = os.getcwd()
    os.chdir(config.parent)
    try:
        return run_training(load_run_config(config.name), mode=mode)
    finally:
        os.chdir(cwd)


def adapter(folder: Path, suffix: str = "") -> dict[str, torch.Tensor]:
    return read_safetensors(folder / "runs" / NAME / f"{NAME}{suffix}.safetensors")[0]


def losses(folder: Path) -> list[float]:
    return load_state(list_checkpoints(folder / "runs" / NAME)[-1]).losses


def assert_same_trajectory(folder: Path, reference: Path) -> None:
    got, want = losses(folder), losses(reference)
    assert len(got) == len(want) == STEPS
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(got, want)), (got, want)
    for suffix in ("", "_ema"):  # the EMA, updated on every process, must agree too
        a, b = adapter(folder, suffix), adapter(reference, suffix)
        assert a.keys() == b.keys()
        difference = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).sqrt()
        size = sum((b[k].double() ** 2).sum() for k in b).sqrt()
        print(f"{folder.name}{suffix}: adapter relative difference {float(difference / size):.2e}")
        assert difference <= 1e-6 * size


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, global batch 4, 4 uninterrupted steps."""
    folder = tmp_path_factory.mktemp("one_process")
    in_process(write_config(folder, batch_size=4))
    return folder


def test_rows_and_loss_shares_rebuild_the_global_loss():
    """Uneven slices (a bucket's short last batch) and a process left without rows still sum to the global loss."""
    generator = torch.Generator().manual_seed(0)
    for rows, count in ((4, 2), (3, 2), (1, 2), (5, 3)):
        latents = torch.randn(rows, 2, 4, 4, generator=generator)
        batch = LatentBatch(latents, Conditioning(torch.randn(rows, 3, 8, generator=generator), torch.full((rows,), 3)),
                            torch.rand(rows, 1, 4, 4, generator=generator))
        target = torch.randn(latents.shape, generator=generator)
        whole = flow_loss(latents, target, batch.weights)
        parts = []
        for index in range(count):
            mine = local_rows(rows, Processes(index, count))
            if len(mine):
                part = local_batch(batch, mine)
                parts.append(flow_loss(part.latents, target[mine], part.weights) * loss_share(batch, mine))
        assert sorted(torch.cat([local_rows(rows, Processes(i, count)) for i in range(count)]).tolist()) == \
            list(range(rows))
        assert torch.allclose(sum(parts), whole, rtol=1e-6), (rows, count)


def test_two_processes_of_batch_2_train_the_one_process_batch_4_adapter(tmp_path, reference):
    done = launch(write_config(tmp_path / "two_processes", batch_size=2))
    assert_same_trajectory(tmp_path / "two_processes", reference)
    # One set of files, written by the main process: the same tree as the one-process run's.
    run = tmp_path / "two_processes" / "runs"
    tree = sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".dit_cache" not in p.parts)
    expected = sorted(str(p.relative_to(reference / "runs")) for p in (reference / "runs").rglob("*")
                      if ".dit_cache" not in p.parts)
    assert tree == expected
    assert done.stdout.count("done at step 4") == 1  # one process reports
    state = load_state(list_checkpoints(run / NAME)[-1])
    assert state.extra["processes"] == 2 and state.micro_batches == STEPS  # global batches drawn


def test_fsdp_sharded_base_trains_the_same_adapter(tmp_path, reference):
    """FSDP2 (fully_shard, gloo) of the frozen base: each process holds half of it, the training is the same."""
    done = launch(write_config(tmp_path / "fsdp", batch_size=2, fsdp=True))
    held = re.findall(r"sharded over 2 processes in (\d+) blocks \+ the rest; this process holds ([\d.]+) MB of its "
                      r"([\d.]+) MB", done.stdout + done.stderr)
    assert len(held) == 2 and int(held[0][0]) > 0  # both processes sharded it
    assert all(float(mine) < 0.6 * float(whole) for _, mine, whole in held)
    assert_same_trajectory(tmp_path / "fsdp", reference)


def test_two_processes_stopped_and_continued_by_one(tmp_path, reference):
    folder = tmp_path / "two_then_one"
    launch(write_config(folder, batch_size=2, steps=2))
    in_process(write_config(folder, batch_size=4), mode="resume")  # the same global batch on one process
    assert [p.name for p in list_checkpoints(folder / "runs" / NAME)] == ["step_000002", "step_000004"]
    assert_same_trajectory(folder, reference)


def test_one_process_stopped_and_continued_by_two(tmp_path, reference):
    folder = tmp_path / "one_then_two"
    in_process(write_config(folder, batch_size=4, steps=2))
    launch(write_config(folder, batch_size=2), command="resume")
    assert_same_trajectory(folder, reference)
    print("accelerate launch wall times (s):", ", ".join(f"{s:.1f}" for s in LAUNCH_SECONDS))


def test_a_different_global_batch_is_refused_naming_both(reference):
    """The reference run (1 x 4) continued as 1 x 2: refused before anything is written."""
    before = sorted(p.name for p in list_checkpoints(reference / "runs" / NAME))
    with pytest.raises(ValueError, match=r"global batch of 4 \(batch_size 4 x 1 process\(es\)\) but this run has 2"):
        in_process(write_config(reference, batch_size=2, steps=STEPS + 2), mode="resume")
    assert sorted(p.name for p in list_checkpoints(reference / "runs" / NAME)) == before
    write_config(reference, batch_size=4)  # the reference's own config again


def test_sigterm_to_one_process_stops_both_after_the_same_step_with_one_checkpoint(tmp_path):
    config = write_config(tmp_path / "stopped", batch_size=2, steps=100_000)
    run = config.parent / "runs" / NAME
    args, env = launch_command(config)
    launcher = subprocess.Popen(args, cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(run) and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        assert list_checkpoints(run), "the launched run wrote no checkpoint"
        (rank_1,) = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                     if "dit_trainer.training.cli" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        rank_1.send_signal(signal.SIGTERM)  # as a scheduler preempting one node would
        signalled = time.perf_counter()
        stdout, stderr = launcher.communicate(timeout=180)
        print(f"SIGTERM to rank 1: every process ended {time.perf_counter() - signalled:.1f} s later")
    finally:
        if launcher.poll() is None:
            launcher.kill()
    newest = list_checkpoints(run)[-1]
    state = load_state(newest)  # complete, resumable
    assert newest.name == f"step_{state.step:06d}" and 0 < state.step < 100_000
    # The main process reports the other process's SIGTERM and the step both stopped at.
    assert f"stopped by SIGTERM at step {state.step} of 100000" in stdout, stdout[-2000:] + stderr[-2000:]
    assert not (run / f"{NAME}.safetensors").exists()  # a stopped run leaves its checkpoint, no final adapter


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    one = load_config_from_file(str(ONE_NODE))
    many = load_config_from_file(str(REPO / "accelerate" / "multi_node.yaml"))
    assert one.distributed_type == many.distributed_type == "MULTI_GPU" and one.num_machines == 1
    assert many.num_machines == 2 and many.main_process_ip and many.num_processes % many.num_machines == 0
