"""Bad inputs and faults, one row each: what is done, the exit code it must end with, the words it must say.

Every row runs the real entry point: `dit-trainer` (in-process, as `main(argv)`), or a node
function called the way ComfyUI's executor calls it. Node rows report 0 when the node
returned and 1 when it raised; CLI rows the process exit code (0 done, 1 failed run,
2 bad input). A row also fails when a traceback is printed for an expected failure, and
most check the data-loss rule that belongs to them (a file left untouched, no temp file,
no NaN saved). Add a row for every new class of bad input.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dit_trainer.training.cli import main
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.executor import call_node

DEMO = "[embedded demo] dit_trainer_demo"
DEMO_FOLDER = "[embedded demo] magenta shapes"


@dataclass
class Outcome:
    code: int
    text: str  # what the user sees: stdout + stderr for the CLI, the message + log for a node


# --- running the CLI ------------------------------------------------------------------------

BASE_CONFIG = {
    "model": {"checkpoint": "embedded-demo", "dtype": "fp32"},
    "network": {"algo": "lora", "rank": 2, "alpha": 2.0},
    "data": {"folder": "embedded-demo", "resolution": 32, "bucket_step": 4, "min_side": 32, "max_side": 32},
    "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "save_every": 1, "seed": 3},
    "output": {"dir": "runs", "name": "run"},
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(folder: Path, changes: dict | None = None, name: str = "run.toml") -> Path:
    """BASE_CONFIG with `changes` ({table: {key: value}}, value None removes the key) as a TOML file."""
    tables = {table: dict(values) for table, values in BASE_CONFIG.items()}
    for table, values in (changes or {}).items():
        for key, value in values.items():
            if value is None:
                tables.setdefault(table, {}).pop(key, None)
            else:
                tables.setdefault(table, {})[key] = value
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items() if not isinstance(value, dict)]
        for key, value in values.items():
            if isinstance(value, dict):
                lines.append(f"[{table}.{key}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli(capsys, *argv) -> Outcome:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return Outcome(code, out.out + out.err)


# --- files that are wrong in one way each -----------------------------------------------------


def adapter_file(path: Path, poison: bool = False) -> Path:
    """A rank-2 LoRA for the demo base, optionally with NaN in one tensor."""
    from dit_trainer.training.demo.model import BASE_CHECKPOINT
    from dit_trainer.training.models.loader import load_dit
    from dit_trainer.training.network.comfy_format import save_adapter
    from dit_trainer.training.network.network import LoRANetwork, NetworkConfig

    network = LoRANetwork(load_dit(BASE_CHECKPOINT), "zimage", NetworkConfig(rank=2, alpha=2.0))
    save_adapter(network, path)
    if poison:
        tensors = load_file(str(path))
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, str(path))
    return path


def damaged(path: Path, kind: str) -> Path:
    """A .safetensors file that is empty, truncated, or a pickle / zip renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif kind == "zip":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "truncated":
        from dit_trainer.training.demo.model import BASE_CHECKPOINT

        data = BASE_CHECKPOINT.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def tiny_images(folder: Path, size: int = 8, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder


def os_failure(monkeypatch, error: int, where: str) -> None:
    """Make every safetensors / PNG write whose path contains `where` fail with `error` (a full / read-only disk)."""
    import safetensors.torch as st

    real = st.save_file

    def failing(tensors, filename, metadata=None):
        if where in str(filename):
            raise OSError(error, os.strerror(error), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing)
    import dit_trainer.training.checkpoint as checkpoint
    import dit_trainer.training.storage as storage

    monkeypatch.setattr(storage, "save_file", failing)
    monkeypatch.setattr(checkpoint, "save_file", failing)


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".staging.")]


# --- the rows ------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    run: Callable  # (tmp_path, capsys, monkeypatch) -> Outcome, or (tmp_path, capsys, monkeypatch, nodes, host)
    code: int
    words: tuple[str, ...]
    node: bool = False


def config_case(case_id: str, changes: dict, code: int, *words: str, argv: tuple = ("train",)) -> Case:
    def run(tmp, capsys, monkeypatch):
        return cli(capsys, *argv, write_config(tmp, changes))

    return Case(case_id, run, code, words)


TYPED = [
    config_case("lr-as-text", {"train": {"lr": "1e-4"}}, 2, "[train] lr", "finite number", "'1e-4'", "without quotes"),
    config_case("steps-fraction", {"train": {"steps": 2.5}}, 2, "[train] steps", "whole number", "2.5"),
    config_case("rank-as-word", {"network": {"rank": "four"}}, 2, "[network] rank", "whole number", "'four'"),
    config_case("lr-infinite", {"train": {"lr": math.inf}}, 2, "[train] lr", "finite number", "inf"),
    config_case("alpha-nan", {"network": {"alpha": math.nan}}, 2, "[network] alpha", "finite number", "nan"),
    config_case("nested-loss-kind", {"train": {"loss": {"kind": 3}}}, 2, "[train.loss] kind", "text"),
    config_case("betas-short", {"train": {"betas": [0.9]}}, 2, "[train] betas", "2 numbers"),
    config_case("resolution-text", {"data": {"resolution": "big"}}, 2, "[data] resolution", "whole number"),
    config_case("mask-weight-text", {"data": {"mask_min_weight": "x"}}, 2, "[data] mask_min_weight", "finite number"),
    config_case("bool-as-number", {"data": {"no_upscale": 1}}, 2, "[data] no_upscale", "true or false"),
    config_case("unknown-key", {"train": {"learning_rate": 1e-4}}, 2, "unknown train option", "learning_rate"),
    config_case("output-name-escapes", {"output": {"name": "../elsewhere"}}, 2, "[output] name"),
    config_case("dtype-unknown", {"model": {"dtype": "fp8"}}, 2, "[model] dtype", "fp8"),
    config_case("ema-decay-range", {"train": {"ema_decay": 1.5}}, 2, "ema_decay", "[0, 1)"),
]


def _not_toml(tmp, capsys, monkeypatch):
    path = tmp / "run.toml"
    path.write_text("[train\nsteps = 2\n")
    return cli(capsys, "train", path)


def _missing_config(tmp, capsys, monkeypatch):
    return cli(capsys, "train", tmp / "nowhere.toml")


def _checkpoint(kind: str):
    def run(tmp, capsys, monkeypatch):
        path = damaged(tmp / "base.safetensors", kind) if kind != "ckpt" else tmp / "base.ckpt"
        if kind == "ckpt":
            path.write_bytes(pickle.dumps({}))
        return cli(capsys, "train", write_config(tmp, {"model": {"checkpoint": path.name}}))

    return run


def _continue_from(kind: str):
    def run(tmp, capsys, monkeypatch):
        path = tmp / "start.safetensors"
        adapter_file(path, poison=True) if kind == "nan" else damaged(path, kind)
        return cli(capsys, "train", write_config(tmp, {"network": {"continue_from": path.name}}))

    return run


FILES = [
    Case("config-not-toml", _not_toml, 2, ("run.toml", "not valid TOML")),
    Case("config-missing", _missing_config, 2, ("nowhere.toml", "does not exist")),
    Case("checkpoint-empty", _checkpoint("empty"), 2, ("base.safetensors", "empty")),
    Case("checkpoint-truncated", _checkpoint("truncated"), 2, ("base.safetensors", "truncated")),
    Case("checkpoint-pickle-renamed", _checkpoint("pickle"), 2, ("base.safetensors", "pickle renamed")),
    Case("checkpoint-zip-renamed", _checkpoint("zip"), 2, ("base.safetensors", "torch.save")),
    Case("checkpoint-ckpt", _checkpoint("ckpt"), 2, ("base.ckpt", "pickles")),
    Case("continue-from-nan", _continue_from("nan"), 2, ("start.safetensors", "NaN or infinite", "earlier checkpoint")),
    Case("continue-from-truncated", _continue_from("empty"), 2, ("start.safetensors", "empty")),
    config_case("dataset-missing", {"data": {"folder": "no_such_folder"}}, 2, "no_such_folder", "does not exist"),
]


def _empty_dataset(tmp, capsys, monkeypatch):
    (tmp / "photos").mkdir()
    (tmp / "photos" / "notes.txt").write_text("no images here")
    return cli(capsys, "train", write_config(tmp, {"data": {"folder": "photos"}}))


def _upscaled_dataset(tmp, capsys, monkeypatch):
    tiny_images(tmp / "photos", size=8)
    result = cli(capsys, "train", write_config(tmp, {"data": {"folder": "photos", "resolution": 256,
                                                                "min_side": 256, "max_side": 256}}))
    assert not (tmp / "photos" / ".dit_cache").exists()  # refused before anything was written into the folder
    return result


def _huge_preview(tmp, capsys, monkeypatch):
    config = write_config(tmp, {"sample": {"prompts": "a magenta circle --w 8192 --h 8192"},
                                "train": {"sample_every": 1}})
    result = cli(capsys, "train", config)
    assert not list((tmp / "runs" / "run").rglob("step_*"))  # refused before the first step
    return result


SIZES = [
    Case("dataset-without-images", _empty_dataset, 2, ("no usable images", "photos")),
    Case("dataset-enlarged-32x", _upscaled_dataset, 2, ("enlarged more than 8x", "8x8 to 256x256", "no_upscale")),
    Case("preview-cannot-fit", _huge_preview, 2, ("8192", "attention scores", "smaller width / height")),
]


def _output_dir_is_a_file(tmp, capsys, monkeypatch):
    (tmp / "runs").write_text("a file where the output folder should be")
    return cli(capsys, "train", write_config(tmp))


def _full_disk_at_checkpoint(tmp, capsys, monkeypatch):
    os_failure(monkeypatch, errno.ENOSPC, "state.safetensors")
    result = cli(capsys, "train", write_config(tmp))
    assert not temp_files(tmp / "runs"), temp_files(tmp / "runs")
    return result


def _read_only_cache(tmp, capsys, monkeypatch):
    tiny_images(tmp / "photos", size=32)
    os_failure(monkeypatch, errno.EROFS, ".dit_cache")
    result = cli(capsys, "train", write_config(tmp, {"data": {"folder": "photos"}}))
    assert not temp_files(tmp / "photos")
    return result


def _locked_run(tmp, capsys, monkeypatch):
    from dit_trainer.training.run_folder import run_lock

    config = write_config(tmp)
    (tmp / "runs").mkdir()
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from dit_trainer.training.run_folder import run_lock
            with run_lock({str(tmp / 'runs' / 'run')!r}, "x"):
                print("held", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        return cli(capsys, "train", config)
    finally:
        holder.kill()
        holder.wait()
        with run_lock(tmp / "runs" / "run", "x"):  # and nothing stale remains
            pass


OS = [
    Case("output-dir-is-a-file", _output_dir_is_a_file, 1, ("runs", "a file is in the way", "[output] dir")),
    Case("disk-full-at-checkpoint", _full_disk_at_checkpoint, 1, ("state.safetensors", "disk is full", "[output] dir")),
    Case("read-only-cache", _read_only_cache, 1, (".dit_cache", "read-only", "cache_dir", "cache_latents_to_disk")),
    Case("second-process-same-run", _locked_run, 1, ("in use by another training process", "pid",
                                                      "[output] name")),
]


def _trained(tmp, capsys, changes=None) -> Path:
    config = write_config(tmp, changes)
    assert cli(capsys, "train", config).code == 0
    return config


def _resume_changed(changes: dict, check: Callable | None = None):
    def run(tmp, capsys, monkeypatch):
        _trained(tmp, capsys)
        result = cli(capsys, "resume", write_config(tmp, changes))
        if check:
            check(tmp, result)
        return result

    return run


def _lr_applied(tmp, result):
    from dit_trainer.training.network.comfy_format import read_safetensors

    meta = read_safetensors(tmp / "runs" / "run" / "run.safetensors")[1]
    assert json.loads(meta["dit_trainer_resume_history"]) == [{"step": 2, "changed": {"train.lr": [1e-3, 5e-4],
                                                                                       "train.steps": [2, 3]}}]


def _resume_nothing(tmp, capsys, monkeypatch):
    return cli(capsys, "resume", write_config(tmp))


def _train_again_other_settings(tmp, capsys, monkeypatch):
    _trained(tmp, capsys)
    first = (tmp / "runs" / "run" / "run.safetensors").read_bytes()
    result = cli(capsys, "train", write_config(tmp, {"network": {"rank": 4}}))
    aside = [p for p in (tmp / "runs").iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "run.safetensors").read_bytes() == first  # the old run is intact
    assert sorted(p.name for p in (tmp / "runs" / "run" / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    return result


def _train_again_same_settings(tmp, capsys, monkeypatch):
    config = _trained(tmp, capsys)
    checkpoints = tmp / "runs" / "run" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints.rglob("*.safetensors")}
    result = cli(capsys, "train", config)
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints.rglob("*.safetensors")} == before  # nothing retrained
    assert not [p for p in (tmp / "runs").iterdir() if ".replaced-" in p.name]
    return result


def _merge_damaged(tmp, capsys, monkeypatch):
    _trained(tmp, capsys)
    broken = damaged(tmp / "runs" / "run" / "checkpoints" / "step_000001" / "adapter.safetensors", "empty")
    return cli(capsys, "ema-merge", broken, tmp / "runs" / "run" / "checkpoints" / "step_000002" / "adapter.safetensors",
               "--out", tmp / "m.safetensors")


def _merge_out_is_a_folder(tmp, capsys, monkeypatch):
    _trained(tmp, capsys)
    (tmp / "merged.safetensors").mkdir()
    return cli(capsys, "ema-merge", tmp / "runs" / "run", "--out", tmp / "merged.safetensors")


def _corrupt_newest_checkpoint(tmp, capsys, monkeypatch):
    _trained(tmp, capsys)
    newest = tmp / "runs" / "run" / "checkpoints" / "step_000002" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    return cli(capsys, "resume", write_config(tmp, {"train": {"steps": 3}}))


def _diverged(tmp, capsys, monkeypatch):
    result = cli(capsys, "train", write_config(tmp, {"train": {"lr": 1e30, "max_grad_norm": 0.0, "steps": 3}}))
    for state in (tmp / "runs" / "run" / "checkpoints").rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(state)).values() if t.is_floating_point()), state
    return result


def _merge_two_runs(tmp, capsys, monkeypatch):
    _trained(tmp, capsys)
    _trained(tmp, capsys, {"output": {"name": "other"}})
    runs = tmp / "runs"
    files = [runs / "run" / "checkpoints" / "step_000002" / "adapter.safetensors",
             runs / "other" / "checkpoints" / "step_000001" / "adapter.safetensors"]
    return cli(capsys, "ema-merge", *files, "--out", tmp / "merged.safetensors")


def _merge_over_user_file(tmp, capsys, monkeypatch):
    _trained(tmp, capsys)
    mine = tmp / "mine.safetensors"
    mine.write_bytes(b"my own file")
    result = cli(capsys, "ema-merge", tmp / "runs" / "run", "--out", mine)
    assert mine.read_bytes() == b"my own file"
    return result


RUNS = [
    Case("resume-network-changed", _resume_changed({"network": {"rank": 4}}), 2,
         ("settings differ", "network.rank: 2 -> 4", "--restart")),
    Case("resume-data-changed", _resume_changed({"data": {"mask_min_weight": 0.5}}), 2, ("settings differ", "dataset")),
    Case("resume-weight-decay-changed", _resume_changed({"train": {"weight_decay": 0.5}}), 2,
         ("train.weight_decay", "only steps and lr may change")),
    Case("resume-steps-below-checkpoint", _resume_changed({"train": {"steps": 1}}), 2, ("past the new steps=1",)),
    Case("resume-lr-and-steps-applied", _resume_changed({"train": {"lr": 5e-4, "steps": 3}}, _lr_applied), 0,
         ("lr 0.001 -> 0.0005", "steps 2 -> 3", "done at step 3")),
    Case("resume-without-a-run", _resume_nothing, 2, ("nothing to resume", "dit-trainer train")),
    Case("train-again-other-settings", _train_again_other_settings, 0, ("moved to", "replaced-", "nothing was deleted")),
    Case("train-again-same-settings", _train_again_same_settings, 0, ("continuing the run", "done at step 2")),
    Case("resume-corrupt-newest", _corrupt_newest_checkpoint, 0, ("step_000002", "damaged", "newest intact",
                                                                  "done at step 3")),
    Case("diverged-run", _diverged, 1, ("NaN or infinite", "lower the lr", "Nothing non-finite was saved")),
    Case("merge-two-runs", _merge_two_runs, 2, ("different training runs",)),
    Case("merge-over-user-file", _merge_over_user_file, 2, ("mine.safetensors", "exists", "another --out")),
    Case("merge-damaged-file", _merge_damaged, 2, ("step_000001", "adapter.safetensors", "empty")),
    Case("merge-out-is-a-folder", _merge_out_is_a_folder, 2, ("merged.safetensors", "is not a merge of this run")),
    Case("merge-one-file", lambda tmp, capsys, mp: cli(capsys, "ema-merge", adapter_file(tmp / "a.safetensors"),
                                                           "--out", tmp / "m.safetensors"), 2, ("at least two",)),
]


# --- node rows --------------------------------------------------------------------------------


def node(function: Callable, caplog) -> Outcome:
    caplog.clear()
    try:
        function()
    except Exception as error:  # the node raised: ComfyUI shows this message in its error dialog
        return Outcome(1, f"{error}\n{caplog.text}")
    return Outcome(0, caplog.text)


NETWORK = dict(algo="lora", rank=2, alpha=2.0, use_rslora=False, dora_axis="input", init="kaiming", dropout=0.0,
               rank_dropout=0.0, module_dropout=0.0, train_refiners=False, exclude_mod=True, include_patterns="",
               exclude_patterns="", rank_pattern="", alpha_pattern="", conv_dim=0, conv_alpha=1.0, split_qkv=False,
               loraplus_lr_ratio=0.0, verbose=False)
DATA = dict(resolution=32, enable_buckets=False, bucket_step=16, min_side=16, max_side=64, no_upscale=False, repeats=1,
            caption_extension=".txt", default_caption="", shuffle_caption=False, keep_tokens=0, caption_separator=",",
            caption_dropout=0.0, masks="auto", cache_latents_to_disk=True)
TRAIN = dict(steps=1, batch_size=2, grad_accum=1, lr=1e-4, optimizer="adamw", weight_decay=0.0, schedule="constant",
             warmup_steps=0, max_grad_norm=1.0, timestep_sampling="sigmoid", discrete_flow_shift=3.0, loss="l2",
             huber_c=0.1, mixed_precision="no", seed=0, ema_decay=0.0, save_every=0, keep_last=1, sample_every=0,
             sample_prompts="", resume=True)
SAMPLE = dict(lora_name="None", strength=1.0, prompt="a magenta circle", negative_prompt="", width=32, height=32,
              steps=1, cfg=1.0, shift=1.0, seed=0)


def demo_graph(nodes, **network_changes):
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    network = call_node(nodes["BuildLoRANetwork"], dit, continue_from="None", **{**NETWORK, **network_changes})[0]
    data = call_node(nodes["DatasetFromFolder"], dit, DEMO_FOLDER, **DATA)[0]
    return dit, network, data


def _user_lora_kept(nodes, host, caplog):
    mine = host.folder("loras") / "my_lora.safetensors"
    mine.write_bytes(b"the user's own LoRA")
    dit, network, data = demo_graph(nodes)
    result = node(lambda: call_node(nodes["TrainLoRA"], dit, network, data, name="my_lora", unique_id="1", **TRAIN),
                  caplog)
    assert mine.read_bytes() == b"the user's own LoRA"
    assert (host.folder("loras") / "my_lora_2.safetensors").is_file()
    return result


def _extra_options(text: str):
    def run(nodes, host, caplog):
        dit, network, data = demo_graph(nodes)
        return node(lambda: call_node(nodes["TrainLoRA"], dit, network, data, name="x", unique_id="1",
                                      extra_options=text, **TRAIN), caplog)

    return run


def _continue_from_nan_node(nodes, host, caplog):
    adapter_file(host.folder("loras") / "broken.safetensors", poison=True)
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    network = call_node(nodes["BuildLoRANetwork"], dit, continue_from="broken.safetensors", **NETWORK)[0]
    data = call_node(nodes["DatasetFromFolder"], dit, DEMO_FOLDER, **DATA)[0]
    return node(lambda: call_node(nodes["TrainLoRA"], dit, network, data, name="x", unique_id="1", **TRAIN), caplog)


def _load_damaged_node(nodes, host, caplog):
    damaged(host.folder("diffusion_models") / "model.safetensors", "truncated")
    return node(lambda: call_node(nodes["LoadDiT"], "model.safetensors", "fp32", "sdpa", False), caplog)


def _sample_too_big_node(nodes, host, caplog):
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    return node(lambda: call_node(nodes["SampleWithLoRA"], dit, **{**SAMPLE, "width": 8192, "height": 8192}), caplog)


def _dataset_missing_node(nodes, host, caplog):
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    return node(lambda: call_node(nodes["DatasetFromFolder"], dit, "not_there", **DATA), caplog)


def _merge_without_run_node(nodes, host, caplog):
    return node(lambda: call_node(nodes["EMAMerge"], "beta", 0.9, 0.99, 0.1, True, False, "ema", run_name="nothing"),
                caplog)


def _saved_permissions_node(nodes, host, caplog):
    old = os.umask(0o022)
    try:
        dit, network, data = demo_graph(nodes)
        result = node(lambda: call_node(nodes["TrainLoRA"], dit, network, data, name="perm", unique_id="1",
                                        **{**TRAIN, "save_every": 1}), caplog)
    finally:
        os.umask(old)
    saved = [host.folder("loras") / "perm.safetensors",
             *(host.root / "output" / "dit_trainer" / "perm").rglob("*.safetensors")]
    assert len(saved) >= 3 and {oct(p.stat().st_mode & 0o777) for p in saved} == {"0o644"}, saved
    folders = [p for p in (host.root / "output" / "dit_trainer" / "perm").rglob("*") if p.is_dir()]
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {"0o755"}
    return result


NODE_ROWS = [
    Case("node-name-of-user-lora", _user_lora_kept, 0, ("my_lora.safetensors exists", "my_lora_2.safetensors"), True),
    Case("node-extra-options-text-lr", _extra_options('{"lr": "fast"}'), 1, ("TrainLoRA options", "[train] lr",
                                                                              "'fast'"), True),
    Case("node-extra-options-infinite", _extra_options('{"lr": Infinity}'), 1, ("[train] lr", "finite number"), True),
    Case("node-continue-from-nan", _continue_from_nan_node, 1, ("broken.safetensors", "NaN or infinite"), True),
    Case("node-checkpoint-truncated", _load_damaged_node, 1, ("model.safetensors", "truncated"), True),
    Case("node-sample-too-big", _sample_too_big_node, 1, ("8192", "attention scores", "smaller width"), True),
    Case("node-dataset-missing", _dataset_missing_node, 1, ("not_there", "does not exist"), True),
    Case("node-merge-without-run", _merge_without_run_node, 1, ("nothing", "needs at least 2"), True),
    Case("node-saved-permissions", _saved_permissions_node, 0, (), True),
]

CASES = TYPED + FILES + SIZES + OS + RUNS + NODE_ROWS


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch, caplog, request):
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO")
    if case.node:
        host = request.getfixturevalue("comfy_host")
        pack = request.getfixturevalue("comfy_pack")
        outcome = case.run(pack.NODE_CLASS_MAPPINGS, host, caplog)
    else:
        outcome = case.run(tmp_path, capsys, monkeypatch)
        outcome.text += caplog.text
    assert outcome.code == case.code, outcome.text[-3000:]
    assert "Traceback (most recent call last)" not in outcome.text, outcome.text[-3000:]
    if not case.node and case.code in (1, 2):  # the CLI says it in one line
        assert len([line for line in outcome.text.splitlines() if line.startswith("error: ")]) == 1, outcome.text
    for words in case.words:
        assert words in outcome.text, (words, outcome.text[-3000:])


def test_debug_shows_the_traceback_of_an_expected_failure(tmp_path, capsys):
    config = write_config(tmp_path, {"train": {"lr": "1e-4"}})
    assert main(["train", str(config)]) == 2 and "run.toml: [train] lr" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\[train\] lr"):
        main(["train", str(config), "--debug"])
