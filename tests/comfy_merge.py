"""Test-side transcription of stock ComfyUI's LoRA / DoRA loading and merge.

* `comfy_key_map`: comfy/lora.py `model_lora_keys_unet` for our models: the generic
  forms (`diffusion_model.<path>`, `lora_unet_<path_>`) plus, for Z-Image (Lumina2),
  the diffusers names from comfy/utils.py `z_image_to_diffusers` under the
  `diffusion_model.` / `transformer.` / bare / `lycoris_` prefixes, and for Flux.1 and
  Flux.2 (model_base.Flux2 subclasses Flux, so the same branch runs) those of
  `flux_to_diffusers` under `transformer.` / `lycoris_` / `lora_transformer_` / bare,
  plus `<path>.linear1_qkv`; q / k / v map to row slices of the fused qkv. Transcribed
  from the 2026 ComfyUI source (after its Flux.2 support; 0.3.64 predates it). For
  Qwen-Image (model_base.QwenImage), whose module names are diffusers', no conversion
  table: every `diffusion_model.<path>.weight` is also mapped as bare `<path>`,
  `transformer.<path>` and `lycoris_<path_>` (0.3.64; neither `base_model.model.` nor
  `lora_transformer_`).
* `comfy_lora_patches`: comfy/lora.py `load_lora` + `LoRAAdapter.load` (the up / down
  key names it tries, in order; `alpha`, `dora_scale`), then `LoHaAdapter.load` and
  `LoKrAdapter.load` (comfy/weight_adapter/loha.py, lokr.py: `hada_*` / `lokr_*` keys),
  reporting keys not loaded.
* LoHa / LoKr `calculate_weight`: LoHa dW = (w1_a @ w1_b) * (w2_a @ w2_b) (Tucker: each
  factor rebuilt by einsum with hada_t1 / hada_t2), scale alpha / w1_b.shape[0]; LoKr
  dW = kron(w1, w2) with w1 = w1_a @ w1_b and w2 = w2_a @ w2_b (Tucker: lokr_t2) where not
  given whole, w1 unsqueezed to 4-D when w2 is, and scale alpha / rank only where a
  factor is decomposed (the rank of the last decomposed one), 1 otherwise.
* `comfy_merge` / `comfy_patched_weights`: `LoRAAdapter.calculate_weight` +
  `weight_decompose`, as quoted in the ComfyUI notes ("DoRA at load"): the base weight
  is copied to float32, each patch applied in order (on `weight.narrow` for a slice),
  then the strength interpolates W0 + s * (W_patched - W0).

Kept independent of the engine on purpose: the engine is checked against this, never
the other way round.
"""

from __future__ import annotations

import torch

# LoRAAdapter.load: (up, down) name templates, tried in this order.
_UP_DOWN_NAMES = (
    ("{}.lora_up.weight", "{}.lora_down.weight"),
    ("{}_lora.up.weight", "{}_lora.down.weight"),
    ("{}.lora_B.weight", "{}.lora_A.weight"),
    ("{}.lora.up.weight", "{}.lora.down.weight"),
    ("{}.lora_B", "{}.lora_A"),
    ("{}.lora_linear_layer.up.weight", "{}.lora_linear_layer.down.weight"),
    ("{}.lora_B.default.weight", "{}.lora_A.default.weight"),
)


def z_image_to_diffusers(n_layers: int, dim: int, n_refiner_layers: int, output_prefix: str = "") -> dict:
    """comfy/utils.py z_image_to_diffusers: diffusers key -> ComfyUI key or (key, (dim, offset, length))."""
    key_map = {}

    def add_block_keys(prefix_from: str, prefix_to: str, has_adaln: bool = True) -> None:
        for end in ("weight", "bias"):
            k = f"{prefix_from}.attention."
            qkv = f"{prefix_to}.attention.qkv.{end}"
            key_map[f"{k}to_q.{end}"] = (qkv, (0, 0, dim))
            key_map[f"{k}to_k.{end}"] = (qkv, (0, dim, dim))
            key_map[f"{k}to_v.{end}"] = (qkv, (0, dim * 2, dim))
        block_map = {
            "attention.norm_q.weight": "attention.q_norm.weight",
            "attention.norm_k.weight": "attention.k_norm.weight",
            "attention.to_out.0.weight": "attention.out.weight",
            "attention.to_out.0.bias": "attention.out.bias",
            "attention_norm1.weight": "attention_norm1.weight",
            "attention_norm2.weight": "attention_norm2.weight",
            "feed_forward.w1.weight": "feed_forward.w1.weight",
            "feed_forward.w2.weight": "feed_forward.w2.weight",
            "feed_forward.w3.weight": "feed_forward.w3.weight",
            "ffn_norm1.weight": "ffn_norm1.weight",
            "ffn_norm2.weight": "ffn_norm2.weight",
        }
        if has_adaln:
            block_map["adaLN_modulation.0.weight"] = "adaLN_modulation.0.weight"
            block_map["adaLN_modulation.0.bias"] = "adaLN_modulation.0.bias"
        for k, v in block_map.items():
            key_map[f"{prefix_from}.{k}"] = f"{prefix_to}.{v}"

    for i in range(n_layers):
        add_block_keys(f"layers.{i}", f"{output_prefix}layers.{i}")
    for i in range(n_refiner_layers):
        add_block_keys(f"context_refiner.{i}", f"{output_prefix}context_refiner.{i}")
    for i in range(n_refiner_layers):
        add_block_keys(f"noise_refiner.{i}", f"{output_prefix}noise_refiner.{i}")
    basic = [
        ("final_layer.linear.weight", "all_final_layer.2-1.linear.weight"),
        ("final_layer.linear.bias", "all_final_layer.2-1.linear.bias"),
        ("final_layer.adaLN_modulation.1.weight", "all_final_layer.2-1.adaLN_modulation.1.weight"),
        ("final_layer.adaLN_modulation.1.bias", "all_final_layer.2-1.adaLN_modulation.1.bias"),
        ("x_embedder.weight", "all_x_embedder.2-1.weight"),
        ("x_embedder.bias", "all_x_embedder.2-1.bias"),
    ]
    for comfy, diffusers in basic:
        key_map[diffusers] = f"{output_prefix}{comfy}"
    return key_map


def flux_to_diffusers(depth: int, depth_single_blocks: int, hidden_size: int, output_prefix: str = "") -> dict:
    """comfy/utils.py flux_to_diffusers, the block `.weight` entries and the Linear ones of MAP_BASIC.

    One table for Flux.1 and Flux.2: the Flux.2 names (`ff.linear_in` / `ff.linear_out`,
    `attn.to_qkv_mlp_proj`, `attn.to_out`) sit beside the Flux.1 ones. `proj_mlp` keeps
    ComfyUI's Flux.1 slice (3h, 4h) whatever the model (wrong rows for Flux.2's linear1,
    whose MLP part is 6h, but no Flux.2 file uses that name).
    """
    key_map = {}
    h = hidden_size
    for index in range(depth):
        prefix_from, prefix_to = f"transformer_blocks.{index}", f"{output_prefix}double_blocks.{index}"
        qkv = f"{prefix_to}.img_attn.qkv.weight"
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            key_map[f"{prefix_from}.attn.{part}.weight"] = (qkv, (0, i * h, h))
        qkv = f"{prefix_to}.txt_attn.qkv.weight"
        for i, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            key_map[f"{prefix_from}.attn.{part}.weight"] = (qkv, (0, i * h, h))
        block_map = {
            "attn.to_out.0.weight": "img_attn.proj.weight",
            "norm1.linear.weight": "img_mod.lin.weight",
            "norm1_context.linear.weight": "txt_mod.lin.weight",
            "attn.to_add_out.weight": "txt_attn.proj.weight",
            "ff.net.0.proj.weight": "img_mlp.0.weight",
            "ff.net.2.weight": "img_mlp.2.weight",
            "ff_context.net.0.proj.weight": "txt_mlp.0.weight",
            "ff_context.net.2.weight": "txt_mlp.2.weight",
            "ff.linear_in.weight": "img_mlp.0.weight",  # Flux.2 (ComfyUI: "LyCoris LoKr")
            "ff.linear_out.weight": "img_mlp.2.weight",
            "ff_context.linear_in.weight": "txt_mlp.0.weight",
            "ff_context.linear_out.weight": "txt_mlp.2.weight",
        }
        for k, v in block_map.items():
            key_map[f"{prefix_from}.{k}"] = f"{prefix_to}.{v}"
    for index in range(depth_single_blocks):
        prefix_from, prefix_to = f"single_transformer_blocks.{index}", f"{output_prefix}single_blocks.{index}"
        qkv = f"{prefix_to}.linear1.weight"
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            key_map[f"{prefix_from}.attn.{part}.weight"] = (qkv, (0, i * h, h))
        key_map[f"{prefix_from}.proj_mlp.weight"] = (qkv, (0, h * 3, h * 4))
        block_map = {
            "norm.linear.weight": "modulation.lin.weight",
            "proj_out.weight": "linear2.weight",
            "attn.to_qkv_mlp_proj.weight": "linear1.weight",  # Flux 2
            "attn.to_out.weight": "linear2.weight",  # Flux 2
        }
        for k, v in block_map.items():
            key_map[f"{prefix_from}.{k}"] = f"{prefix_to}.{v}"
    basic = {
        "proj_out.weight": "final_layer.linear.weight",
        "x_embedder.weight": "img_in.weight",
        "context_embedder.weight": "txt_in.weight",
        "time_text_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
        "time_text_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
        "time_text_embed.text_embedder.linear_1.weight": "vector_in.in_layer.weight",
        "time_text_embed.text_embedder.linear_2.weight": "vector_in.out_layer.weight",
        "time_text_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
        "time_text_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
    }
    for k, v in basic.items():
        key_map[k] = f"{output_prefix}{v}"
    return key_map


def comfy_key_map(model_keys, zimage: dict | None = None, flux: dict | None = None, qwen_image: bool = False) -> dict:
    """LoRA module key -> model weight key (or (weight key, (dim, offset, length)) for a slice).

    model_keys: the model's state-dict keys with the `diffusion_model.` prefix.
    zimage: {"n_layers", "dim", "n_refiner_layers"} to add Z-Image's diffusers names;
    flux: {"depth", "depth_single_blocks", "hidden_size"} to add Flux.1's / Flux.2's;
    qwen_image: add the QwenImage branch's forms of every weight.
    """
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = k
            key_map[k[: -len(".weight")]] = k
    if zimage is not None:
        diffusers_keys = z_image_to_diffusers(output_prefix="diffusion_model.", **zimage)
        for k, to in diffusers_keys.items():
            if k.endswith(".weight"):
                key_lora = k[: -len(".weight")]
                key_map[f"diffusion_model.{key_lora}"] = to
                key_map[f"transformer.{key_lora}"] = to
                key_map[f"lycoris_{key_lora.replace('.', '_')}"] = to
                key_map[key_lora] = to
    if flux is not None:
        for k, to in flux_to_diffusers(output_prefix="diffusion_model.", **flux).items():
            key_lora = k[: -len(".weight")]
            key_map[f"transformer.{key_lora}"] = to  # SimpleTuner / diffusers
            key_map[f"lycoris_{key_lora.replace('.', '_')}"] = to
            key_map[f"lora_transformer_{key_lora.replace('.', '_')}"] = to  # OneTrainer
            key_map[key_lora] = to  # DiffSynth
        for k in model_keys:
            if k.endswith(".linear1.weight"):
                key_map[k.replace(".linear1.weight", ".linear1_qkv")] = (k, (0, 0, flux["hidden_size"] * 3))
    if qwen_image:
        for k in model_keys:
            if k.startswith("diffusion_model.") and k.endswith(".weight"):
                key_lora = k[len("diffusion_model.") : -len(".weight")]
                key_map[key_lora] = k  # QwenImage LoRA format (DiffSynth)
                key_map[f"transformer.{key_lora}"] = k
                key_map[f"lycoris_{key_lora.replace('.', '_')}"] = k  # SimpleTuner lycoris
    return key_map


def _lora_diff(tensors: dict, x: str, alpha: float | None):
    """LoRAAdapter: (diff, scale, keys read) or None."""
    for up_name, down_name in _UP_DOWN_NAMES:
        up_key, down_key = up_name.format(x), down_name.format(x)
        if up_key in tensors:
            mat1 = tensors[up_key].float()  # up   [out, r]
            mat2 = tensors[down_key].float()  # down [r, in]
            diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1))
            return diff, (alpha / mat2.shape[0] if alpha is not None else 1.0), [up_key, down_key]
    return None


def _loha_diff(tensors: dict, x: str, alpha: float | None):
    """LoHaAdapter: (diff, scale, keys read) or None."""
    names = [f"{x}.hada_w1_a", f"{x}.hada_w1_b", f"{x}.hada_w2_a", f"{x}.hada_w2_b"]
    if names[0] not in tensors:
        return None
    w1a, w1b, w2a, w2b = (tensors[n].float() for n in names)
    scale = alpha / w1b.shape[0] if alpha is not None else 1.0
    if f"{x}.hada_t1" in tensors:
        t1, t2 = tensors[f"{x}.hada_t1"].float(), tensors[f"{x}.hada_t2"].float()
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        return m1 * m2, scale, names + [f"{x}.hada_t1", f"{x}.hada_t2"]
    return torch.mm(w1a, w1b) * torch.mm(w2a, w2b), scale, names


def _lokr_diff(tensors: dict, x: str, alpha: float | None):
    """LoKrAdapter: (diff, scale, keys read) or None."""
    names = {n: f"{x}.lokr_{n}" for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")}
    got = {n: tensors[k].float() for n, k in names.items() if k in tensors}
    if not any(n in got for n in ("w1", "w2", "w1_a", "w2_a")):
        return None
    dim = None
    w1 = got.get("w1")
    if w1 is None:
        dim = got["w1_b"].shape[0]
        w1 = torch.mm(got["w1_a"], got["w1_b"])
    w2 = got.get("w2")
    if w2 is None:
        dim = got["w2_b"].shape[0]
        if "t2" in got:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", got["t2"], got["w2_b"], got["w2_a"])
        else:
            w2 = torch.mm(got["w2_a"], got["w2_b"])
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2), scale, [names[n] for n in got]


def comfy_lora_patches(tensors: dict[str, torch.Tensor], key_map: dict) -> tuple[list, list[str]]:
    """[(target, diff, scale, dora_scale | None)] in key-map order, and the keys not loaded.

    diff is the adapter's weight change at scale 1 (before the reshape to the weight),
    scale ComfyUI's alpha / rank (1 where it reads none)."""
    patches, loaded = [], set()
    for x, to in key_map.items():
        alpha_key, dora_key = f"{x}.alpha", f"{x}.dora_scale"
        alpha = tensors[alpha_key].item() if alpha_key in tensors else None
        for adapter in (_lora_diff, _loha_diff, _lokr_diff):  # comfy.weight_adapter.adapters order
            found = adapter(tensors, x, alpha)
            if found is not None:
                diff, scale, keys = found
                loaded.update(k for k in (*keys, alpha_key, dora_key) if k in tensors)
                patches.append((to, diff, scale, tensors.get(dora_key)))
                break
    return patches, sorted(set(tensors) - loaded)


def _apply(weight: torch.Tensor, diff: torch.Tensor, alpha: float, dora_scale, strength: float) -> torch.Tensor:
    """`calculate_weight` on one (float32) weight, from the adapter's diff and scale; returns the patched weight."""
    lora_diff = diff.reshape(weight.shape)
    if dora_scale is None:
        return weight + (strength * alpha) * lora_diff
    # weight_decompose(dora_scale, weight, lora_diff, alpha, strength, intermediate_dtype, function)
    dora_scale = dora_scale.float()
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff.type(weight.dtype)
    wd_on_output_axis = dora_scale.shape[0] == weight_calc.shape[0]
    if wd_on_output_axis:
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (
            weight_calc.transpose(0, 1)
            .reshape(weight_calc.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1))
            .transpose(0, 1)
        )
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        return weight + strength * weight_calc
    return weight_calc


def comfy_patched_weights(model_weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key_map: dict, strength: float):
    """Float32 weights after ComfyUI applies the LoRA file `tensors` (only the patched keys), and keys not loaded."""
    patches, not_loaded = comfy_lora_patches(tensors, key_map)
    patched: dict[str, torch.Tensor] = {}
    for to, diff, alpha, dora_scale in patches:
        key, offset = (to, None) if isinstance(to, str) else to
        weight = patched.get(key)
        if weight is None:
            weight = model_weights[key].float().clone()
            patched[key] = weight
        view = weight if offset is None else weight.narrow(*offset)
        view.copy_(_apply(view.clone(), diff, alpha, dora_scale, strength))
    return patched, not_loaded


def comfy_merge(weight: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str, strength: float) -> torch.Tensor:
    """Merged float32 weight for module key `prefix` (e.g. 'diffusion_model.layers.0.attention.qkv')."""
    patches, _ = comfy_lora_patches(tensors, {prefix: prefix})
    if not patches:
        raise KeyError(f"no LoRA / LoHa / LoKr keys for {prefix}")
    _, diff, alpha, dora_scale = patches[0]
    return _apply(weight.float().clone(), diff, alpha, dora_scale, strength)
