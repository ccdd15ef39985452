"""`save_lora`: a model's unfused adapters as a file diffusers' load_lora_weights reads (and kohya tools).

diffusers: `unet.<module>.lora_A.weight` / `.lora_B.weight` under diffusers' module names, peft's LoraConfig in
the safetensors metadata (`lora_adapter_metadata`, as save_lora_weights writes it); kohya:
`lora_unet_<module with '_'>.lora_down.weight` / `.lora_up.weight` / `.alpha`, under the names kohya's sd-scripts
write: sgm's for a UNet with a vector y (SDXL: `lora_unet_input_blocks_4_1_...`), diffusers' for SD 1.x and 2.x
(`lora_unet_down_blocks_0_...`) and for the text encoders (`lora_te1_text_model_encoder_...`). The alpha written is
the adapter's whole multiplier times its rank, so the file reproduces the adapter as it acts (its load-time scale
included).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from flax_sgm.lora.adapters import adapters_of
from flax_sgm.lora.layout import METADATA_KEY, PARTS, diffusers_name_of, part_for, sgm_name_of
from flax_sgm.lora.load import _at
from flax_sgm.nn.primitives import Conv
from flax_sgm.unet.model import UNetModel

FORMATS = ("diffusers", "kohya")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name in a directory


def lora_state_dict(model: nnx.Module, *, format: str = "diffusers", name: str | None = None,
                    part: str | None = None) -> tuple[dict, dict]:
    """(tensors in torch layouts, safetensors metadata) of the adapter `name` (the only one when None), as the file's
    `part` (default: the model's kind's; "text_encoder_2" for an SDXL pipeline's second text encoder)."""
    if format not in FORMATS:
        raise ValueError(f"save_lora: format must be one of {FORMATS}; got {format!r}")
    held = adapters_of(model)
    if name is None:
        if len(held) != 1:
            raise ValueError(f"save_lora: the model holds adapters {sorted(held) or 'none'}; pass name= (one of them)")
        name = next(iter(held))
    if name not in held:
        raise ValueError(f"save_lora: no adapter {name!r} on the model (it holds {sorted(held)})")
    part = part_for(model) if part is None else part
    if part not in PARTS:
        raise ValueError(f"save_lora: part must be one of {', '.join(PARTS)}; got {part!r}")
    diffusers_prefix, kohya_prefix = PARTS[part][:2]
    sgm_names = format == "kohya" and isinstance(model, UNetModel) and model.config.num_classes == "sequential"
    names = sgm_name_of(model) if sgm_names else diffusers_name_of(model)
    tensors, ranks, alphas = {}, {}, {}
    for path, adapter in held[name]:
        module, layer = names[path], _at(model, path)
        down, up = np.asarray(adapter.down[...]), np.asarray(adapter.up[...])
        if down.ndim == 4:
            a = down.transpose(3, 2, 0, 1)  # [kh, kw, in, r] -> torch [r, in, kh, kw]
        else:
            a = down.T  # [in, r] -> torch [r, in]
            a = a[:, :, None, None] if isinstance(layer, Conv) else a  # a 1x1 conv's: [r, in, 1, 1]
        b = up.T[:, :, None, None] if isinstance(layer, Conv) else up.T  # [r, out] -> torch [out, r](, 1, 1)
        alpha = adapter.multiplier * adapter.rank
        ranks[module], alphas[module] = adapter.rank, alpha
        if format == "kohya":
            stem = kohya_prefix + module.replace(".", "_")
            tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = a, b
            tensors[stem + ".alpha"] = np.asarray(alpha, np.float32)
        else:
            tensors[f"{diffusers_prefix}{module}.lora_A.weight"], tensors[f"{diffusers_prefix}{module}.lora_B.weight"] = a, b
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {"format": "pt"}
    if format == "diffusers":
        r, alpha = max(set(ranks.values()), key=list(ranks.values()).count), None
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "use_rslora": False, "use_dora": False,
                  "lora_bias": False, "rank_pattern": {m: v for m, v in ranks.items() if v != r},
                  "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha}}
        metadata[METADATA_KEY] = json.dumps({diffusers_prefix + k: v for k, v in config.items()}, indent=2, sort_keys=True)
    return tensors, metadata


def save_lora(model: nnx.Module, path, *, format: str = "diffusers", name: str | None = None, part: str | None = None) -> Path:
    """Write the adapter `name` (the only one when None) to `path` (a .safetensors file, or a directory: its
    pytorch_lora_weights.safetensors). Returns the file written."""
    from safetensors.numpy import save_file

    tensors, metadata = lora_state_dict(model, format=format, name=name, part=part)
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHT_NAME
    save_file(tensors, str(path), metadata=metadata)
    return path
