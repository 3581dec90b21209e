"""One TOML file describes a whole run for `dit-trainer train`; the node fills the same fields.

    [model]     checkpoint (a .safetensors DiT, or "embedded-demo"), dtype (bf16 | fp16 | fp32 |
                fp8_e4m3fn | fp8_scaled), attention, blocks_to_swap, compile
    [network]   NetworkConfig fields (algo, rank, alpha, use_rslora, dora_axis, ...),
                plus continue_from = an adapter file to start from, and
                training_adapter (+ training_adapter_strength) = a LoRA merged into the
                base while training only (distilled bases; training_adapter.py)
    [data]      folder (or "embedded-demo"), DataConfig fields, mask_gamma, mask_min_weight,
                reg_folder (regularisation images, read with the same options; preservation.py)
    [train]     TrainConfig fields, with [train.loss], [train.timesteps] and [train.validation]
                sub-tables ([train.validation] folder = held-out images, read with the [data] options)
    [sample]    prompts (kohya line format, one per line) or prompts_file, and their defaults
    [output]    dir (the run folder's parent), name (file stem of the final adapter)

Every table is optional except [data]; an unknown key anywhere is an error that lists
the known keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainConfig
from .data.config import DataConfig
from .network.network import NetworkConfig
from .options import checked_values, from_plain

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEMO = "embedded-demo"
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


@dataclass
class DataSection:
    folder: str = DEMO
    options: dict = field(default_factory=dict)  # DataConfig fields, validated by DataConfig itself
    encoder_id: str = ""  # real models: the encoder id DatasetFromFolder cached the dataset under
    mask_gamma: float = 1.0
    mask_min_weight: float = 0.0
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
        return path if not path or path == DEMO or Path(path).is_absolute() else str(base_dir / path)

    model = from_plain(ModelSection, dict(values.get("model", {})), "model")
    model.checkpoint = resolve(model.checkpoint)
    network_values = dict(values.get("network", {}))
    own_values = {k: network_values.pop(k) for k in ("continue_from", "training_adapter", "training_adapter_strength")
                  if k in network_values}  # the section's own keys; the rest are NetworkConfig's
    network = from_plain(NetworkSection, {**own_values, "config": from_plain(NetworkConfig, network_values, "network")},
                         "network")
    network.continue_from, network.training_adapter = resolve(network.continue_from), resolve(network.training_adapter)
    data_values = dict(values["data"])
    own = {k: data_values.pop(k) for k in ("folder", "encoder_id", "mask_gamma", "mask_min_weight", "reg_folder")
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
