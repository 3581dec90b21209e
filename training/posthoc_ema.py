"""Post-hoc EMA: merge the checkpoints of one run into an exponential moving average.

Semantics of musubi-tuner's lora_post_hoc_ema.py (kohya-ss/musubi-tuner,
src/musubi_tuner/lora_post_hoc_ema.py): the checkpoints are taken oldest first, the merge
starts from the first one, and each later checkpoint j = 1 .. n-1 is folded in as
    merged = beta_j * merged + (1 - beta_j) * checkpoint_j        (in fp32)
so `posthoc_betas(n, ...)` returns the n - 1 values beta_1 .. beta_{n-1}. Modes:
  beta       beta_j = beta
  linear     beta_j runs linearly from beta (j = 1) to beta2 (j = n - 1)
  sigma_rel  power-function EMA of Karras et al. 2024 (EDM2, arXiv:2312.02696):
             beta_j = (1 - 1/t_j)^(gamma + 1), gamma from sigma_rel by Algorithm 2,
             the root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0.
             t is the checkpoint index, t_j = j, as in musubi-tuner: the first checkpoint
             sits at t = 0, so beta_1 = 0 and the merge effectively starts at the second.
             With `steps` (the training step of each checkpoint) t_j is that step instead,
             and beta_j = (t_{j-1} / t_j)^(gamma + 1): the product of the per-step betas
             (1 - 1/s)^(gamma + 1) for s = t_{j-1}+1 .. t_j, i.e. the per-step EMA with each
             checkpoint standing for the steps since the previous one. It equals the index
             form when the checkpoints are evenly spaced from step 0.

Ordering (musubi-tuner sorts by file modification time, which copying files destroys): by
the step in each file's "ss_steps" metadata; else by the number in names like step_000100
(the file's, else its folder's); else in the order given. Like musubi-tuner, A and B (and DoRA's dora_scale) are averaged
separately, which approximates the average of the products B A, and `.alpha` tensors must
be equal in every file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .network.comfy_format import read_safetensors
from .run_folder import RUN_ID_KEY

MODES = ("beta", "linear", "sigma_rel")
MAX_SIGMA_REL = 12**-0.5  # gamma = 0; larger sigma_rel has no gamma > 0
STEP_IN_NAME = re.compile(r"step[_-]?(\d+)", re.IGNORECASE)
METADATA_KEY = "dit_trainer_posthoc_ema"


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma > 0 with sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (EDM2, Algorithm 2)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel {sigma_rel} must be in (0, {MAX_SIGMA_REL:.4f}); typical values are 0.05 to 0.2")
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    # For t > 12 the cubic has exactly one positive root (one sign change, Descartes).
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def _check_beta(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"post-hoc EMA {name} {value} must be in [0, 1]")


def posthoc_betas(
    n: int,
    mode: str,
    beta: float = 0.95,
    beta2: float | None = None,
    sigma_rel: float | None = None,
    steps: list[int] | None = None,
) -> list[float]:
    """beta_1 .. beta_{n-1} for merging n checkpoints (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"post-hoc EMA mode {mode!r} is not one of {MODES}")
    if n < 2:
        raise ValueError(f"post-hoc EMA needs at least 2 checkpoints, got {n}")
    if steps is not None and mode != "sigma_rel":
        raise ValueError(f"post-hoc EMA: steps only apply to mode 'sigma_rel', not {mode!r}")
    if mode == "beta":
        _check_beta("beta", beta)
        return [beta] * (n - 1)
    if mode == "linear":
        if beta2 is None:
            raise ValueError("post-hoc EMA mode 'linear' needs beta2 (the beta of the last checkpoint)")
        _check_beta("beta", beta)
        _check_beta("beta2", beta2)
        return [beta + (beta2 - beta) * i / max(1, n - 2) for i in range(n - 1)]
    if sigma_rel is None:
        raise ValueError("post-hoc EMA mode 'sigma_rel' needs sigma_rel (e.g. 0.1)")
    exponent = sigma_rel_to_gamma(sigma_rel) + 1.0
    if steps is None:
        return [(1.0 - 1.0 / t) ** exponent for t in range(1, n)]
    if len(steps) != n or steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"post-hoc EMA steps {steps} must be {n} increasing values >= 0, one per checkpoint")
    return [(previous / current) ** exponent for previous, current in zip(steps, steps[1:])]


def _check_same_layout(states: list[dict[str, torch.Tensor]], names: list[str]) -> None:
    reference = states[0]
    for state, name in zip(states[1:], names[1:]):
        missing = [key for key in reference if key not in state]
        extra = [key for key in state if key not in reference]
        if missing or extra:
            key, problem = (missing[0], "lacks") if missing else (extra[0], "has an extra")
            raise ValueError(
                f"{name} {problem} key {key!r} compared with {names[0]}; merge only checkpoints of one run"
            )
        for key, tensor in reference.items():
            if state[key].shape != tensor.shape:
                raise ValueError(
                    f"{name}: {key!r} has shape {tuple(state[key].shape)}, {names[0]} has {tuple(tensor.shape)}; "
                    "merge only checkpoints of one run"
                )


def merge_state_dicts(
    states: list[dict[str, torch.Tensor]], betas: list[float], names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Fold states[1:] into states[0] with betas (len(states) - 1 of them), in fp32.

    Float tensors come back in the first state's dtype. `.alpha` and non-float tensors are
    kept and must be equal in every state. `names` label the states in errors.
    """
    if len(betas) != len(states) - 1:
        raise ValueError(f"{len(states)} checkpoints need {len(states) - 1} betas, got {len(betas)}")
    names = names or [f"checkpoint {i}" for i in range(len(states))]
    _check_same_layout(states, names)
    merged = {}
    for key, first in states[0].items():
        if key.endswith(".alpha") or not first.dtype.is_floating_point:
            for state, name in zip(states[1:], names[1:]):
                if not torch.equal(state[key], first):
                    raise ValueError(
                        f"{name}: {key!r} differs from {names[0]}; these checkpoints come from different settings"
                    )
            merged[key] = first
            continue
        average = first.float().clone()
        for beta, state in zip(betas, states[1:]):
            average.mul_(beta).add_(state[key].float(), alpha=1.0 - beta)
        merged[key] = average.to(first.dtype)
    return merged


def _checkpoint_steps(paths: list[Path], metadata: list[dict[str, str]]) -> tuple[list[int] | None, str]:
    """Each checkpoint's training step and where it came from, or (None, 'given order')."""
    from_metadata = [meta.get("ss_steps", "") for meta in metadata]
    if all(value.isdigit() for value in from_metadata):
        return [int(value) for value in from_metadata], "ss_steps"
    # The file's own name first, then its folder's (run_dir/checkpoints/step_000100/adapter.safetensors).
    from_names = [STEP_IN_NAME.findall(path.stem) or STEP_IN_NAME.findall(path.parent.name) for path in paths]
    if all(from_names):
        return [int(found[-1]) for found in from_names], "file name"
    return None, "given order"


def _one_run(paths: list[Path], metas: list[dict[str, str]]) -> None:
    """Refuse checkpoints of different training runs: by run id, or for older files by their network options."""
    key = RUN_ID_KEY if all(meta.get(RUN_ID_KEY) for meta in metas) else "dit_trainer_network"
    groups: dict[str | None, list[str]] = {}
    for path, meta in zip(paths, metas):
        groups.setdefault(meta.get(key), []).append(path.name)
    if len(groups) > 1:
        listed = "; ".join(", ".join(names[:3]) for names in groups.values())
        raise ValueError(
            f"these adapter files come from {len(groups)} different training runs ({listed}); a post-hoc EMA "
            "averages the checkpoints of one run: pick the files of one run (one run folder)"
        )


def merge_adapter_files(
    paths: list[str | os.PathLike],
    mode: str = "beta",
    beta: float = 0.95,
    beta2: float | None = None,
    sigma_rel: float | None = None,
    t_from_steps: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Merge saved adapter checkpoints of one run; returns (tensors, metadata of the newest + the merge).

    `t_from_steps` (mode sigma_rel only) uses each checkpoint's step as t instead of its
    index (see the module docstring); it needs steps from metadata or file names.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"post-hoc EMA needs at least 2 checkpoint files, got {len(paths)}")
    loaded = [read_safetensors(path, "checkpoint adapter") for path in paths]
    _one_run(paths, [meta for _, meta in loaded])
    steps, order_source = _checkpoint_steps(paths, [meta for _, meta in loaded])
    order = list(range(len(paths)))
    if steps is not None:
        order.sort(key=lambda i: steps[i])
        for a, b in zip(order, order[1:]):
            if steps[a] == steps[b]:
                raise ValueError(
                    f"{paths[a].name} and {paths[b].name} are both at step {steps[a]} ({order_source}); "
                    "merge checkpoints of one run, each once"
                )
        steps = [steps[i] for i in order]
    if t_from_steps and steps is None:
        raise ValueError("t_from_steps needs each file's step (ss_steps metadata or step_N in the name)")
    # File names label errors and the metadata (never full paths); add the folder when names repeat.
    unique = len({path.name for path in paths}) == len(paths)
    names = [paths[i].name if unique else f"{paths[i].parent.name}/{paths[i].name}" for i in order]
    betas = posthoc_betas(len(paths), mode, beta, beta2, sigma_rel, steps=steps if t_from_steps else None)
    tensors = merge_state_dicts([loaded[i][0] for i in order], betas, names)
    metadata = dict(loaded[order[-1]][1])
    metadata[METADATA_KEY] = json.dumps(
        {
            "mode": mode,
            "beta": beta,
            "beta2": beta2,
            "sigma_rel": sigma_rel,
            "gamma": sigma_rel_to_gamma(sigma_rel) if mode == "sigma_rel" else None,
            "t_from_steps": t_from_steps,
            "betas": betas,
            "files": names,
            "steps": steps,
            "order": order_source,
        }
    )
    return tensors, metadata
