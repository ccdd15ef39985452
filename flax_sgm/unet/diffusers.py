"""A diffusers UNet2DConditionModel config.json as a UNetConfig: each field honoured, refused, or irrelevant.

Every parameter of diffusers' UNet2DConditionModel.__init__ is in exactly one of
HONOURED (mapped onto sgm's arguments), DEFAULTS (refused, in one line naming the
field and its value, unless it holds the value sgm's UNetModel computes with) and
IRRELEVANT (does not change the output). A field in none of them is refused too,
so a field diffusers adds later is noticed (parity_tests/test_unet.py walks the
signature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from flax_sgm.nn import numerics
from flax_sgm.checkpoints.sources import describe_config
from flax_sgm.errors import CheckpointError

# Read into UNetConfig (see config_fields).
HONOURED = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "only_cross_attention",
    "norm_eps",
    "dropout",
    "resnet_time_scale_shift",
    "class_embed_type",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
    "time_cond_proj_dim",
    "reverse_transformer_layers_per_block",
)

# Refused unless they hold these values (what sgm's UNetModel computes).
DEFAULTS: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,  # sgm's embedding is cos then sin
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": numerics.GROUP_NORM_GROUPS,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}

# Do not change the output, with why.
IRRELEVANT = {
    "sample_size": "the pipelines' default latent size; the UNet takes any",
    "upcast_attention": "the precision of attention scores in float16; flax_sgm's softmax statistics are float32 always",
    "addition_time_embed_dim": "the width of each size/crop id in `y` (sdxl_vector's `dim`); the UNet takes y whole",
    "addition_embed_type_num_heads": "used by addition_embed_type 'text' only, which is refused",
    "mid_block_only_cross_attention": "UNetMidBlock2DCrossAttn does not read it",
}

DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # -> has attention
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_TYPE = "UNetMidBlock2DCrossAttn"
DEFAULT_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # diffusers' defaults
DEFAULT_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _per_level(config: Mapping[str, Any], name: str, default, n: int, source: str, kind=int, what: str = "") -> list:
    value = config.get(name, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    ok = all(isinstance(v, kind) and not (kind is int and (isinstance(v, bool) or v <= 0)) for v in values)
    if len(values) != n or not ok:
        one = "positive int" if kind is int else kind.__name__
        raise CheckpointError(f"{source}: {name} {value!r} is not one {one} or {n} of them ({what or 'one per down block'})")
    return values


def flag(config: Mapping[str, Any], name: str, source: str) -> bool:
    value = config.get(name, False)
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: {name} must be true or false; got {value!r}")
    return value


def positive_number(config: Mapping[str, Any], name: str, default: float, source: str) -> float:
    value = config.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise CheckpointError(f"{source}: {name} must be a positive number; got {value!r}")
    return float(value)


def fraction(config: Mapping[str, Any], name: str, default: float, source: str) -> float:
    value = config.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise CheckpointError(f"{source}: {name} must be a number in [0, 1); got {value!r}")
    return float(value)


class Blocks(NamedTuple):
    """What a UNet2DConditionModel config says of its cross-attention blocks, per down block (the mid block
    takes the last, the up blocks them reversed). Read once here, for load_unet's UNetConfig and for the
    stacks load_pretrained takes out of a UNet alike."""

    types: list[str]  # down_block_types
    heads: list[int]  # num_attention_heads, or where unset the legacy attention_head_dim, which holds the heads
    context: list[int]  # cross_attention_dim
    only_cross: list[bool]  # only_cross_attention; the mid block's stacks never
    use_linear: bool
    dropout: float

    def stack(self, part: str, index: int) -> tuple[int, bool, int]:
        """(heads, only_cross, context) of a stack in `part` ('down', 'up' or 'mid') block `index`."""
        if part == "mid":
            return self.heads[-1], False, self.context[-1]
        flip = (lambda v: v) if part == "down" else (lambda v: v[::-1])
        return flip(self.heads)[index], flip(self.only_cross)[index], flip(self.context)[index]


def read_blocks(config: Mapping[str, Any], source: str) -> Blocks:
    """The Blocks of a UNet2DConditionModel config (diffusers' defaults where a field is left out);
    CheckpointError, one line naming the field, where one is malformed."""
    types = config.get("down_block_types", DEFAULT_DOWN)
    if not (isinstance(types, (list, tuple)) and types and all(isinstance(t, str) for t in types)):
        raise CheckpointError(f"{source}: down_block_types must be a non-empty list of block names; got {types!r}")
    n = len(types)
    named = "num_attention_heads" if config.get("num_attention_heads") else "attention_head_dim"  # as diffusers: `or`
    return Blocks(
        types=list(types),
        heads=_per_level(config, named, 8, n, source, what="the heads per down block"),
        context=_per_level(config, "cross_attention_dim", 1280, n, source),
        only_cross=_per_level(config, "only_cross_attention", False, n, source, kind=bool),
        use_linear=flag(config, "use_linear_projection", source),
        dropout=fraction(config, "dropout", 0.0, source),
    )


def _layer_depths(config: Mapping[str, Any], layers: list[int], source: str):
    """(per level, each down layer's depth; per up block, each layer's; the mid block's), as diffusers builds
    them from transformer_layers_per_block (an int, one per down block, or a list per block's layers) and
    reverse_transformer_layers_per_block (the up blocks', required by diffusers when a block lists its layers)."""
    n = len(layers)

    def per_layer(name: str, value, count: int, block: str) -> list[int]:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * count
        if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise CheckpointError(f"{source}: {name} {value!r} for {block} is not one int >= 0 or {count} of them (one per layer)")
        return values

    down = config.get("transformer_layers_per_block", 1)
    down = list(down) if isinstance(down, (list, tuple)) else [down] * n
    if len(down) != n:
        raise CheckpointError(f"{source}: transformer_layers_per_block {down!r} is not one entry per down block ({n})")
    reverse = config.get("reverse_transformer_layers_per_block")
    if reverse is None and any(isinstance(d, (list, tuple)) for d in down):
        raise CheckpointError(f"{source}: transformer_layers_per_block lists layers but reverse_transformer_layers_per_block "
                              "is not set (diffusers requires it for the up blocks)")
    up = down[::-1] if reverse is None else list(reverse) if isinstance(reverse, (list, tuple)) else None
    if up is None or len(up) != n:
        raise CheckpointError(f"{source}: reverse_transformer_layers_per_block {reverse!r} is not one entry per up block ({n})")
    down_depths = [per_layer("transformer_layers_per_block", d, layers[i], f"down block {i}") for i, d in enumerate(down)]
    up_depths = [per_layer("reverse_transformer_layers_per_block" if reverse is not None else "transformer_layers_per_block",
                           d, layers[n - 1 - i] + 1, f"up block {i}") for i, d in enumerate(up)]
    middle = down[-1][0] if isinstance(down[-1], (list, tuple)) else down[-1]  # UNetMidBlock2DCrossAttn's one layer
    return down_depths, up_depths, middle


def vector_embedding(config: Mapping[str, Any]) -> str | None:
    """The diffusers module that holds sgm's `label_emb`: add_embedding (SDXL's text_time), class_embedding, or None."""
    if config.get("addition_embed_type") == "text_time":
        return "add_embedding"
    return "class_embedding" if config.get("class_embed_type") == "projection" else None


def config_fields(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """UNetConfig's fields from a diffusers UNet2DConditionModel config.

    CheckpointError, one line naming the field and its value, for what sgm's UNetModel cannot compute.
    """
    if config.get("_class_name", "UNet2DConditionModel" if "model_type" not in config else None) != "UNet2DConditionModel":
        raise CheckpointError(f"{source}: {describe_config(config)}, not a diffusers UNet2DConditionModel")
    known = set(HONOURED) | set(DEFAULTS) | set(IRRELEVANT)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise CheckpointError(f"{source}: field {unknown[0]} = {config[unknown[0]]!r} is unknown to flax_sgm's UNet")
    for name, default in DEFAULTS.items():
        if name in config and config[name] != default and not (isinstance(default, float) and config[name] == int(default)):
            raise CheckpointError(
                f"{source}: {name} = {config[name]!r} is not supported (sgm's UNetModel computes {name} = {default!r})"
            )

    channels = config.get("block_out_channels", (320, 640, 1280, 1280))
    if not (isinstance(channels, (list, tuple)) and channels and all(isinstance(c, int) and c > 0 for c in channels)):
        raise CheckpointError(f"{source}: block_out_channels must be a list of positive ints; got {channels!r}")
    n, base = len(channels), channels[0]
    if any(c % base for c in channels):
        raise CheckpointError(
            f"{source}: block_out_channels {list(channels)} are not multiples of the first (sgm's channel_mult)"
        )
    blocks = read_blocks(config, source)
    down, up = blocks.types, config.get("up_block_types", DEFAULT_UP)
    for name, types, table in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES)):
        bad = [t for t in types if t not in table]
        if bad or len(types) != n:
            raise CheckpointError(f"{source}: {name} {list(types)} must be {n} of {sorted(table)}")
    attention = [DOWN_TYPES[t] for t in down]
    if [UP_TYPES[t] for t in up] != attention[::-1]:
        raise CheckpointError(
            f"{source}: up_block_types {list(up)} do not mirror down_block_types {list(down)} (sgm's UNet is symmetric)"
        )
    mid = config.get("mid_block_type", MID_TYPE)
    if mid != MID_TYPE:
        raise CheckpointError(f"{source}: mid_block_type = {mid!r} is not supported (sgm's middle block is {MID_TYPE})")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise CheckpointError(f"{source}: resnet_time_scale_shift = {shift!r} is not supported ('default' or 'scale_shift')")

    layers = _per_level(config, "layers_per_block", 2, n, source)
    down_depths, up_depths, middle = _layer_depths(config, layers, source)
    depth = [d[0] if d else 0 for d in down_depths]  # sgm's per-level depth; the layers' own are transformer_depth_input/_output
    heads = blocks.heads
    used = [lvl for lvl in range(n) if attention[lvl]] + [n - 1]  # the mid block takes the last level's
    for lvl in used:
        if channels[lvl] % heads[lvl]:
            raise CheckpointError(f"{source}: {channels[lvl]} channels do not split into {heads[lvl]} heads (level {lvl})")
    if len({heads[lvl] for lvl in used}) == 1:
        head_fields = {"num_heads": heads[used[0]]}
    elif len({channels[lvl] // heads[lvl] for lvl in used}) == 1:
        head_fields = {"num_head_channels": channels[used[0]] // heads[used[0]]}
    else:
        raise CheckpointError(
            f"{source}: heads {heads} over channels {list(channels)} fit neither sgm's num_heads nor num_head_channels"
        )
    context = blocks.context
    if len(set(context)) != 1:
        raise CheckpointError(f"{source}: cross_attention_dim {context} differs per block; sgm's context_dim is one width")
    only_cross = blocks.only_cross

    vector = vector_embedding(config)
    for name, allowed in (("addition_embed_type", (None, "text_time")), ("class_embed_type", (None, "projection"))):
        if config.get(name) not in allowed:
            raise CheckpointError(f"{source}: {name} = {config[name]!r} is not supported ({' or '.join(map(repr, allowed))})")
    if config.get("addition_embed_type") and config.get("class_embed_type"):
        raise CheckpointError(f"{source}: addition_embed_type and class_embed_type are both set; sgm has one vector embedding")
    adm = config.get("projection_class_embeddings_input_dim") if vector else None
    if vector and not (isinstance(adm, int) and adm > 0):
        raise CheckpointError(f"{source}: projection_class_embeddings_input_dim must be a positive int; got {adm!r}")

    cond = config.get("time_cond_proj_dim")
    if cond is not None and not (isinstance(cond, int) and not isinstance(cond, bool) and cond > 0):
        raise CheckpointError(f"{source}: time_cond_proj_dim must be a positive int or null; got {cond!r}")

    return dict(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=tuple(layers),
        attention_resolutions=tuple(2**lvl for lvl in range(n) if attention[lvl]),
        transformer_depth=tuple(depth),
        transformer_depth_middle=middle,
        transformer_depth_input=tuple(d for level in down_depths for d in level),
        transformer_depth_output=tuple(d for level in up_depths for d in level),
        context_dim=context[0],
        use_linear_in_transformer=blocks.use_linear,
        disable_self_attentions=tuple(only_cross),
        use_scale_shift_norm=shift == "scale_shift",
        num_classes="sequential" if vector else None,
        adm_in_channels=adm,
        dropout=blocks.dropout,
        time_cond_proj_dim=cond,
        norm_eps=positive_number(config, "norm_eps", numerics.UNET_GROUP_NORM_EPS, source),
        **head_fields,
    )
