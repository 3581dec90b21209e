"""Training options: one dataclass of plain values, saved with every adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .timesteps import TimestepConfig


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    loss: str = "l2"  # l2 | huber | smooth_l1
    huber_c: float = 0.1
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    seed: int = 42
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast of the frozen base)
    gradient_checkpointing: bool = False
    sample_every: int = 0  # preview every N steps (0: never)
    max_nonfinite_steps: int = 10  # stop after this many consecutive NaN / inf losses

    def to_dict(self) -> dict:
        return asdict(self)
