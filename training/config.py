"""Training options: one dataclass of plain values, saved with every adapter and checkpoint.

The CLI reads the same fields from the `[train]` table of a TOML file and the TrainLoRA
node fills them from its widgets, so both run the same loop with the same semantics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .fused_refusal import fused_backward_refusal
from .losses import LossConfig
from .noise import NoiseConfig
from .preservation import PreservationConfig
from .options import from_plain
from .timesteps import TimestepConfig
from .trackers import TrackingConfig
from .validation import ValidationConfig


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # optimizers.OPTIMIZERS: adamw, prodigy, adafactor, lion, came, adamw8bit, ...
    optimizer_kwargs: dict = field(default_factory=dict)  # validated per optimizer
    lr: float = 1e-4
    allow_negative_lr: bool = False  # lr < 0 (or negative lr_pattern multipliers): unlearning, very unstable
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # constant | linear | cosine | cosine_with_min_lr | polynomial | rex
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0: warmup = ratio * steps
    min_lr_ratio: float = 0.0
    power: float = 1.0  # polynomial schedule
    max_grad_norm: float = 1.0  # 0 disables clipping
    fused_backward_pass: bool = False  # step each parameter in the backward pass (kohya); saves gradient memory
    scale_weight_norms: float = 0.0  # max-norm regularisation of the adapter (0: off)
    loss: LossConfig = field(default_factory=LossConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # noise offset, multires noise (noise.py)
    preservation: PreservationConfig = field(default_factory=PreservationConfig)  # DOP, reg images
    guidance: float = 1.0  # distilled guidance a guidance-embedded model (Flux.1-dev) sees while training (musubi: 1.0)
    seed: int = 42
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast of the frozen base)
    gradient_checkpointing: bool = False
    fsdp: bool = False  # with several processes: shard the frozen base with FSDP2 (distributed.py)
    ema_decay: float = 0.0  # online EMA of the adapter (0: off)
    ema_start_step: int = 0
    ema_update_every: int = 1
    sample_every: int = 0  # preview every N steps (0: never)
    save_every: int = 0  # resumable checkpoint every N steps (0: only at the end / on interrupt)
    keep_last: int = 3  # resumable states kept; adapter snapshots are all kept for post-hoc EMA (0: keep all)
    max_nonfinite_steps: int = 10  # stop after this many consecutive NaN / inf losses
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # held-out loss (validation.py)
    validation_split: float = 0.0  # fraction of the images held out of training for validation (0: none)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # experiment trackers (trackers.py)

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if isinstance(self.timesteps, dict):
            self.timesteps = TimestepConfig(**self.timesteps)
        if isinstance(self.preservation, dict):
            self.preservation = PreservationConfig(**self.preservation)
        if isinstance(self.noise, dict):
            self.noise = NoiseConfig(**self.noise)
        if isinstance(self.validation, dict):
            self.validation = ValidationConfig(**self.validation)
        if isinstance(self.tracking, dict):
            self.tracking = TrackingConfig(**self.tracking)
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "grad_accum", "ema_update_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train option {name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "sample_every", "keep_last", "ema_start_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"train option {name} must not be negative, got {getattr(self, name)}")
        if self.lr == 0 or (self.lr < 0 and not self.allow_negative_lr):
            raise ValueError(f"train option lr must be positive (negative only with allow_negative_lr: true, for "
                             f"unlearning; very unstable), got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train option ema_decay must be in [0, 1) (0 turns EMA off), got {self.ema_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train option warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError(f"train option validation_split must be in [0, 1) (0: no split), "
                             f"got {self.validation_split}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train option mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.fused_backward_pass:
            reason = fused_backward_refusal(self.optimizer, self.grad_accum, self.max_grad_norm, self.mixed_precision)
            if reason:
                raise ValueError(f"train option fused_backward_pass cannot be exact here: {reason}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return from_plain(cls, values, "train")
