"""Where a UNet's tensors sit in sgm/LDM and diffusers checkpoints.

flax_sgm's UNetModel has sgm's names (convert.conversion_table gives them: as sgm's
UNetModel.state_dict(), no prefix). A diffusers UNet2DConditionModel holds the same
tensors, in the same torch layouts, under other names: `diffusers_layout(config)`
is the KeyLayout, generated from the config's block specs, that renames each sgm
prefix to diffusers' (`input_blocks.1.0.in_layers.0.` -> `down_blocks.0.resnets.0.norm1.`).
Inside a SpatialTransformer both use the seed's names.
"""

from __future__ import annotations

from flax_sgm.convert import KeyLayout
from flax_sgm.unet_config import Attn, ConvIn, Down, Res, UNetConfig, Up

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
    if config.adm_in_channels is not None:
        if vector is None:
            raise ValueError("diffusers_layout: a UNet with a vector embedding needs `vector` (add_embedding or class_embedding)")
        pairs += [("label_emb.0." + a, f"{vector}.{b}") for a, b in EMBEDDING]
    pairs += [("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]

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
                pairs.append((sgm, "conv_in."))
                continue
            pairs += _layer(sgm, layer, place(layer, level, index, down=True))
        if isinstance(block[0], Down):
            level, index = level + 1, 0
        elif not isinstance(block[0], ConvIn):
            index += 1
    resnets = 0
    for m, layer in enumerate(config.middle_block):
        target = f"mid_block.attentions.0." if isinstance(layer, Attn) else f"mid_block.resnets.{resnets}."
        resnets += isinstance(layer, Res)
        pairs += _layer(f"middle_block.{m}.", layer, target)
    n = 0
    for up_level, level in enumerate(reversed(range(config.levels))):
        for index in range(config.num_res_blocks[level] + 1):
            for m, layer in enumerate(config.output_blocks[n]):
                pairs += _layer(f"output_blocks.{n}.{m}.", layer, place(layer, up_level, index, down=False))
            n += 1
    return KeyLayout("diffusers", tuple(pairs))
