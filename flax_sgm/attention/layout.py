"""Where SpatialTransformer stacks sit in SGM/LDM and diffusers checkpoints, and what their keys say.

A stack is the keys under a prefix with the seed's names (the conversion table in
convert.py maps each one): `model.diffusion_model.input_blocks.4.1.` in SGM/LDM
files, `down_blocks.1.attentions.0.` in a diffusers UNet, the root in a diffusers
Transformer2DModel. The shapes give every constructor argument except how the
inner dim splits into heads; a diffusers `config.json` gives that split per stack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from flax_sgm.errors import CheckpointError

# A stack's children, in the seed's names.
STACK_CHILDREN = ("norm", "proj_in", "transformer_blocks", "proj_out")
# Keys that mark a stack (relative to its prefix) and that its shapes are read from.
NORM = "norm.weight"  # [in_channels]
PROJ_IN = "proj_in.weight"  # [inner, in] (Linear) or [inner, in, 1, 1] (1x1 Conv2d)
FIRST_QUERY = "transformer_blocks.0.attn1.to_q.weight"
SELF_KEY = "attn1.to_k.weight"  # per block: [inner, inner], or [inner, context] when disable_self_attn
CROSS_KEY = "attn2.to_k.weight"  # per block: [inner, context]
FF_IN = "ff.net.0.proj.weight"  # per block: the seed's GEGLU, [8 * inner, inner]
_BLOCK_INDEX = re.compile(r"^transformer_blocks\.(\d+)\.")

# diffusers models whose config.json says how many heads each stack has.
DIFFUSERS_UNET = "UNet2DConditionModel"
DIFFUSERS_TRANSFORMER = "Transformer2DModel"


def natural_key(text: str):
    """'input_blocks.10.' after 'input_blocks.2.'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def normalize_prefix(prefix: str) -> str:
    """'a.b' -> 'a.b.' so that 'input_blocks.1' does not also select 'input_blocks.10'."""
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


# A LoRA file's keys' first names: what a model loader finds there instead of a model (each family's NOT_A_* table).
LORA_FILES = {
    "lora_unet_": "a kohya LoRA: flax_sgm.load_lora applies it to a model",
    "lora_te": "a kohya LoRA: flax_sgm.load_lora applies it to a model",
    "unet.": "a diffusers LoRA: flax_sgm.load_lora applies it to a model",
    "text_encoder.": "a diffusers LoRA: flax_sgm.load_lora applies it to a model",
}


def top_level_prefixes(keys: Iterable[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] + ("." if "." in k else "") for k in keys}, key=natural_key)


def listing(items: list[str], limit: int = 16) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def find_stacks(keys: Iterable[str]) -> list[str]:
    """Prefixes of every stack: a first block's attn1 with norm and proj_in beside it."""
    keys = set(keys)
    found = [
        key[: -len(FIRST_QUERY)]
        for key in keys
        if key.endswith(FIRST_QUERY) and {key[: -len(FIRST_QUERY)] + NORM, key[: -len(FIRST_QUERY)] + PROJ_IN} <= keys
    ]
    return sorted(found, key=natural_key)


def prefix_hint(keys: list[str], prefix: str) -> str:
    """What a checkpoint holds near a prefix that matched nothing."""
    parts, deepest = prefix.rstrip(".").split("."), ""
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:i]) + "."
        if any(k.startswith(candidate) for k in keys):
            deepest = candidate
            break
    hint = f"top-level prefixes: {listing(top_level_prefixes(keys))}"
    if deepest:
        children = sorted({k[len(deepest):].split(".", 1)[0] + "." for k in keys if k.startswith(deepest)}, key=natural_key)
        hint = f"under {deepest!r} there are: {listing(children)}; " + hint
    return hint


class StackShape(NamedTuple):
    """What a stack's weights say about its config: everything but the heads split."""

    in_channels: int
    inner_dim: int
    depth: int
    context_dim: int | tuple[int, ...] | None
    use_linear: bool
    disable_self_attn: bool


def where(prefix: str) -> str:
    return f"prefix {prefix!r}" if prefix else "the checkpoint's root"


def read_stack(shapes: Mapping[str, Any], prefix: str = "", *, disable_self_attn: bool | None = None) -> StackShape:
    """Read a stack's architecture off the shapes of its keys (anything with `.shape`, by key).

    use_linear: proj_in is [inner, in] (Linear) or [inner, in, 1, 1] (Conv2d).
    context_dim: attn2.to_k's input width per block; one int when all agree, None
    when that width is the inner dim (the weights cannot tell it from an explicit
    context_dim equal to the inner dim; either way a context is optional).
    disable_self_attn: attn1.to_k's input width differs from the inner dim. When the
    context width equals the inner dim the weights cannot show it: pass
    `disable_self_attn=True` to force it.
    The feed-forward must be the seed's GEGLU with mult 4 (SpatialTransformer has no other).
    """
    local = {k[len(prefix):]: tuple(v.shape) for k, v in shapes.items() if k.startswith(prefix)}
    at = where(prefix)
    absent = [k for k in (NORM, PROJ_IN, "transformer_blocks.0." + SELF_KEY) if k not in local]
    if absent:
        inside = find_stacks(prefix + k for k in local)
        hint = f"; the stacks under it: {listing(inside, 6)}" if inside else ""
        raise CheckpointError(f"{at} is not a SpatialTransformer stack: no {', '.join(prefix + k for k in absent)}{hint}")
    foreign = sorted({k.split(".", 1)[0] for k in local} - set(STACK_CHILDREN))
    if foreign:
        raise CheckpointError(
            f"{at} holds more than a SpatialTransformer: {listing([prefix + f + '.*' for f in foreign], 4)} "
            "(a video or other variant?)"
        )
    in_channels = local[NORM][0]
    proj_in = local[PROJ_IN]
    if len(proj_in) not in (2, 4) or (len(proj_in) == 4 and proj_in[2:] != (1, 1)) or proj_in[1] != in_channels:
        raise CheckpointError(f"{at}: proj_in.weight has shape {list(proj_in)}, expected [inner, {in_channels}(, 1, 1)]")
    inner = proj_in[0]
    depth = 1 + max(int(m.group(1)) for k in local if (m := _BLOCK_INDEX.match(k)))
    ctx, self_ctx = [], []
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        try:
            ctx.append(local[block + CROSS_KEY][1])
            self_ctx.append(local[block + SELF_KEY][1])
            ff = local[block + FF_IN]
        except KeyError as err:
            raise CheckpointError(f"{at}: block {i} has no {prefix}{err.args[0]}") from None
        if ff != (8 * inner, inner):
            kind = "a plain GELU feed-forward (gated_ff=False)" if ff == (4 * inner, inner) else f"ff.net.0.proj {list(ff)}"
            raise CheckpointError(
                f"{at}: block {i} has {kind}; SpatialTransformer builds the seed's GEGLU [8 * {inner}, {inner}] only"
            )
    disabled = [c != inner for c in self_ctx]
    if any(disabled) != all(disabled) or any(s != c for s, c, d in zip(self_ctx, ctx, disabled) if d):
        raise CheckpointError(f"{at}: attn1 key widths {self_ctx} fit no disable_self_attn setting (context {ctx})")
    inferred_disable = all(disabled)
    if disable_self_attn is not None and disable_self_attn != inferred_disable:
        if not disable_self_attn or any(c != inner for c in ctx):
            raise CheckpointError(
                f"{at}: disable_self_attn={disable_self_attn} contradicts the weights (attn1 key width {self_ctx[0]}, "
                f"inner dim {inner}, context width {ctx[0]})"
            )
        inferred_disable = True
    if all(c == inner for c in ctx) and not inferred_disable:
        context_dim = None
    elif len(set(ctx)) == 1:
        context_dim = ctx[0]
    else:
        context_dim = tuple(ctx)
    return StackShape(in_channels, inner, depth, context_dim, len(proj_in) == 2, inferred_disable)


def resolve_heads(inner_dim: int, heads: int | None, head_dim: int | None, prefix: str = "") -> tuple[int, int]:
    """(heads, head_dim) from one of the two; the weights only show their product."""
    of = f" of {prefix!r}" if prefix else ""
    if (heads is None) == (head_dim is None):
        raise CheckpointError(
            f"give exactly one of heads= or head_dim=: the weights show the inner dim{of} ({inner_dim}), "
            "not how it splits into heads (SD 1.x: heads=8; SD 2.x and SDXL: head_dim=64; a diffusers "
            "model directory's config.json says it)"
        )
    given, name = (heads, "heads") if heads is not None else (head_dim, "head_dim")
    if given <= 0 or inner_dim % given:
        raise CheckpointError(f"{name}={given} does not divide the inner dim {inner_dim}{of}")
    other = inner_dim // given
    return (given, other) if heads is not None else (other, given)


class Heads(NamedTuple):
    """What a config says about a stack's heads: their number, and their width where it says that too."""

    heads: int
    head_dim: int | None = None
