"""`load_lora`: a LoRA file users hold, applied strictly to a Flax UNet, a CLIP text encoder or a Pipeline.

Every LoRA module of the file is placed on a layer of the model, its shapes checked, before anything changes:
else one CheckpointError names the modules that are not (and the model is untouched). Plain LoRA on Linear and
Conv layers (1x1 and 3x3); LyCORIS kinds, DoRA and another model's part are refused by name.
"""

from __future__ import annotations

import math
import re
import numbers
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_sgm.attention.layout import listing
from flax_sgm.checkpoints.sources import open_source
from flax_sgm.errors import CheckpointError
from flax_sgm.lora import adapters as lora_adapters
from flax_sgm.lora.adapters import Adapter
from flax_sgm.lora.layout import PARTS, entries, kind_of, module_index, part_for, part_of, peft_config, strip_prefix
from flax_sgm.nn.primitives import Conv
from flax_sgm.pipeline.pipeline import Pipeline

# peft LoraConfig fields that change the maths and are not honoured: refused by name.
REFUSED_PEFT = {"use_dora": False, "lora_bias": False}


class Placed(NamedTuple):
    """One checked LoRA module: the layer it adapts, its down [in, r] / [kh, kw, in, r] and up [r, out], alpha."""

    path: tuple
    down: np.ndarray
    up: np.ndarray
    alpha: float


def check_scale(scale, who: str = "load_lora") -> float:
    """A LoRA weight as a float: a real number, or a concrete 0-d array; one line naming `who` otherwise."""
    if isinstance(scale, (np.ndarray, np.generic, jax.Array)) and np.shape(scale) == () and not isinstance(
            scale, jax.core.Tracer):
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise CheckpointError(f"{who}: scale must be a finite number; got {scale!r}")
    return float(scale)


def describe(model) -> str:
    """'UNetModel (sd15)' (a released model's blocks) or the model's class."""
    from flax_sgm.unet.config import PRESETS, UNetConfig
    from flax_sgm.unet.layout import _blocks

    config = getattr(model, "config", None)
    name = None
    if isinstance(config, UNetConfig):
        name = next((n for n, p in PRESETS.items() if _blocks(p) == _blocks(config)), None)
    return type(model).__name__ + (f" ({name})" if name else "")


def read_lora(model: nnx.Module, path, *, part: str | None = None,
              ignore_other_parts: bool = False) -> tuple[str, list[Placed], dict]:
    """(format, the checked modules, peft config) of the `part` of a LoRA file (default: the model's, part_for) for
    `model`; CheckpointError in one line. `ignore_other_parts`: leave the file's other parts out (another model's
    modules) instead of refusing the file."""
    part = part_for(model) if part is None else part
    if part not in PARTS:
        raise CheckpointError(f"load_lora: part must be one of {', '.join(PARTS)}; got {part!r}")
    path = Path(path)
    metadata = {}
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                metadata = f.metadata() or {}
        except Exception:  # not a safetensors file: open_source says what it is
            metadata = {}
    with open_source(path) as source:
        keys = list(source.infos)
        other = kind_of(keys)
        if other is not None:
            raise CheckpointError(f"{path}: a {other[0]} file ({other[1]}); load_lora reads plain LoRA only")
        fmt, found, stray = entries(keys)
        if not found:
            raise CheckpointError(f"{path}: holds no LoRA keys (.lora_A/.lora_B, .lora.down/.lora.up, "
                                  ".lora_down/.lora_up, .to_q_lora.down/.up, .lora_linear_layer.down/.up): "
                                  f"{listing(keys, 4)}")
        if stray:
            raise CheckpointError(f"{path}: {len(stray)} keys are not LoRA tensors: {listing(sorted(stray), 4)}")
        config = peft_config(metadata, part)
        for field, default in REFUSED_PEFT.items():
            if config.get(field, default) != default:
                raise CheckpointError(f"{path}: its LoraConfig has {field}={config[field]!r}; load_lora reads plain LoRA only")
        index, _ = module_index(model)
        others = sorted(m for m in found if part_of(m) not in (part, None))
        if others and not ignore_other_parts:
            kinds = ", ".join(sorted({part_of(m) for m in others}))
            raise CheckpointError(f"{path}: {len(others)} modules are another model's ({kinds}: {listing(others, 2)}); "
                                  f"load_lora applies the {part} part to a {describe(model)} "
                                  "(ignore_other_parts=True applies it alone)")
        found = {m: e for m, e in found.items() if part_of(m) in (part, None)}
        if not found:
            raise CheckpointError(f"{path}: holds no {part} modules")
        unplaced = sorted(m for m in found if strip_prefix(m) not in index)
        if unplaced:
            raise CheckpointError(f"{path}: {len(unplaced)} of {len(found)} LoRA modules name no layer of this "
                                  f"{describe(model)}: {listing(unplaced, 3)}")
        problems, placed, by_layer = [], [], {}
        for module, entry in sorted(found.items()):
            if entry.twice:  # one module under two spellings: which the file means is not said
                problems.append(f"{module} is named twice ({listing(entry.twice, 2)} again)")
                continue
            other = by_layer.setdefault(index[strip_prefix(module)], module)
            if other != module:  # one layer under two names (sgm's and diffusers'): applied twice otherwise
                problems.append(f"{module} adapts the layer {other} adapts")
                continue
            if entry.down is None or entry.up is None:
                problems.append(f"{module} has no {'lora_down/lora_A' if entry.down is None else 'lora_up/lora_B'}")
                continue
            layer_path = index[strip_prefix(module)]
            layer = _at(model, layer_path)
            alpha = _alpha(source, entry, strip_prefix(module), config, source.infos[entry.down].shape[0], problems)
            one = _check(module, layer, source.read(entry.down), source.read(entry.up), problems)
            if one is not None and alpha is not None:
                placed.append(Placed(layer_path, *one, alpha))
        if problems:
            raise CheckpointError(f"{path}: {len(problems)} LoRA modules do not fit this {describe(model)}: "
                                  f"{listing(problems, 3)}")
    return fmt, placed, config


def _at(model, path):
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _alpha(source, entry, module: str, config: dict, rank: int, problems: list) -> float | None:
    """The module's alpha: its `.alpha` key, else peft's alpha_pattern / lora_alpha, else its rank (diffusers')."""
    if entry.alpha is not None:
        value = np.asarray(source.read(entry.alpha))
        if value.size != 1 or not np.issubdtype(value.dtype, np.number):
            problems.append(f"{entry.alpha} is not one number (shape {list(value.shape)})")
            return None
        return float(value.reshape(()))
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft's rule: a regex over the module's name
            return float(alpha)
    if "lora_alpha" in config:
        return float(config["lora_alpha"])
    return float(rank)


def _check(module: str, layer, down: np.ndarray, up: np.ndarray, problems: list):
    """(down, up) in the layer's layouts, or None with the problem listed."""
    for name, value in (("down", down), ("up", up)):
        if not np.issubdtype(value.dtype, np.floating):
            problems.append(f"{module} {name} is {value.dtype}, not a float")
            return None
    kernel = tuple(layer.kernel.shape)  # [in, out] or [kh, kw, in, out]
    conv = isinstance(layer, Conv) and kernel[:2] != (1, 1)
    if not conv:  # a Linear or a 1x1 conv: torch [r, in] / [out, r], or with trailing 1x1
        down = down.reshape(down.shape[:2]) if down.ndim == 4 and down.shape[2:] == (1, 1) else down
        up = up.reshape(up.shape[:2]) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
    else:
        up = up.reshape(up.shape[:2]) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
    if down.ndim not in (2, 4) or up.ndim != 2:
        problems.append(f"{module}: down {list(down.shape)} / up {list(up.shape)} are not a LoRA's shapes")
        return None
    if down.shape[0] != up.shape[1]:
        problems.append(f"{module}: rank mismatch, down has rank {down.shape[0]} ({list(down.shape)}), "
                        f"up has {up.shape[1]} ({list(up.shape)})")
        return None
    in_features, out_features = kernel[-2], kernel[-1]
    want_down = [down.shape[0], in_features, *kernel[:2]] if conv else [down.shape[0], in_features]
    if list(down.shape) != want_down or up.shape[0] != out_features:
        problems.append(f"{module}: down {list(down.shape)} / up {list(up.shape)} do not fit its layer "
                        f"(in {in_features}, out {out_features}{', kernel ' + 'x'.join(map(str, kernel[:2])) if conv else ''})")
        return None
    flax_down = down.transpose(2, 3, 1, 0) if conv else down.T  # torch [r, in(, kh, kw)] -> [in, r] / [kh, kw, in, r]
    return np.ascontiguousarray(flax_down), np.ascontiguousarray(up.T)  # torch [out, r] -> [r, out]


def load_lora(model: nnx.Module, path, *, scale: float = 1.0, fuse: bool = True, name: str | None = None,
              part: str | None = None, ignore_other_parts: bool = False):
    """Apply the LoRA file at `path` to `model` (a UNetModel, a CLIPTextModel, or a Pipeline: each part of the file
    on its model, every part checked before any is applied) and return the model.

    `scale` is diffusers' adapter weight (it multiplies alpha / rank). `fuse=True` adds
    scale * alpha / rank * B @ A into each base kernel (summed in float64, rounded once): permanent, as
    diffusers' fuse_lora. `fuse=False` keeps A and B beside the layer as adapter `name` (default: the file's
    stem); `unload_lora(model, name)` takes it off, leaving the base weights bit for bit as they were.
    Several files apply one after another, each with its own scale. Every module of the file is placed and
    checked before anything changes: else one CheckpointError, and the model is untouched. `part`: which model of
    the file's ("unet", "text_encoder" for `text_encoder.` / `lora_te1_` / `lora_te_`, "text_encoder_2" for
    `text_encoder_2.` / `lora_te2_`); default the model's kind's (a CLIPTextModel: "text_encoder"). A file holding
    other parts too is refused unless `ignore_other_parts=True` (each model of a pipeline takes its own part).
    """
    scale = check_scale(scale)
    name = Path(path).stem if name is None else name
    if isinstance(model, Pipeline):
        return _load_into_pipeline(model, path, scale=scale, fuse=fuse, name=name, part=part)
    if not fuse and name in lora_adapters.adapters_of(model):
        raise CheckpointError(f"load_lora: an adapter named {name!r} is on the model already; pass another name=")
    _, placed, config = read_lora(model, path, part=part, ignore_other_parts=ignore_other_parts)
    _apply(model, placed, config, scale=scale, fuse=fuse, name=name)
    return model


def _load_into_pipeline(pipe, path, *, scale, fuse, name, part):
    """Every part of the file on its model of `pipe` (unet, text_encoder, text_encoder_2): all checked, then applied."""
    if part is not None:
        raise CheckpointError("load_lora: a pipeline takes each part of the file on its own model; leave out part=")
    # diffusers' names of the pipeline's text encoders: the refiner has text_encoder_2 only
    names = ("text_encoder_2",) if pipe.family == "sdxl-refiner" else ("text_encoder", "text_encoder_2")
    models = {"unet": pipe.unet} | dict(zip(names, pipe.text_encoders))
    path = Path(path)
    with open_source(path) as source:
        _, found, _ = entries(source.infos)
    held = {part_of(m) for m in found}
    if None in held:
        bare = sorted(m for m in found if part_of(m) is None)
        raise CheckpointError(f"{path}: {len(bare)} modules name no model of the pipeline (no unet./text_encoder. prefix): "
                              f"{listing(bare, 2)}; load it on one model (load_lora(pipe.unet, ...))")
    missing = sorted(held - set(models))
    if missing:
        raise CheckpointError(f"{path}: holds {', '.join(missing)} modules; this {pipe.family} pipeline has no such model")
    if not fuse and any(name in lora_adapters.adapters_of(models[p]) for p in held):
        raise CheckpointError(f"load_lora: an adapter named {name!r} is on the pipeline already; pass another name=")
    read = {p: read_lora(models[p], path, part=p, ignore_other_parts=True) for p in sorted(held)}  # all checked first
    for p, (_, placed, config) in read.items():
        _apply(models[p], placed, config, scale=scale, fuse=fuse, name=name)
    return pipe


def _apply(model, placed: list[Placed], config: dict, *, scale: float, fuse: bool, name: str) -> None:
    rslora = bool(config.get("use_rslora", False))
    for one in placed:
        layer = _at(model, one.path)
        dtype = layer.kernel[...].dtype
        adapter = Adapter(one.down.astype(dtype), one.up.astype(dtype), alpha=one.alpha, scale=scale, rslora=rslora)
        if fuse:
            lora_adapters.fuse(layer, adapter)
        else:
            lora_adapters.attach(layer, name, adapter)


def fuse_lora(model: nnx.Module, name: str | None = None) -> nnx.Module:
    """Fuse the unfused adapter `name` (every one when None) into the base kernels, as load_lora(fuse=True) does,
    and take it off: e.g. trained adapters, for inference."""
    held = lora_adapters.adapters_of(model)
    names = sorted(held) if name is None else [name]
    if not held or any(n not in held for n in names):
        raise CheckpointError(f"fuse_lora: no adapter {name!r} on the model (it holds {sorted(held) or 'none'})")
    for n in names:
        for path, adapter in held[n]:
            lora_adapters.fuse(_at(model, path), adapter)
        lora_adapters.remove(model, n)
    return model


def unload_lora(model: nnx.Module, name: str | None = None) -> nnx.Module:
    """Take the unfused adapter `name` (every one when None) off `model`: its base weights are as loaded."""
    if lora_adapters.remove(model, name) == 0:
        held = sorted(lora_adapters.adapters_of(model))
        raise CheckpointError(f"unload_lora: no adapter {name!r} on the model (it holds {held or 'none'})")
    return model


def set_lora_scale(model, scale: float, *, name: str | None = None) -> nnx.Module:
    """Set the weight of the unfused adapter `name` (every one when None) on `model` or on a Pipeline's UNet and
    text encoders, as diffusers' set_adapters(adapter_weights=...): the output becomes base + scale * alpha / rank
    * up(down(x)). The weight is state, so jitted programs (a Pipeline's loop among them) are not compiled again.
    A fused LoRA is part of the kernels: unload nothing, load it again."""
    scale = check_scale(scale, "set_lora_scale")
    models = [model.unet, *model.text_encoders] if isinstance(model, Pipeline) else [model]
    held = [adapter for m in models for n, found in lora_adapters.adapters_of(m).items() if name in (None, n)
            for _, adapter in found]
    if not held:
        names = sorted({n for m in models for n in lora_adapters.adapters_of(m)})
        which = "no unfused adapter" if name is None else f"no unfused adapter {name!r}"
        raise CheckpointError(f"set_lora_scale: {which} on the model (it holds {names or 'none'}; a LoRA loaded with "
                              "fuse=True is in the kernels)")
    for adapter in held:
        adapter.scale[...] = jnp.asarray(scale, jnp.float32)
    return model


def lora_summary(path) -> dict:
    """What `flax-sgm inspect` says of a LoRA file: format, modules, rank(s), alpha(s), what it adapts."""
    path = Path(path)
    with open_source(path) as source:
        keys = list(source.infos)
        other = kind_of(keys)
        if other is not None:
            return {"format": other[0], "modules": None, "problem": f"not plain LoRA ({other[1]})"}
        fmt, found, stray = entries(keys)
        ranks = sorted({source.infos[e.down].shape[0] for e in found.values() if e.down is not None})
        alphas = sorted({float(np.asarray(source.read(e.alpha)).reshape(())) for e in found.values() if e.alpha})
        metadata = source.metadata if source.kind == "safetensors" else {}
    config = peft_config(metadata)
    if not alphas and "lora_alpha" in config:
        alphas = [float(config["lora_alpha"])]
    text = sum(part_of(m) in ("text_encoder", "text_encoder_2") for m in found)
    names = [strip_prefix(m) for m in found]
    # What each module is inside its block: 'attn2.to_k', 'ff.net.2', 'conv1' (kohya: 'attn2_to_k').
    sep = "_" if fmt == "kohya" else r"\."
    block = re.compile(rf"^.*(?:blocks|block|attentions|resnets|samplers){sep}\d+{sep}(?:\d+{sep})?")
    layers = sorted({block.sub("", n) for n in names})
    return {"format": fmt, "modules": len(found), "unet_modules": len(found) - text, "text_encoder_modules": text,
            "rank": ranks, "alpha": alphas or "rank (none stored)", "layers": layers, "stray_keys": len(stray)}
