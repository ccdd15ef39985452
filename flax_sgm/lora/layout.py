"""Where LoRA files keep their tensors, and which of a model's layers a LoRA's module name means.

Formats, each a key per module `<prefix><module><suffix>`:
  diffusers/peft  `unet.<module>.lora_A.weight` / `.lora_B.weight` (peft's names; `get_peft_model_state_dict`
                  writes them without `unet.`), alpha from `<module>.alpha` keys or peft's LoraConfig in the
                  safetensors metadata (`lora_adapter_metadata`), else alpha = rank as diffusers takes it;
  diffusers, old  `<module>.lora.down.weight` / `.lora.up.weight` (convert_state_dict_to_diffusers), a text
                  encoder's `<module>.lora_linear_layer.down.weight`, and the attention processors of diffusers
                  <= 0.20 (`<attention>.processor.to_q_lora.down.weight` in a UNet, `<self_attn>.to_q_lora...` in a
                  text encoder: to_q/to_k/to_v/to_out name the projection, read as diffusers reads them today);
  kohya           `lora_unet_<module with '_' for '.'>.lora_down.weight` / `.lora_up.weight` and `.alpha`,
                  the module under diffusers' names (SD 1.x) or sgm's (`input_blocks_4_1_...`, SDXL).
Module names come from the model's conversion tables (sgm's names, and diffusers' through the family's KeyLayout):
no second name map.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import NamedTuple

from flax import nnx

from flax_sgm.checkpoints.convert import KeyLayout, conversion_table

# suffix -> (role, format)
SUFFIXES = {
    ".lora_A.weight": ("down", "diffusers"),
    ".lora_B.weight": ("up", "diffusers"),
    ".lora.down.weight": ("down", "diffusers-old"),
    ".lora.up.weight": ("up", "diffusers-old"),
    ".lora_linear_layer.down.weight": ("down", "diffusers-old"),
    ".lora_linear_layer.up.weight": ("up", "diffusers-old"),
    ".lora_down.weight": ("down", "kohya"),
    ".lora_up.weight": ("up", "kohya"),
    ".alpha": ("alpha", None),
}
# diffusers <= 0.20's attention processors: the projection is in the key (diffusers' UNET_TO_DIFFUSERS and
# DIFFUSERS_OLD_TO_PEFT say which layer each names in a UNet and in a CLIP text tower).
PROCESSOR = re.compile(
    r"(?P<module>.+?)(?:\.processor)?\.(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight")
PROCESSOR_PROJECTIONS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# A file's parts (the models of a pipeline) by their modules' prefixes: (diffusers', kohya's...); the first of
# each kind is what save_lora writes.
PARTS = {
    "unet": ("unet.", "lora_unet_"),
    "text_encoder": ("text_encoder.", "lora_te1_", "lora_te_"),
    "text_encoder_2": ("text_encoder_2.", "lora_te2_"),
}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: peft's LoraConfig as JSON, keys `unet.<field>`

# What is not plain LoRA (LyCORIS and peft's variants), by the name of a key's part after its module: the
# name's start, or (exact) the whole part -> the kind.
OTHER_KINDS = {
    "hada_w": "LyCORIS LoHa",
    "hada_t": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "oft_": "LyCORIS OFT",
    "lora_mid": "LyCORIS LoCon (Tucker)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "ia3_l": "(IA)3",
}
OTHER_EXACT = {"diff": "LyCORIS full (diff)", "diff_b": "LyCORIS full (diff)", "on_input": "LyCORIS (IA)3",
               "b_norm": "LyCORIS norm", "w_norm": "LyCORIS norm"}
class Entry(NamedTuple):
    """One adapted module of a file: its name as written (format prefix removed) and its keys."""

    module: str
    down: str | None
    up: str | None
    alpha: str | None
    twice: tuple[str, ...] = ()  # keys naming a role of this module a key before them named (two spellings)


def kind_of(keys: Iterable[str]) -> tuple[str, str] | None:
    """(the kind, an example key) when a file holds something other than plain LoRA; None for plain LoRA."""
    for key in keys:
        for part in key.split(".")[1:]:
            kind = OTHER_EXACT.get(part) or next((k for start, k in OTHER_KINDS.items() if part.startswith(start)), None)
            if kind is not None:
                return kind, key
    return None


def is_lora(keys: Iterable[str]) -> bool:
    """Whether a file's keys are a LoRA's (plain, or a kind load_lora refuses by name)."""
    keys = list(keys)
    return bool(keys) and (kind_of(keys) is not None or all(_parse(k) is not None for k in keys))


def _parse(key: str) -> tuple[str, str, str | None] | None:
    """(module, role, format) of a LoRA file's key; None for a key that is no LoRA tensor."""
    for suffix, (role, fmt) in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role, fmt
    match = PROCESSOR.fullmatch(key)
    if match is None:
        return None
    # A text encoder's part, or (bare) its attention's name: CLIP's `self_attn`, a UNet's `attn1`/`attn2`.
    text = part_of(key) in ("text_encoder", "text_encoder_2") or match["module"].endswith("self_attn")
    tower = "text" if text else "unet"
    module = match["module"] + "." + PROCESSOR_PROJECTIONS[tower][match["projection"]]
    return module, match["role"], "diffusers-processor"


def entries(keys: Iterable[str]) -> tuple[str, dict[str, Entry], list[str]]:
    """(format, {module: Entry}, keys that are not LoRA tensors) of a file's keys."""
    parts: dict[str, dict[str, str]] = {}
    twice: dict[str, list[str]] = {}
    formats, stray = set(), []
    for key in keys:
        parsed = _parse(key)
        if parsed is None:
            stray.append(key)
            continue
        module, role, fmt = parsed
        if role in parts.setdefault(module, {}):
            twice.setdefault(module, []).append(key)
        else:
            parts[module][role] = key
        if fmt:
            formats.add(fmt)
    older = [name for fmt, name in (("diffusers-old", "lora.down/up names"),
                                    ("diffusers-processor", "attention processor names")) if fmt in formats]
    if "kohya" in formats:
        fmt = "kohya"
    elif "diffusers" in formats or older:
        fmt = "diffusers" + (f" ({', '.join(older)})" if older else "")
    else:
        fmt = "unknown"
    found = {m: Entry(m, p.get("down"), p.get("up"), p.get("alpha"), tuple(twice.get(m, ()))) for m, p in parts.items()}
    return fmt, found, stray


def part_of(module: str) -> str | None:
    """The part of the file a module belongs to by its prefix (None: no part's prefix, e.g. peft's bare names)."""
    best = max(((p, name) for name, prefixes in PARTS.items() for p in prefixes if module.startswith(p)),
               key=lambda pair: len(pair[0]), default=None)
    return best[1] if best else None


def strip_prefix(module: str) -> str:
    """The module's name without its part's prefix (`unet.`, `lora_unet_`, `lora_te1_`, ...)."""
    part = part_of(module)
    if part is None:
        return module
    return module[len(max((p for p in PARTS[part] if module.startswith(p)), key=len)):]


def part_for(model: nnx.Module) -> str:
    """The part of a LoRA file a model takes by default: a UNet's, or the (first) text encoder's."""
    from flax_sgm.unet.model import UNetModel

    return "unet" if isinstance(model, UNetModel) else "text_encoder"


def peft_config(metadata: dict | None, part: str = "unet") -> dict:
    """A part's peft LoraConfig fields from a safetensors file's metadata ({} when it has none)."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    packed, prefix = json.loads(raw), PARTS[part][0]
    return {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}


def model_layouts(model: nnx.Module) -> list[KeyLayout | None]:
    """The key layouts a LoRA may name `model`'s modules in: its own (sgm's, None) and diffusers'."""
    from flax_sgm.text.layout import TRANSFORMERS
    from flax_sgm.text.model import CLIPTextModel
    from flax_sgm.unet.layout import diffusers_layout
    from flax_sgm.unet.model import UNetModel

    if isinstance(model, UNetModel):
        config = model.config
        vectors = ("add_embedding", "class_embedding") if config.adm_in_channels else (None,)
        return [None] + [diffusers_layout(config, v) for v in vectors]
    if isinstance(model, CLIPTextModel):  # transformers 5's names, and transformers 4's (`text_model.`, diffusers')
        return [None, TRANSFORMERS]
    raise TypeError(f"load_lora: LoRA on a {type(model).__name__} is not supported (a UNetModel or CLIPTextModel is)")


def module_index(model: nnx.Module) -> tuple[dict[str, tuple], dict[str, str]]:
    """({module name: the layer's path in `model`}, {diffusers' name: sgm's name}) for every Linear and Conv,
    under sgm's and diffusers' names and their kohya spellings ('.' as '_'), read off the conversion tables."""
    index: dict[str, tuple] = {}
    diffusers_names: dict[str, str] = {}
    sgm: dict[tuple, str] = {}
    for layout in model_layouts(model):
        for row in conversion_table(model, layout=layout):
            if row.flax_path[-1] != "kernel" or not row.torch_key.endswith(".weight"):
                continue
            name, path = row.torch_key[: -len(".weight")], row.flax_path[:-1]
            if layout is None:
                sgm[path] = name
            elif layout.name in ("diffusers", "transformers"):
                diffusers_names.setdefault(name, sgm[path])
            index.setdefault(name, path)
            index.setdefault(name.replace(".", "_"), path)
    return index, diffusers_names


def diffusers_name_of(model: nnx.Module) -> dict[tuple, str]:
    """{layer path: diffusers' module name} of `model`'s Linears and Convs (the first diffusers layout)."""
    layout = model_layouts(model)[1]
    return {row.flax_path[:-1]: row.torch_key[: -len(".weight")] for row in conversion_table(model, layout=layout)
            if row.flax_path[-1] == "kernel"}


def sgm_name_of(model: nnx.Module) -> dict[tuple, str]:
    return {row.flax_path[:-1]: row.torch_key[: -len(".weight")] for row in conversion_table(model)
            if row.flax_path[-1] == "kernel"}
