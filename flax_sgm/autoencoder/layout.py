"""Where an autoencoder's tensors sit in sgm/LDM single files and in diffusers' AutoencoderKL.

flax_sgm's AutoencoderKL has sgm's names (convert.conversion_table gives them: sgm's state_dict, under
`first_stage_model.` in a single file). diffusers holds the same tensors under other names, and its mid-block
attention's q/k/v/proj_out as Linear weights [out, in] where sgm has 1x1 convs [out, in, 1, 1]:
`diffusers_layout(config)` is the KeyLayout (rows of the one conversion table) that renames and re-lays
them. `config_from_weights` reads an AutoencoderConfig off sgm-named shapes.
"""

from __future__ import annotations

from flax_sgm.autoencoder.config import AutoencoderConfig
from flax_sgm.checkpoints.convert import LINEAR_AS_CONV1X1, KeyLayout
from flax_sgm.attention.layout import LORA_FILES, listing, top_level_prefixes
from flax_sgm.errors import CheckpointError

SGM_PREFIX = "first_stage_model."  # sgm/LDM single files, beside model.diffusion_model. and the conditioners
VAE_MARK = "encoder.conv_in.weight"  # [ch, in_channels, 3, 3]: marks an autoencoder
# sgm's AutoencodingEngine keeps its training loss (LPIPS, discriminator) under `loss.`: not the model.
TRAINING_LOSS = "loss."

# sgm's ResnetBlock -> diffusers' ResnetBlock2D: only the 1x1 shortcut's name differs.
RESNET = (("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."),
          ("nin_shortcut.", "conv_shortcut."))
# sgm's AttnBlock -> diffusers' Attention (its group_norm inside).
ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."))
LINEAR_IN_DIFFUSERS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


def diffusers_layout(config: AutoencoderConfig) -> KeyLayout:
    """diffusers' AutoencoderKL names (and Linear attention weights) for an autoencoder of `config`."""
    if config.attention in ("linear", "cross") or any(config.has_attention(lvl) for lvl in range(config.levels)):
        raise ValueError("diffusers_layout: diffusers' AutoencoderKL has only vanilla mid-block attention, none per level")
    pairs, modules, transforms = [], [], []

    def whole(ours: str, theirs: str, children=()) -> None:
        modules.append((ours, theirs))
        pairs.extend([(ours + a, theirs + b) for a, b in children] or [(ours, theirs)])

    for side in ("encoder", "decoder"):
        whole(f"{side}.conv_in.", f"{side}.conv_in.")
        for i in (1, 2):
            whole(f"{side}.mid.block_{i}.", f"{side}.mid_block.resnets.{i - 1}.", RESNET)
        if config.attention == "vanilla":
            whole(f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0.", ATTENTION)
            transforms += [(f"{side}.mid.attn_1.{k}", LINEAR_AS_CONV1X1) for k in LINEAR_IN_DIFFUSERS]
        whole(f"{side}.norm_out.", f"{side}.conv_norm_out.")
        whole(f"{side}.conv_out.", f"{side}.conv_out.")
    n = config.levels
    for level in range(n):
        for m in range(config.num_res_blocks):
            whole(f"encoder.down.{level}.block.{m}.", f"encoder.down_blocks.{level}.resnets.{m}.", RESNET)
        if level != n - 1:
            whole(f"encoder.down.{level}.downsample.", f"encoder.down_blocks.{level}.downsamplers.0.")
        up = n - 1 - level  # diffusers' up_blocks run from the smallest level; sgm's `up` is indexed by level
        for m in range(config.num_res_blocks + 1):
            whole(f"decoder.up.{level}.block.{m}.", f"decoder.up_blocks.{up}.resnets.{m}.", RESNET)
        if level != 0:
            whole(f"decoder.up.{level}.upsample.", f"decoder.up_blocks.{up}.upsamplers.0.")
    for name in ("quant_conv.", "post_quant_conv."):
        whole(name, name)
    return KeyLayout("diffusers", tuple(pairs), tuple(modules), tuple(transforms))


# Reading a config off sgm-named weights ------------------------------------------------------

# What a file holds instead of a KL autoencoder, by a key (relative to the VAE's prefix, or whole).
NOT_KL = {
    "quantize.embedding.weight": "a VQ autoencoder",
    "decoder.up.0.block.0.time_stack.in_layers.0.weight": "a video autoencoder (SVD's temporal decoder)",
    "decoder.time_mixer.mix_factor": "a video autoencoder (SVD's temporal decoder)",
}
# What a checkpoint without an autoencoder holds instead, by its keys' first names.
NOT_A_VAE = {
    "model.diffusion_model.": "a UNet",
    "input_blocks.": "a UNet",
    "down_blocks.": "a diffusers UNet",
    "control_model.": "a ControlNet",
    "controlnet_": "a ControlNet",
    "conditioner.": "text encoders",
    "cond_stage_model.": "a text encoder",
    "text_model.": "a text encoder",
    **LORA_FILES,
}


def _levels(local: dict, stem: str) -> int:
    return len({k[len(stem):].split(".", 1)[0] for k in local if k.startswith(stem)})


def config_from_weights(shapes, prefix: str = SGM_PREFIX, *, source: str = "checkpoint", **fields) -> AutoencoderConfig:
    """The AutoencoderConfig of sgm-named weights under `prefix` (anything with `.shape`, by key).

    The shapes give the architecture; `fields` give what they cannot (scaling_factor, force_upcast, ...).
    Attention at a level reads as attn_resolutions of the default resolution (the same model).
    """
    local = {k[len(prefix):]: tuple(v.shape) for k, v in shapes.items() if k.startswith(prefix)}
    for key, what in NOT_KL.items():
        if key in local:
            raise CheckpointError(f"{source}: {what} under {prefix!r} (it has {prefix}{key}); load_vae builds KL autoencoders only")
    if VAE_MARK not in local:
        tops = top_level_prefixes(shapes)
        kinds = sorted({kind for start, kind in NOT_A_VAE.items() if any(k.startswith(start) for k in shapes)})
        what = f" ({' and '.join(kinds)}, not a VAE)" if kinds else ""
        raise CheckpointError(f"{source}: no autoencoder under {prefix!r} (no {prefix}{VAE_MARK}); it holds {listing(tops, 8)}{what}")
    try:
        ch, in_channels = local[VAE_MARK][:2]
        levels = _levels(local, "encoder.down.")
        blocks = _levels(local, "encoder.down.0.block.")
        ch_mult = tuple(local[f"encoder.down.{lvl}.block.0.conv1.weight"][0] // ch for lvl in range(levels))
        z_channels = local["decoder.conv_in.weight"][1]
        attn = {}
        if "encoder.mid.attn_1.q.weight" in local:
            attn_type = "vanilla"
        elif "encoder.mid.attn_1.to_qkv.weight" in local:
            attn_type = "linear"
        elif "encoder.mid.attn_1.to_q.weight" in local:  # sgm's cross-attention wrapper: heads from `fields`
            attn_type = "memory-efficient-cross-attn"
            heads = fields.get("attn_heads", AutoencoderConfig.attn_heads)
            inner = local["encoder.mid.attn_1.to_q.weight"][0]
            if inner % heads:
                raise CheckpointError(f"{source}: the mid-block attention's {inner} features do not split into {heads} heads (give attn_heads=)")
            attn = {"attn_dim_head": inner // heads}
        else:
            attn_type = "none"
        resolution = AutoencoderConfig.resolution
        marks = ("norm.weight", "to_qkv.weight", "to_q.weight")
        attn_resolutions = tuple(resolution // 2**lvl for lvl in range(levels)
                                 if any(f"encoder.down.{lvl}.attn.0.{m}" in local for m in marks))
        embed_dim = local["post_quant_conv.weight"][1] if "post_quant_conv.weight" in local else z_channels
        return AutoencoderConfig(
            in_channels=in_channels,
            out_channels=local["decoder.conv_out.weight"][0],
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=blocks,
            attn_resolutions=attn_resolutions,
            z_channels=z_channels,
            embed_dim=embed_dim,
            attn_type=attn_type,
            use_quant_conv="quant_conv.weight" in local,
            use_post_quant_conv="post_quant_conv.weight" in local,
            **(attn | fields),
        )
    except KeyError as err:
        raise CheckpointError(f"{source}: the autoencoder under {prefix!r} is not sgm's (no {prefix}{err.args[0]})") from None
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None
