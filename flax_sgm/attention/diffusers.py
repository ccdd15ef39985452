"""A diffusers config.json as the spec of its SpatialTransformer stacks: every field honoured or refused.

Transformer2DModel (the stack at the root) and UNet2DConditionModel (a stack per
`*.attentions.N.` of its cross-attention blocks). Each field of their constructors
is in exactly one table below:
  HONOURED  read into the stack's config (heads, only-cross attention as sgm's
            `disable_self_attn`, dropout) or checked against its weights;
  FIXED     SpatialTransformer builds one value only: any other is refused, naming
            the field and its value;
  NEUTRAL   does not change a stack's output (with why).
A field in none of them (one a later diffusers adds) is refused too.
parity_tests/test_diffusers_config.py walks diffusers' signatures against these tables.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from flax_sgm.attention import layout
from flax_sgm.nn import numerics
from flax_sgm.checkpoints.sources import describe_config
from flax_sgm.errors import CheckpointError
from flax_sgm.unet.diffusers import flag, fraction, read_blocks

# The values SpatialTransformer and its BasicTransformerBlock are built with (numerics.py, blocks.py).

TRANSFORMER_2D_HONOURED = (
    "num_attention_heads", "attention_head_dim",  # the heads split
    "in_channels", "num_layers", "cross_attention_dim", "use_linear_projection",  # checked against the weights
    "only_cross_attention",  # sgm's disable_self_attn: attn1 attends to the context
    "double_self_attention",  # attn2 of the inner width: sgm's context_dim None
    "dropout",  # the config's dropout (sgm's sits where diffusers' does: to_out.1, ff.net.1)
    "out_channels",  # None, or the input width: sgm's proj_out maps back to in_channels
)
TRANSFORMER_2D_FIXED = {
    "norm_num_groups": numerics.GROUP_NORM_GROUPS,
    "attention_bias": False,  # sgm's to_q, to_k, to_v have no bias
    "activation_fn": "geglu",  # the seed's GEGLU with exact GELU
    "num_embeds_ada_norm": None,  # set, it turns layer_norm into ada_norm
    "norm_type": "layer_norm",
    "norm_elementwise_affine": True,
    "norm_eps": numerics.LAYER_NORM_EPS,
    "attention_type": "default",  # "gated": GLIGEN's fuser
    "num_vector_embeds": None,  # discrete (VQ) input
    "patch_size": None,  # patched input (DiT, PixArt)
    "caption_channels": None,  # PixArt's caption projection
}
TRANSFORMER_2D_NEUTRAL = {
    "sample_size": "sizes discrete or patched inputs only",
    "interpolation_scale": "scales patched inputs' position embeddings only",
    "use_additional_conditions": "read by ada_norm_single only",
    "upcast_attention": "float32 attention scores in diffusers' legacy processor; flax_sgm's softmax statistics "
                        "are float32 always (numerics.py), and float32 runs are unchanged",
}

# UNet2DConditionModel: the fields its stacks are built from. The rest build the UNet around them.
UNET_HONOURED = (
    "num_attention_heads", "attention_head_dim", "down_block_types", "up_block_types",  # the heads per stack
    "cross_attention_dim", "use_linear_projection",  # checked against the weights
    "only_cross_attention",  # per down block, reversed for the up blocks; the mid block's stacks never
    "dropout",  # the stacks' attention and feed-forward dropout
)
UNET_FIXED = {
    "norm_num_groups": numerics.GROUP_NORM_GROUPS,  # the stacks' GroupNorm too
    "attention_type": "default",
    "dual_cross_attention": False,  # DualTransformer2DModel: two stacks mixed
}
_OUTSIDE = "builds the UNet around the stacks, not a stack"
UNET_NEUTRAL = {
    "upcast_attention": TRANSFORMER_2D_NEUTRAL["upcast_attention"],
    "transformer_layers_per_block": "the depth, which the weights show",
    "reverse_transformer_layers_per_block": "the up blocks' depth, which the weights show",
    "block_out_channels": "the widths, which the weights show",
    "norm_eps": "the resnets' GroupNorm epsilon; a stack's GroupNorm has 1e-6 and its LayerNorms 1e-5 in diffusers",
    "mid_block_only_cross_attention": "read by UNetMidBlock2DSimpleCrossAttn only, which holds no stack",
    "cross_attention_norm": "read by the SimpleCrossAttn blocks only, which hold no stack",
    **{name: _OUTSIDE for name in (
        "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
        "mid_block_type", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
        "encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type", "addition_embed_type",
        "addition_time_embed_dim", "num_class_embeds", "resnet_time_scale_shift", "resnet_skip_time_act",
        "resnet_out_scale_factor", "time_embedding_type", "time_embedding_dim", "time_embedding_act_fn",
        "timestep_post_act", "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel",
        "projection_class_embeddings_input_dim", "class_embeddings_concat", "addition_embed_type_num_heads",
    )},
}

# BasicTransformerBlock's fields that Transformer2DModel leaves at their defaults, which are sgm's block:
# a feed-forward of 4x the width with biases, to_out with a bias, no position embedding, no final dropout.
BLOCK_DEFAULTS = {
    "final_dropout": False, "positional_embeddings": None, "num_positional_embeddings": None,
    "ada_norm_continous_conditioning_embedding_dim": None, "ada_norm_bias": None, "ff_inner_dim": None,
    "ff_bias": True, "attention_out_bias": True,
}

TABLES = {
    layout.DIFFUSERS_TRANSFORMER: (TRANSFORMER_2D_HONOURED, TRANSFORMER_2D_FIXED, TRANSFORMER_2D_NEUTRAL),
    layout.DIFFUSERS_UNET: (UNET_HONOURED, UNET_FIXED, UNET_NEUTRAL),
}


class StackSpec(NamedTuple):
    """What a config says about one stack: its heads, and what its weights must agree with."""

    heads: layout.Heads
    disable_self_attn: bool  # only_cross_attention
    dropout: float
    context_dim: int | None  # attn2's key width, None when the inner dim (double_self_attention, or no config value)
    use_linear: bool | None
    in_channels: int | None = None
    depth: int | None = None


def check_fields(config: Mapping[str, Any], source: str) -> str:
    """The config's class; CheckpointError naming the first field that SpatialTransformer cannot honour."""
    kind = config.get("_class_name")
    if kind not in TABLES:
        raise CheckpointError(f"{source}: {describe_config(config)}, not a diffusers {layout.DIFFUSERS_UNET} or "
                              f"{layout.DIFFUSERS_TRANSFORMER} config")
    honoured, fixed, neutral = TABLES[kind]
    for field, value in config.items():
        if field.startswith("_") or field in honoured or field in neutral:
            continue  # "_diffusers_version", "_name_or_path", ...: bookkeeping
        if field not in fixed:
            raise CheckpointError(
                f"{source}: {field}={value!r} is a {kind} field flax_sgm does not know; it may change the output, "
                "so it is refused"
            )
        if not _same(value, fixed[field]):
            raise CheckpointError(
                f"{source}: {field}={value!r}; SpatialTransformer builds {field}={fixed[field]!r} only"
            )
    if kind == layout.DIFFUSERS_TRANSFORMER:
        out, in_channels = config.get("out_channels"), config.get("in_channels")
        if out is not None and out != in_channels:
            raise CheckpointError(
                f"{source}: out_channels={out!r} differs from in_channels={in_channels!r}; SpatialTransformer maps "
                "back to its input width only"
            )
    return kind


def _same(value, expected) -> bool:
    if isinstance(expected, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(value, expected, rel_tol=1e-9)
    return value == expected and type(value) is type(expected)


def stack_specs(config: Mapping[str, Any], prefixes: Iterable[str], source: str) -> dict[str, StackSpec]:
    """Per stack prefix, what a diffusers config.json (read as `source`) says about it; its fields checked first."""
    kind = check_fields(config, source)
    prefixes = list(prefixes)
    dropout = fraction(config, "dropout", 0.0, source)
    if kind == layout.DIFFUSERS_TRANSFORMER:
        heads, width = config.get("num_attention_heads"), config.get("attention_head_dim")
        for name, value in (("num_attention_heads", heads), ("attention_head_dim", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{source}: {name} must be a positive int; got {value!r}")
        context = None if flag(config, "double_self_attention", source) else config.get("cross_attention_dim")
        return {
            prefix: StackSpec(
                layout.Heads(heads, width), flag(config, "only_cross_attention", source), dropout, context,
                flag(config, "use_linear_projection", source), config.get("in_channels"), config.get("num_layers", 1),
            )
            for prefix in prefixes if prefix == ""
        }
    blocks = read_blocks(config, source)  # the one reading of a UNet's config.json, shared with load_unet
    specs = {}
    for prefix in prefixes:
        if (where := _block_of(prefix)) is None:
            continue
        part, index = where
        if index >= len(blocks.types):
            raise CheckpointError(f"{source}: {len(blocks.types)} blocks, but the weights have a stack at {prefix!r}")
        heads, only, context = blocks.stack(part, index)
        specs[prefix] = StackSpec(layout.Heads(heads), only, dropout, context, blocks.use_linear)
    return specs


_STACK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.\d+\.$|^mid_block\.attentions\.\d+\.$")


def _block_of(prefix: str) -> tuple[str, int] | None:
    """('down', 1) for 'down_blocks.1.attentions.0.', ('mid', -1) for the mid block, None for no UNet stack."""
    if not (m := _STACK.match(prefix)):
        return None
    return ("mid", -1) if m.group(1) is None else (m.group(1).removesuffix("_blocks"), int(m.group(2)))


def check_weights(spec: StackSpec, shape: layout.StackShape, prefix: str, source: str) -> None:
    """CheckpointError where the config and the weights describe different stacks."""
    at = f"{source} and the weights at {layout.where(prefix)} disagree"
    widths = shape.context_dim if isinstance(shape.context_dim, tuple) else (shape.context_dim,) * shape.depth
    widths = tuple(shape.inner_dim if w is None else w for w in widths)
    said = spec.context_dim if spec.context_dim is not None else shape.inner_dim
    checks = [
        ("only_cross_attention", spec.disable_self_attn, shape.disable_self_attn),
        ("cross_attention_dim", said, widths[0] if len(set(widths)) == 1 else list(widths)),
        ("use_linear_projection", spec.use_linear, shape.use_linear),
        ("in_channels", spec.in_channels, shape.in_channels),
        ("num_layers", spec.depth, shape.depth),
    ]
    for field, config_value, weights_value in checks:
        if config_value is not None and config_value != weights_value:
            raise CheckpointError(f"{at}: {field} {config_value!r} in the config, {weights_value!r} in the weights")
