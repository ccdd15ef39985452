"""Where a UNet's tensors sit in sgm/LDM and diffusers checkpoints.

flax_sgm's UNetModel has sgm's names (convert.conversion_table gives them: as sgm's
UNetModel.state_dict(), no prefix). A diffusers UNet2DConditionModel holds the same
tensors, in the same torch layouts, under other names: `diffusers_layout(config)`
is the KeyLayout, generated from the config's block specs, that renames each sgm
prefix to diffusers' (`input_blocks.1.0.in_layers.0.` -> `down_blocks.0.resnets.0.norm1.`).
Inside a SpatialTransformer both use the seed's names. `config_from_weights` reads a
UNetConfig off sgm-named shapes (a single file), recognising the released models.
"""

from __future__ import annotations

import dataclasses

from flax_sgm.checkpoints.convert import KeyLayout
from flax_sgm.attention.layout import LORA_FILES, listing, top_level_prefixes
from flax_sgm.errors import CheckpointError
from flax_sgm.unet.config import PRESETS, Attn, ConvIn, Down, Res, UNetConfig, Up

# sgm/LDM single files hold the UNet under this prefix, beside first_stage_model. and the conditioners.
SGM_PREFIX = "model.diffusion_model."

# A ResBlock's children: sgm's nn.Sequential indices -> diffusers' ResnetBlock2D names.
RESBLOCK = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
EMBEDDING = (("0.", "linear_1."), ("2.", "linear_2."))  # (Linear, SiLU, Linear) -> TimestepEmbedding
COND_PROJ = "time_embed.cond_proj."  # an LCM UNet's guidance projection: sgm has none, flax_sgm names it so


def _layer(sgm: str, layer, diffusers: str) -> list[tuple[str, str]]:
    if isinstance(layer, Res):
        return [(sgm + a, diffusers + b) for a, b in RESBLOCK]
    if isinstance(layer, Down):
        return [(sgm + "op.", diffusers + "conv.")]
    if isinstance(layer, Up):
        return [(sgm + "conv.", diffusers + "conv.")]
    return [(sgm, diffusers)]  # a SpatialTransformer: the seed's names in both


def diffusers_layout(config: UNetConfig, vector: str | None = "add_embedding") -> KeyLayout:
    """diffusers' names for a UNet of `config`. `vector`: the module holding sgm's label_emb
    ("add_embedding" for SDXL's text_time, "class_embedding" for class_embed_type 'projection')."""
    pairs = [("time_embed." + a, "time_embedding." + b) for a, b in EMBEDDING]
    if config.time_cond_proj_dim is not None:
        pairs.append((COND_PROJ, "time_embedding.cond_proj."))
    if config.adm_in_channels is not None:
        if vector is None:
            raise ValueError("diffusers_layout: a UNet with a vector embedding needs `vector` (add_embedding or class_embedding)")
        pairs += [("label_emb.0." + a, f"{vector}.{b}") for a, b in EMBEDDING]
    pairs += [("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    modules = [("time_embed.", "time_embedding.")] + ([("label_emb.0.", f"{vector}.")] if config.adm_in_channels else [])
    modules += [("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]

    def whole(sgm: str, spec, diffusers: str) -> list[tuple[str, str]]:
        """One layer's pairs; diffusers holds the layer whole, as one module."""
        modules.append((sgm, diffusers))
        return _layer(sgm, spec, diffusers)

    def place(layer, level: int, index: int, down: bool) -> str:
        kind = "down_blocks" if down else "up_blocks"
        if isinstance(layer, (Down, Up)):
            return f"{kind}.{level}.{'downsamplers' if down else 'upsamplers'}.0."
        return f"{kind}.{level}.{'resnets' if isinstance(layer, Res) else 'attentions'}.{index}."

    level, index = 0, 0
    for n, block in enumerate(config.input_blocks):
        for m, layer in enumerate(block):
            sgm = f"input_blocks.{n}.{m}."
            if isinstance(layer, ConvIn):
                pairs += whole(sgm, layer, "conv_in.")
                continue
            pairs += whole(sgm, layer, place(layer, level, index, down=True))
        if isinstance(block[0], Down):
            level, index = level + 1, 0
        elif not isinstance(block[0], ConvIn):
            index += 1
    resnets = 0
    for m, layer in enumerate(config.middle_block):
        target = "mid_block.attentions.0." if isinstance(layer, Attn) else f"mid_block.resnets.{resnets}."
        resnets += isinstance(layer, Res)
        pairs += whole(f"middle_block.{m}.", layer, target)
    n = 0
    for up_level, level in enumerate(reversed(range(config.levels))):
        for index in range(config.num_res_blocks[level] + 1):
            for m, layer in enumerate(config.output_blocks[n]):
                pairs += whole(f"output_blocks.{n}.{m}.", layer, place(layer, up_level, index, down=False))
            n += 1
    return KeyLayout("diffusers", tuple(pairs), tuple(modules))


# Reading a config off sgm-named weights ------------------------------------------------------

UNET_MARK = "input_blocks.0.0.weight"  # [model_channels, in_channels, 3, 3]: marks a UNet


def _count(keys, stem: str) -> int:
    """How many transformer blocks a stack at `stem` has."""
    blocks = {k[len(stem):].split(".", 2)[1] for k in keys if k.startswith(stem + "transformer_blocks.")}
    return len(blocks)


# What a checkpoint without a UNet holds instead, by its keys' first names (sgm's and the usual exports').
NOT_A_UNET = {
    "control_model.": "a ControlNet",
    "controlnet_": "a ControlNet",
    "first_stage_model.": "a VAE",
    "encoder.": "a VAE",
    "decoder.": "a VAE",
    "conditioner.": "text encoders",
    "cond_stage_model.": "a text encoder",
    "text_model.": "a text encoder",
    **LORA_FILES,
}


class UnreleasedShapes(CheckpointError):
    """A single file's UNet of none of the released shapes, with nothing said of its heads (a caller that takes
    another argument for them, load_pipeline's unet_config=, says so in its place)."""


def config_from_weights(shapes, prefix: str = SGM_PREFIX, *, heads=None, head_dim=None, config=None,
                        source: str = "checkpoint", **options):
    """The UNetConfig of sgm-named weights under `prefix` (anything with `.shape`, by key).

    The shapes give every field but how attention splits into heads: a UNet whose shapes
    are one of the PRESETS (in/out channels aside: inpainting) takes its heads; any other
    needs `heads` (sgm's num_heads) or `head_dim` (num_head_channels). A `config` given
    (e.g. UNetConfig.preset("sdxl-base")) is checked against the shapes and returned, or refused
    in one line naming the fields that differ.
    """
    local = {k[len(prefix):]: tuple(v.shape) for k, v in shapes.items() if k.startswith(prefix)}
    if UNET_MARK not in local:
        tops = top_level_prefixes(shapes)
        kinds = sorted({kind for top in tops for start, kind in NOT_A_UNET.items() if top.startswith(start)})
        what = f" ({' and '.join(kinds)}, not a UNet)" if kinds else ""
        raise CheckpointError(f"{source}: no UNet under {prefix!r} (no {prefix}{UNET_MARK}); it holds {listing(tops, 8)}{what}")
    try:
        fields = _read_fields(local)
    except (KeyError, IndexError, TypeError) as err:
        raise CheckpointError(f"{source}: the UNet under {prefix!r} is not sgm's UNetModel (no {err})") from None
    if config is not None:
        if heads is not None or head_dim is not None:
            raise CheckpointError(f"{source}: config= says the heads; leave out heads= and head_dim=")
        if not _same(dict(fields, num_heads=config.num_heads, num_head_channels=config.num_head_channels), config):
            raise CheckpointError(f"{source}: the weights do not fit config=: {_differences(fields, config)}")
        return config.replace(**options)
    if heads is None and head_dim is None:
        name = _preset_of(fields)
        if name is not None:
            return PRESETS[name].replace(**{k: fields[k] for k in BESIDE_PRESET}, **options)
        raise UnreleasedShapes(
            f"{source}: a UNet that is none of {', '.join(PRESETS)} by its shapes: give heads= or head_dim= "
            "(the weights do not say how attention splits into heads)"
        )
    if (heads is None) == (head_dim is None):
        raise CheckpointError(f"{source}: give heads= or head_dim=, not both")
    try:
        return UNetConfig(**fields, num_heads=heads or -1, num_head_channels=head_dim or -1, **options)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _read_fields(local: dict) -> dict:
    """UNetConfig's fields, heads aside, from sgm-named shapes (no prefix)."""
    model_channels, in_channels = local[UNET_MARK][:2]
    # Walk the input blocks: ResBlocks (+ a stack at .1) until a Downsample (`op`) opens the next level.
    mults, res_blocks, depth, disabled, depth_input = [None], [], [], [], []
    n, count = 1, 0
    while f"input_blocks.{n}.0.op.weight" in local or f"input_blocks.{n}.0.in_layers.0.weight" in local:
        if f"input_blocks.{n}.0.op.weight" in local:
            res_blocks.append(count)
            mults.append(None)
            count = 0
        else:
            out = local[f"input_blocks.{n}.0.in_layers.2.weight"][0]
            mults[-1] = out // model_channels
            stem = f"input_blocks.{n}.1."
            depth_input.append(_count(local, stem))
            if count == 0:
                depth.append(_count(local, stem))
                attn1 = local.get(stem + "transformer_blocks.0.attn1.to_k.weight")
                disabled.append(attn1 is not None and attn1[1] != out)
            count += 1
        n += 1
    res_blocks.append(count)
    levels = len(mults)
    outputs = sum(res_blocks) + levels
    depth_output = [_count(local, f"output_blocks.{n}.1.") for n in range(outputs)]
    adm = local["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in local else None
    proj_in = next((v for k, v in local.items() if k.endswith("proj_in.weight")), None)
    context = next((v[1] for k, v in local.items() if k.endswith("attn2.to_k.weight")), None)
    emb_width, out = local["input_blocks.1.0.emb_layers.1.weight"][0], local["input_blocks.1.0.in_layers.2.weight"][0]
    return dict(
        in_channels=in_channels,
        out_channels=local["out.2.weight"][0],
        model_channels=model_channels,
        channel_mult=tuple(mults),
        num_res_blocks=tuple(res_blocks),
        attention_resolutions=tuple(2**lvl for lvl in range(levels) if depth[lvl]),
        transformer_depth=tuple(depth),
        transformer_depth_middle=_count(local, "middle_block.1."),
        transformer_depth_input=tuple(depth_input),  # UNetConfig keeps them only where they differ from the level's
        transformer_depth_output=tuple(depth_output),
        context_dim=context,
        use_linear_in_transformer=proj_in is not None and len(proj_in) == 2,
        disable_self_attentions=tuple(disabled),
        use_scale_shift_norm=emb_width == 2 * out,  # the embedding gives a scale and a shift
        num_classes="sequential" if adm else None,
        adm_in_channels=adm,
        time_cond_proj_dim=local[COND_PROJ + "weight"][1] if COND_PROJ + "weight" in local else None,
    )


# What a released model's fine-tunes change and still take its heads: in/out channels (inpainting,
# InstructPix2Pix, depth, learned sigma) and an LCM distillation's guidance projection.
BESIDE_PRESET = ("in_channels", "out_channels", "time_cond_proj_dim")


def _preset_of(fields: dict) -> str | None:
    """Which released model sgm-read `fields` (heads aside) are, BESIDE_PRESET aside."""
    for name, preset in PRESETS.items():
        guess = dict(fields, num_heads=preset.num_heads, num_head_channels=preset.num_head_channels)
        if _same(guess | {k: getattr(preset, k) for k in BESIDE_PRESET}, preset):
            return name
    return None


def _differences(fields: dict, config) -> str:
    """The fields where weights read as `fields` differ from `config`, as `name <weights> (config= has <value>)`."""
    try:
        read = dataclasses.asdict(config.replace(**fields))
    except ValueError:
        read = fields

    def matters(name):  # a depth where no attention is does not
        try:
            return _blocks(config.replace(**{name: read[name]})) != _blocks(config)
        except ValueError:
            return True

    differ = [f"{k} {read[k]!r} (config= has {getattr(config, k)!r})" for k in fields if matters(k)]
    name = _preset_of(fields)
    return (listing(differ, 4) or "their blocks differ") + (f"; they are {name}'s shapes" if name else "")


def _same(fields: dict, preset) -> bool:
    """Whether `fields` build the preset's blocks, heads included (a depth where no attention is does not count)."""
    try:
        config = UNetConfig(**fields)
    except ValueError:
        return False
    return _blocks(config) == _blocks(preset)


def _blocks(c: UNetConfig) -> tuple:
    """What a config's weights and heads are made of."""
    return (c.input_blocks, c.middle_block, c.output_blocks, c.context_dim, c.use_linear_in_transformer,
            c.use_scale_shift_norm, c.adm_in_channels, c.time_cond_proj_dim)
