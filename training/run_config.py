"""One TOML file describes a whole run for `dit-trainer train`; the node fills the same fields.

    [model]     checkpoint (a .safetensors DiT, or "embedded-demo"), dtype (bf16 | fp16 | fp32 |
                fp8_e4m3fn | fp8_scaled), attention, blocks_to_swap, compile
    [network]   NetworkConfig fields (algo, rank, alpha, use_rslora, dora_axis, ...),
                plus continue_from = an adapter file to start from, and
                training_adapter (+ training_adapter_strength) = a LoRA merged into the
                base while training only (distilled bases; training_adapter.py)
    [data]      folder (or "embedded-demo"), DataConfig fields, mask_gamma, mask_min_weight,
                mask_weights = false to train without mask loss weights (a graph without WeightedMask),
                reg_folder (regularisation images, read with the same options; preservation.py)
    [train]     TrainConfig fields, with [train.loss], [train.timesteps] and [train.validation]
                sub-tables ([train.validation] folder = held-out images, read with the [data] options)
    [sample]    prompts (kohya line format, one per line) or prompts_file, and their defaults
    [output]    dir (the run folder's parent), name (file stem of the final adapter)

Every table is optional except [data]; an unknown key anywhere is an error that lists
the known keys, so a typo never silently falls back to a default.

`write_run_config` writes such a file: TrainLoRA leaves `run.toml` in its run folder, the
complete headless config of that run, so the same training runs with `dit-trainer train`
or `accelerate launch` (README "Train on more GPUs") into the same run folder, with the
same settings fingerprint, and either side continues the other's checkpoints. Paths in it
are relative to the run folder when they lie inside the same tree (ComfyUI's folder):
that tree can move as a whole.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .config import TrainConfig
from .data.config import DataConfig
from .network.network import NetworkConfig
from .options import checked_values, from_plain
from .storage import OUTPUT_FIX, atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEMO = "embedded-demo"
RUN_CONFIG_FILE = "run.toml"  # in a run folder: the run's headless config (written by TrainLoRA)
RELATIVE_UP_TO = 3  # a path at most this many folders up from the run folder is written relative to it
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class ModelSection:
    checkpoint: str = DEMO
    dtype: str = "bf16"  # fp32 | bf16 | fp16 | fp8_e4m3fn | fp8_scaled (storage of the frozen base)
    attention: str = "auto"  # auto | cute | flash | sdpa
    blocks_to_swap: int = 0  # the last N transformer blocks live in host memory, copied in one ahead of use
    compile: bool = False  # torch.compile each transformer block (dynamic sequence lengths)


@dataclass
class NetworkSection:
    config: NetworkConfig = field(default_factory=NetworkConfig)
    continue_from: str = ""
    training_adapter: str = ""  # a LoRA file merged into the base while training, never exported
    training_adapter_strength: float = 1.0
    reg_folder: Path | None = None  # regularisation images, read with the [data] options
    validation_folder: Path | None = None  # held-out images, read with the [data] options


@dataclass
class DataSection:
    folder: str = DEMO
    options: dict = field(default_factory=dict)  # DataConfig fields, validated by DataConfig itself
    encoder_id: str = ""  # real models: the encoder id DatasetFromFolder cached the dataset under
    mask_gamma: float = 1.0
    mask_min_weight: float = 0.0
    mask_weights: bool = True  # false: the dataset's masks do not weight the loss (TrainLoRA without WeightedMask)
    reg_folder: str = ""  # class images that alternate with the training batches ("" = none)


@dataclass
class SampleSection:
    prompts: str = ""
    prompts_file: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 20
    cfg: float = 1.0
    shift: float = 3.0
    seed: int = 0


@dataclass
class OutputSection:
    dir: str = "runs"
    name: str = "my_lora"

    def __post_init__(self):
        if not SAFE_NAME.fullmatch(self.name) or ".." in self.name:
            raise ValueError(
                f"[output] name {self.name!r} must be a plain file stem (letters, digits, . _ -), "
                "so the adapter cannot be written outside the output folder"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.dir) / self.name


@dataclass
class RunConfig:
    model: ModelSection
    network: NetworkSection
    data: DataSection
    train: TrainConfig
    sample: SampleSection
    output: OutputSection


def parse_run_config(values: dict, base_dir: Path = Path(".")) -> RunConfig:
    """Build a RunConfig from parsed TOML; relative paths are taken from `base_dir`."""
    unknown = sorted(set(values) - {"model", "network", "data", "train", "sample", "output"})
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; known: [model] [network] [data] [train] [sample] [output]")
    if "data" not in values:
        raise ValueError('the config needs a [data] table with folder = "<images folder>" (or "embedded-demo")')

    def resolve(path: str) -> str:
        # Normalised and absolute: the dataset and continue_from paths are part of the run's settings, so a
        # path given relative to the config names the same run as the absolute one (TrainLoRA's run.toml).
        return path if not path or path == DEMO else os.path.abspath(base_dir / path)

    model = from_plain(ModelSection, dict(values.get("model", {})), "model")
    model.checkpoint = resolve(model.checkpoint)
    network_values = dict(values.get("network", {}))
    own_values = {k: network_values.pop(k) for k in ("continue_from", "training_adapter", "training_adapter_strength")
                  if k in network_values}  # the section's own keys; the rest are NetworkConfig's
    network = from_plain(NetworkSection, {**own_values, "config": from_plain(NetworkConfig, network_values, "network")},
                         "network")
    network.continue_from, network.training_adapter = resolve(network.continue_from), resolve(network.training_adapter)
    data_values = dict(values["data"])
    own = {k: data_values.pop(k) for k in ("folder", "encoder_id", "mask_gamma", "mask_min_weight", "mask_weights",
                                           "reg_folder")
           if k in data_values}
    data = from_plain(DataSection, {**own, "options": checked_values(DataConfig, data_values, "data")}, "data")
    data.folder, data.reg_folder = resolve(data.folder), resolve(data.reg_folder)
    DataConfig(**data.options)  # range checks too, before any model is loaded
    train = TrainConfig.from_dict(dict(values.get("train", {})))
    train.validation.folder = resolve(train.validation.folder)
    sample = from_plain(SampleSection, dict(values.get("sample", {})), "sample")
    sample.prompts_file = resolve(sample.prompts_file)
    output = from_plain(OutputSection, dict(values.get("output", {})), "output")
    output.dir = resolve(output.dir)
    return RunConfig(model, network, data, train, sample, output)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config file {path} does not exist") from err
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err
    try:
        return parse_run_config(values, path.parent)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _path_from(run_dir: Path, path: str | os.PathLike) -> str:
    """`path` relative to the run folder when it is at most RELATIVE_UP_TO folders up, else absolute."""
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute, os.path.abspath(run_dir))
    except ValueError:  # another drive (Windows)
        return absolute
    ups = Path(relative).parts.count("..")
    return Path(relative).as_posix() if ups <= RELATIVE_UP_TO else absolute


def _plain(values: dict) -> dict:
    """TOML has no null: options left at None (their default) are left out."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if v is not None}


@dataclass
class HandOff:
    """What a run in ComfyUI was made of, for `write_run_config` (paths are absolute; DEMO for the demo base)."""

    checkpoint: str
    model: dict  # the other [model] options (models/setup.py load_settings)
    network: NetworkConfig
    data_folder: Path
    data: DataConfig
    encoder_id: str
    mask_weighting: tuple[float, float] | None  # (gamma, min_weight) when masks weigh the loss
    train: TrainConfig
    continue_from: Path | None = None
    training_adapter: Path | None = None
    training_adapter_strength: float = 1.0
    reg_folder: Path | None = None  # regularisation images, read with the [data] options
    validation_folder: Path | None = None  # held-out images, read with the [data] options


def run_config_values(run: HandOff, run_dir: Path) -> dict:
    """The TOML tables of `run`, for a run.toml inside `run_dir` that trains into `run_dir`."""
    network = {**run.network.to_dict()}
    if run.continue_from is not None:
        network["continue_from"] = _path_from(run_dir, run.continue_from)
    if run.training_adapter is not None:
        network["training_adapter"] = _path_from(run_dir, run.training_adapter)
        network["training_adapter_strength"] = run.training_adapter_strength
    gamma, min_weight = run.mask_weighting or (1.0, 0.0)
    data = {"folder": _path_from(run_dir, run.data_folder), **_plain(run.data.to_dict()), "encoder_id": run.encoder_id,
            "mask_weights": run.mask_weighting is not None, "mask_gamma": gamma, "mask_min_weight": min_weight}
    if run.reg_folder is not None:
        data["reg_folder"] = _path_from(run_dir, run.reg_folder)
    train = run.train.to_dict()
    if run.validation_folder is not None:
        train["validation"]["folder"] = _path_from(run_dir, run.validation_folder)
    checkpoint = run.checkpoint if run.checkpoint == DEMO else _path_from(run_dir, run.checkpoint)
    return {
        "model": {"checkpoint": checkpoint, **run.model},
        "network": _plain(network),
        "data": data,
        "train": train,
        "output": {"dir": _path_from(run_dir, run_dir.parent), "name": run_dir.name},
    }


def write_run_config(run: HandOff, run_dir: Path) -> Path:
    """Write `run_dir`/run.toml (atomically); reading it back gives the run's settings (checked here)."""
    values = run_config_values(run, run_dir)
    header = (
        "# The complete headless config of this run, written by TrainLoRA; it trains into this folder and\n"
        "# continues its checkpoints (either way: ComfyUI resumes what the CLI trained). Run it with\n"
        "#   dit-trainer train run.toml\n"
        "#   accelerate launch --num_processes N -m dit_trainer.training.cli train run.toml\n"
        f"# batch_size is per process: keep batch_size x N = {run.train.batch_size} to continue this run.\n"
        "# Previews ([sample]) need ComfyUI's VAE and text encoder and are left out.\n\n"
    )
    text = header + tomli_w.dumps(values)
    parse_run_config(tomllib.loads(text), run_dir)  # a file the CLI would refuse is never written
    path = run_dir / RUN_CONFIG_FILE
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"), OUTPUT_FIX)
    return path
