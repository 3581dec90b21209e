"""Loading a LoRA file into a network, to continue training it or to sample with it.

`load_adapter_into(network, path)` reads our files and the common foreign forms
(kohya / musubi `lora_unet_*`, diffusers / ai-toolkit `transformer.*`, PEFT
`base_model.model.*`, bare and LyCORIS names; see key_names.py), maps diffusers
names to the network's ComfyUI modules, assembles q / k / v slices into fused
projections (A stacked, B block-diagonal, one shared scale) and splits fused
block-diagonal files back into split adapters. Keys in the broken converter form
(`diffusion_model.double_blocks.0.img_attn_qkv`) are read as the dotted module, with
a warning: ComfyUI does not load them. Values follow ComfyUI's reading of
the file: scale = alpha / rank (no alpha: scale 1), an [out, 1] dora_scale is
relative to ||W0|| (converted back to the engine's magnitude), a [1, in] one is
the input-axis magnitude.

Consistency is checked before anything is copied, and every mismatch is a
ValueError that names the file, the key or option, and the fix: RS-LoRA flag,
rank, scale (alpha), DoRA axis, DoRA expected but absent, partial DoRA. A file with
DoRA magnitudes loaded into a plain-LoRA network only warns (the magnitudes are
ignored). A file whose alpha is missing (PEFT, scale 1) is loaded at the network's
scale with B rescaled, so the layer output is unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ...kernels.dora import dora_weight_norm
from .key_names import (
    COMFY_PREFIX,
    MANGLED_STYLE,
    PRODUCT_ROLES,
    TEXT_ENCODER_PREFIXES,
    Alias,
    diffusers_aliases,
    key_forms,
    mangled_as_kohya,
    split_key,
)
from .lora import DORA_EPS, weight_scale_of
from .network import PRODUCT_ALGOS, LoRANetwork
from .product_import import load_products, product_of
from ..storage import NonFiniteError, finite_or_raise, read_safetensors

log = logging.getLogger(__name__)

_SCALE_RTOL = 1e-5  # scales match when equal to float32 rounding of alpha / rank
_SHOWN = 6  # names listed in an error before "... and N more"


@dataclass
class ImportReport:
    """What `load_adapter_into` did."""

    path: str
    styles: list[str]  # key styles found: comfy, kohya, diffusers, peft, bare, lycoris, onetrainer, mangled_converter
    loaded: list[str]  # network modules set from the file
    not_in_file: list[str]  # network modules the file has no LoRA for (left as initialised)
    qkv_converted: list[str]  # modules assembled from q/k/v slices or split from a fused LoRA
    rescaled: list[str]  # modules whose file had no alpha (scale 1): B rescaled to the network's scale
    dora_ignored: list[str]  # file DoRA magnitudes dropped because the network adapts the layer with LoRA
    ignored_keys: list[str]  # text-encoder keys (we adapt the diffusion model only)
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Piece:
    """The file's tensors for one alias of one module."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None  # PEFT lora_magnitude_vector (output axis, relative to ||V||)
    product: dict[str, torch.Tensor] = field(default_factory=dict)  # LoHa / LoKr tensors by key_names.PRODUCT_ROLES
    keys: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


@dataclass
class _Assembled:
    """One module's LoRA in the file, fused: scale * up @ down, plus its DoRA values."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    has_alpha: bool
    dora_axis: str | None  # None: no DoRA in the file for this module
    dora_values: torch.Tensor | None  # input axis: m [in]; output axis: ComfyUI [out] or PEFT [out]
    dora_relative_to_base: bool  # True: ComfyUI [out, 1] form, m * (||W0|| + eps) / (||V|| + eps)
    slice_ranks: list[int] | None  # ranks of the q / k / v slices it was assembled from
    keys: list[str]


def shown(names: list[str]) -> str:
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def alias_table(architecture: str, layers: dict[str, nn.Module]) -> dict[str, tuple[str, Alias, str]]:
    """Every accepted module-key form of `layers` (name -> Linear / Conv) -> (layer name, alias, key style)."""
    table: dict[str, tuple[str, Alias, str]] = {}
    for name, layer in layers.items():
        out_features, in_features = layer.weight.shape[:2]
        aliases = [Alias(name)] + diffusers_aliases(architecture, name, out_features, in_features)
        for alias in aliases:
            for form, style in key_forms(alias.name).items():
                table.setdefault(form, (name, alias, style))
    return table


def group_file(path: str, tensors: dict[str, torch.Tensor], table: dict):
    """File tensors by layer and alias: ({layer: {alias: piece}}, key styles, text-encoder keys, unmatched keys)."""
    pieces: dict[str, dict[Alias, _Piece]] = defaultdict(dict)
    styles, unknown, ignored = set(), [], []
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            ignored.append(key)
            continue
        parsed = split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        module_key, role = parsed
        entry = table.get(module_key)
        if entry is None:
            kohya_form = mangled_as_kohya(module_key)
            if kohya_form not in table:
                unknown.append(key)
                continue
            entry = (*table[kohya_form][:2], MANGLED_STYLE)
        name, alias, style = entry
        styles.add(style)
        piece = pieces[name].setdefault(alias, _Piece())
        if (piece.product.get(role) if role in PRODUCT_ROLES else getattr(piece, role)) is not None:
            earlier = next(k for k in piece.keys if split_key(k)[1] == role)
            raise ValueError(f"{path}: {key} and {earlier} name the same tensor of {name}; keep one of them")
        piece.keys.append(key)
        if role == "alpha":
            piece.alpha = float(tensor.float().item())
        elif role in PRODUCT_ROLES:
            piece.product[role] = tensor.float()
        else:
            setattr(piece, role, tensor.float())
    return pieces, sorted(styles), ignored, sorted(unknown)


def _is_mangled(key: str, table: dict) -> bool:
    """Whether `key` is read only through its broken converter form (see key_names.mangled_as_kohya)."""
    parsed = split_key(key)
    return parsed is not None and parsed[0] not in table and mangled_as_kohya(parsed[0]) in table


def assemble(path: str, name: str, parts: dict[Alias, _Piece], out_features: int) -> _Assembled:
    """One layer's LoRA in the file as a single fused (down, up, scale), slices joined."""
    for alias, piece in parts.items():
        if piece.down is None or piece.up is None:
            missing = "down (lora_A / lora_down)" if piece.down is None else "up (lora_B / lora_up)"
            raise ValueError(f"{path}: {alias.name} has no {missing} weight (keys: {', '.join(piece.keys)})")
    full = [a for a in parts if a.rows is None]
    if full:
        if len(parts) > 1:
            raise ValueError(
                f"{path}: {name} appears both whole and as q/k/v slices ({', '.join(a.name for a in parts)}); keep one form"
            )
        piece = parts[full[0]]
        axis, values, relative = _dora_of(path, name, piece, out_features)
        return _Assembled(piece.down, piece.up, piece.scale, piece.alpha is not None, axis, values, relative, None, piece.keys)
    return _assemble_slices(path, name, parts, out_features)


def _dora_of(path: str, name: str, piece: _Piece, out_rows: int):
    """(axis, values, relative_to_base) of one piece's DoRA tensors, following ComfyUI's dispatch."""
    if piece.magnitude is not None:
        return "output", piece.magnitude.flatten(), False
    if piece.dora_scale is None:
        return None, None, False
    scale = piece.dora_scale
    # comfy/weight_adapter/base.py: output axis when dora_scale.shape[0] == the weight's rows.
    if scale.shape[0] == out_rows:
        return "output", scale.flatten(), True
    if scale.dim() >= 2 and scale.shape[0] == 1:
        return "input", scale.flatten(), False
    raise ValueError(f"{path}: {name}.dora_scale has shape {tuple(scale.shape)}; expected [1, in] or [{out_rows}, 1]")


def _fused_dora(path: str, name: str, ordered: list[tuple[Alias, _Piece]]):
    """DoRA values of q / k / v slices joined into the fused layer's (output axis only)."""
    dora = [_dora_of(path, alias.name, piece, alias.rows[1]) for alias, piece in ordered]
    axes = {axis for axis, _, _ in dora}
    if axes == {None}:
        return None, None, False
    if axes == {"output"} and len({relative for _, _, relative in dora}) == 1:
        return "output", torch.cat([values for _, values, _ in dora]), dora[0][2]
    raise ValueError(
        f"{path}: {name}: DoRA magnitudes on q/k/v slices can only be fused on the output axis and must be "
        "present on every slice; convert the file with its training tool or drop the DoRA keys"
    )


def _assemble_slices(path: str, name: str, parts: dict[Alias, _Piece], out_features: int) -> _Assembled:
    ordered = sorted(parts.items(), key=lambda item: item[0].rows[0])
    expected = 0
    for alias, _ in ordered:
        if alias.rows[0] != expected:
            break
        expected += alias.rows[1]
    if expected != out_features:
        present = ", ".join(a.name for a, _ in ordered)
        raise ValueError(
            f"{path}: {name} is given as slices ({present}) that do not cover all {out_features} output rows; "
            "a fused layer needs every q / k / v (/ MLP) slice"
        )
    axis, values, relative = _fused_dora(path, name, ordered)
    keys = [k for _, piece in ordered for k in piece.keys]
    slice_ranks = [piece.down.shape[0] for _, piece in ordered]
    has_alpha = all(piece.alpha is not None for _, piece in ordered)
    scales = {piece.scale for _, piece in ordered}
    first_down = ordered[0][1].down
    if len(scales) == 1 and all(torch.equal(piece.down, first_down) for _, piece in ordered):
        # One LoRA written as slices (diffusers / ai-toolkit / our PEFT export): A shared,
        # B row slices. Rejoined at its own rank, not as a block-diagonal parts * r one.
        up = torch.cat([piece.up for _, piece in ordered])
        return _Assembled(first_down, up, scales.pop(), has_alpha, axis, values, relative, slice_ranks, keys)
    # Separate LoRAs per slice: A stacked, B block-diagonal, one shared scale; slices with
    # different scales get theirs folded into B, leaving scale 1 (as a file without alpha).
    shared = scales.pop() if len(scales) == 1 else None
    rank_total = sum(slice_ranks)
    ups, column = [], 0
    for (_, piece), rank in zip(ordered, slice_ranks):
        block = piece.up if shared is not None else piece.up * piece.scale
        padded = block.new_zeros(block.shape[0], rank_total)
        padded[:, column : column + rank] = block
        ups.append(padded)
        column += rank
    down = torch.cat([piece.down for _, piece in ordered])
    fused_scale, has_alpha = (shared, has_alpha) if shared is not None else (1.0, False)
    return _Assembled(down, torch.cat(ups), fused_scale, has_alpha, axis, values, relative, slice_ranks, keys)


def _rslora_check(path: str, meta: dict[str, str], network: LoRANetwork, assembled: dict[str, _Assembled]) -> str | None:
    """Raise on an RS-LoRA mismatch (naming both fixes); return a hint when the alphas look like RS-LoRA."""
    flag = meta.get("use_rslora_flag")
    with_alpha = [(item.scale * item.down.shape[0], item.down.shape[0]) for item in assembled.values() if item.has_alpha]
    near_sqrt = sum(math.isclose(alpha, math.sqrt(rank), rel_tol=1e-3) for alpha, rank in with_alpha)
    hint = None
    if flag is None and with_alpha and near_sqrt * 2 > len(with_alpha):
        hint = (
            f"{path}: {near_sqrt} of {len(with_alpha)} modules have alpha = sqrt(rank) and the file has no "
            "use_rslora_flag: it may come from an RS-LoRA run of a tool that stores the raw alpha, in which case "
            "ComfyUI (and this loader) apply alpha / rank, not the alpha / sqrt(rank) it was trained with"
        )
    file_rslora = flag == "true"
    if file_rslora == network.cfg.use_rslora:
        return hint
    stored, rank = with_alpha[0] if with_alpha else (None, network.cfg.rank)
    stored_text = f"{stored:g}" if stored is not None else "its alpha"
    if file_rslora:
        trained = meta.get("ss_network_alpha", f"{stored / math.sqrt(rank):g}" if stored is not None else "its alpha")
        message = (
            f"{path} was trained with RS-LoRA (use_rslora_flag=true) but the network has use_rslora=False. "
            f"Either set use_rslora=True with alpha={trained} to continue it as trained, or keep use_rslora=False "
            f"and set alpha={stored_text} (the stored alpha: same scale under alpha / rank)"
        )
    else:
        state = "false" if flag is not None else "missing"
        rs_alpha = f"{stored / math.sqrt(rank):g}" if stored is not None else "alpha / sqrt(rank)"
        message = (
            f"{path} is a plain alpha / rank LoRA (use_rslora_flag {state}) but the network has use_rslora=True. "
            f"Either set use_rslora=False with alpha={stored_text}, or keep use_rslora=True and set alpha={rs_alpha} "
            "(same scale under alpha / sqrt(rank))"
        )
    raise ValueError(message + (f". Note: {hint}" if hint else ""))


def _dora_check(path: str, network: LoRANetwork, assembled: dict[str, _Assembled]) -> list[str]:
    """Raise when DoRA is expected but absent or partial; return the modules whose magnitudes are ignored."""
    dora_net = {a.name for a in network.adapters if a.algo == "dora"}
    file_dora = {name for name, item in assembled.items() if item.dora_axis is not None}
    if dora_net and not file_dora:
        raise ValueError(
            f"{path}: the network is DoRA (algo='dora') but the file has no dora_scale / lora_magnitude_vector keys; "
            "build the network with algo='lora' to load this LoRA"
        )
    missing = sorted((dora_net & set(assembled)) - file_dora)
    if dora_net and missing:
        keys = [f"{COMFY_PREFIX}{name}.dora_scale" for name in missing]
        raise ValueError(
            f"{path}: partial DoRA checkpoint: {len(missing)} DoRA modules have no magnitude: {shown(keys)}; "
            "the file is incomplete or from another network layout"
        )
    return sorted(file_dora - dora_net)


def _rank_error(path: str, adapter, item: _Assembled, expected: tuple) -> ValueError:
    file_rank = item.down.shape[0]
    fixes = [f"set rank={file_rank} (or rank_pattern {{{adapter.name!r}: {file_rank}}})"]
    if item.slice_ranks and len(set(item.slice_ranks)) == 1:
        fixes.append(
            f"or split_qkv=True with rank={item.slice_ranks[0]}: the file trains the q / k / v slices separately"
        )
    if adapter.parts > 1:
        fixes.append("or split_qkv=False: the file's fused LoRA is not split per slice")
    down_key = next((k for k in item.keys if "lora_A" in k or "lora_down" in k), item.keys[0])
    return ValueError(
        f"{path}: {down_key} has rank {file_rank} (lora_A {tuple(item.down.shape)}, lora_B "
        f"{tuple(item.up.shape)}) but the network's {adapter.name} expects lora_A {expected}; " + " ".join(fixes)
    )


def _factors_for(path: str, adapter, item: _Assembled, up_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The file's (down, up) in the adapter's own layout (split, PiSSA); up times `up_factor`
    (file scale / network scale, for files without alpha)."""
    down, up = item.down, item.up if up_factor == 1.0 else item.up * up_factor
    rank = adapter.rank
    if getattr(adapter, "init", "") == "pissa":
        if down.shape[0] != 2 * rank:
            raise ValueError(
                f"{path}: {adapter.name} is a PiSSA adapter (init='pissa'), which continues only from files it wrote "
                f"(rank {2 * rank} = [A; A0]); this file has rank {down.shape[0]}: build the network with init='kaiming'"
            )
        base_down, base_up = down[rank:], -up[:, rank:]
        if not (
            torch.allclose(base_down, adapter.pissa_A0.float(), rtol=1e-4, atol=1e-5)
            and torch.allclose(base_up, adapter.pissa_B0.float(), rtol=1e-4, atol=1e-5)
        ):
            raise ValueError(
                f"{path}: {adapter.name}: the file's PiSSA base factors differ from this base weight's SVD; it was "
                "trained on other base weights. Load the base checkpoint it was trained on, or use init='kaiming'"
            )
        down, up = down[:rank], up[:, :rank]
    if adapter.parts == 1:
        if down.shape != adapter.lora_A.shape or up.shape != adapter.lora_B.shape:
            raise _rank_error(path, adapter, item, tuple(adapter.lora_A.shape))
        return down, up
    if down.shape[0] == rank and up.shape == adapter.lora_B.shape:
        # One LoRA shared by the slices: each slice keeps A, with its own rows of B.
        return down.repeat(adapter.parts, 1), up
    fused_shape = (adapter.lora_B.shape[0], adapter.parts * rank)
    if down.shape != adapter.lora_A.shape or up.shape != fused_shape:
        raise _rank_error(path, adapter, item, tuple(adapter.lora_A.shape))
    stacked = up.new_zeros(adapter.lora_B.shape)
    row = 0
    for part, rows in enumerate(adapter.split_dims):
        block = up[row : row + rows]
        own = slice(part * rank, (part + 1) * rank)
        off_block = block.clone()
        off_block[:, own] = 0
        if off_block.abs().max() > 0:
            raise ValueError(
                f"{path}: {adapter.name} is not block-diagonal over the q / k / v slices: it was trained as one fused "
                f"LoRA. Build the network with split_qkv=False (rank_pattern {{{adapter.name!r}: {down.shape[0]}}})"
            )
        stacked[row : row + rows] = block[:, own]
        row += rows
    return down, stacked


def _magnitude_for(path: str, adapter, item: _Assembled, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if item.dora_axis != adapter.dora_axis:
        raise ValueError(
            f"{path}: {adapter.name}: the file's DoRA magnitude is on the {item.dora_axis} axis but the network uses "
            f"dora_axis={adapter.dora_axis!r}; set dora_axis={item.dora_axis!r}"
        )
    values = item.dora_values
    if item.dora_relative_to_base:
        # ComfyUI divides an [out, 1] dora_scale by ||W0|| + eps; the engine divides m by ||V|| + eps.
        weight_scale = weight_scale_of(adapter.base)
        norm = dora_weight_norm(
            adapter.base.weight, down, up, adapter.scale, "output", adapter.base_sq(), weight_scale=weight_scale
        )
        values = values * (norm + DORA_EPS) / (adapter.base_norm() + DORA_EPS)
    return values


def _not_in_file_warning(path: str, names: list[str]) -> str:
    return f"{path}: {len(names)} adapted modules are not in the file and keep their initial values ({shown(names)})"


def _load_products(path, network, adapters, products, pieces, styles, ignored, meta) -> ImportReport:
    """A LoHa / LoKr file into a LoHa / LoKr network (product_import.py); anything else is refused."""
    algo = network.cfg.algo
    if not products:
        raise ValueError(f"{path}: the network is {algo} but the file has LoRA keys (or none); build it with algo='lora'")
    if algo not in PRODUCT_ALGOS or len(products) < len(pieces):
        kinds = sorted({item.algo for item in products.values()})
        raise ValueError(
            f"{path} holds {'/'.join(kinds)} adapters"
            + (" beside LoRA ones" if len(products) < len(pieces) else "")
            + f" but the network is {algo}; build it with algo={kinds[0]!r} (SampleWithLoRA and BuildLoRANetwork's "
            "continue_from shape it from the file)"
        )
    report = ImportReport(path, styles, [], [], [], [], [], ignored, meta)
    report.rescaled = load_products(path, adapters, products)
    report.loaded = list(products)
    report.not_in_file = [name for name in network.names if name not in products]
    if report.not_in_file:
        report.warnings.append(_not_in_file_warning(path, report.not_in_file))
    for warning in report.warnings:
        log.warning("%s", warning)
    log.info("loaded %d %s modules from %s (%s)", len(report.loaded), algo, path, ", ".join(styles))
    return report


@torch.no_grad()
def load_adapter_into(network: LoRANetwork, path: str | os.PathLike) -> ImportReport:
    """Load a LoRA / DoRA file of any supported key style into `network`; see the module docstring."""
    path = str(path)
    tensors, meta = read_safetensors(path, "adapter file")
    try:
        finite_or_raise(tensors, f"adapter file {path}")
    except NonFiniteError as error:
        raise ValueError(f"{error}: the file is broken (a diverged run saved it); use an earlier checkpoint") from None
    adapters = network.by_name()
    table = alias_table(network.architecture, {name: adapter.base for name, adapter in adapters.items()})
    pieces, styles, ignored, unknown = group_file(path, tensors, table)
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} keys match no layer this {network.architecture} network adapts "
            f"({shown(unknown)}). If they are LoRA layers of the model, add them with include_patterns "
            "(or exclude_mod=False / train_refiners=True); full-diff keys are not adapters and cannot be loaded"
        )
    products = {name: product_of(path, name, parts) for name, parts in pieces.items()}
    products = {name: item for name, item in products.items() if item is not None}
    if products or network.cfg.algo in PRODUCT_ALGOS:
        return _load_products(path, network, adapters, products, pieces, styles, ignored, meta)
    assembled = {
        name: assemble(path, name, parts, adapters[name].base.weight.shape[0]) for name, parts in pieces.items()
    }
    if not assembled:
        raise ValueError(
            f"{path}: no LoRA keys for this {network.architecture} network (keys seen: {shown(sorted(tensors))})"
        )
    hint = _rslora_check(path, meta, network, assembled)
    dora_ignored = _dora_check(path, network, assembled)

    report = ImportReport(path, styles, [], [], [], [], dora_ignored, ignored, meta)
    updates = []
    for name, item in assembled.items():
        adapter = adapters[name]
        device = adapter.lora_A.device
        values = None if item.dora_values is None else item.dora_values.to(device)
        item = replace(item, down=item.down.to(device), up=item.up.to(device), dora_values=values)
        scale_matches = math.isclose(item.scale, adapter.scale, rel_tol=_SCALE_RTOL)
        up_factor = 1.0 if scale_matches or item.has_alpha else item.scale / adapter.scale
        down, up = _factors_for(path, adapter, item, up_factor)
        if not scale_matches:
            if item.has_alpha:
                raise ValueError(
                    f"{path}: {item.keys[0]}: the file's scale alpha / rank is {item.scale:g} but the network's is "
                    f"{adapter.scale:g}; set alpha to the file's (alpha {item.scale * item.down.shape[0]:g} at rank "
                    f"{item.down.shape[0]}; ss_network_alpha in its metadata is {meta.get('ss_network_alpha', 'absent')})"
                )
            report.rescaled.append(name)
        magnitude = _magnitude_for(path, adapter, item, down, up) if adapter.algo == "dora" else None
        updates.append((adapter, down, up, magnitude))
        if item.slice_ranks or adapter.parts > 1:
            report.qkv_converted.append(name)
    for adapter, down, up, magnitude in updates:
        adapter.lora_A.copy_(down)
        adapter.lora_B.copy_(up)
        if magnitude is not None:
            adapter.magnitude.copy_(magnitude)
        report.loaded.append(adapter.name)
    report.not_in_file = [name for name in network.names if name not in assembled]

    if hint:
        report.warnings.append(hint)
    if MANGLED_STYLE in styles:
        mangled = [key for key in sorted(tensors) if _is_mangled(key, table)]
        report.warnings.append(
            f"{path} was written by a broken converter: {len(mangled)} keys have underscores for dots inside the "
            f"module path after a dotted prefix ({shown(mangled)}); they were read as the dotted modules, but "
            "ComfyUI does not load them ('lora key not loaded'). Re-export the network (style 'comfy') for ComfyUI"
        )
    if dora_ignored:
        report.warnings.append(
            f"{path}: the file has DoRA magnitudes for {len(dora_ignored)} modules that this network adapts with plain "
            "LoRA; they are ignored, so outputs differ from the file's. Build the network with algo='dora' to use them"
        )
    if report.not_in_file:
        report.warnings.append(_not_in_file_warning(path, report.not_in_file))
    if ignored:
        report.warnings.append(f"{path}: {len(ignored)} text-encoder keys ignored (only the diffusion model is adapted)")
    for warning in report.warnings:
        log.warning("%s", warning)
    log.info(
        "loaded %d modules from %s (%s)%s",
        len(report.loaded),
        path,
        ", ".join(styles),
        f"; q/k/v converted on {len(report.qkv_converted)}" if report.qkv_converted else "",
    )
    return report
