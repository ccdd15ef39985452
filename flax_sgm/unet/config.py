"""UNetConfig: sgm's UNetModel architecture, typed and frozen; the UNet is built from it.

Fields keep sgm's names. Everything the model, the key layouts and the loaders need
(each block's layers, channels, heads and depth) is derived here once, as the
`input_blocks`, `middle_block` and `output_blocks` specs. `from_diffusers` reads a
diffusers UNet2DConditionModel config.json (unet_diffusers.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple


from flax_sgm.nn import numerics
from flax_sgm.attention.config import SpatialTransformerConfig
from flax_sgm.attention.remat import DEFAULT_CHECKPOINT_POLICY
from flax_sgm.config_io import ConfigIO
from flax_sgm.unet.diffusers import config_fields

Dtype = Any


# One layer of a block, as sgm's TimestepEmbedSequential holds it.
class ConvIn(NamedTuple):
    in_channels: int
    out_channels: int


class Res(NamedTuple):
    channels: int
    out_channels: int


class Attn(NamedTuple):
    """A SpatialTransformer: what varies per layer (UNetConfig.transformer gives its whole config)."""

    channels: int
    heads: int
    head_dim: int
    depth: int
    disable_self_attn: bool


class Down(NamedTuple):
    channels: int


class Up(NamedTuple):
    channels: int


Layer = ConvIn | Res | Attn | Down | Up


def _tuple(value, n: int, name: str) -> tuple:
    """An int (or bool) for every level, or one per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNetConfig: `{name}` has {len(value)} entries for {n} levels (channel_mult); got {list(value)}")
        return tuple(value)
    return (value,) * n


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"UNetConfig: `{name}` must be a positive int; got {value!r}")


@dataclasses.dataclass(frozen=True)
class UNetConfig(ConfigIO):
    """sgm's UNetModel arguments (2-D, conv resampling, softmax attention).

    transformer_depth: per level (or one int); a level has attention where its
    downsampling rate 2**level is in `attention_resolutions`. transformer_depth_input /
    transformer_depth_output: the depth of each input ResBlock's / output block's stack where
    they differ within a level or between the down and up paths (ComfyUI's names for sgm's
    UNetModel so extended); entries at levels without attention do not count. Heads: `num_heads` (per
    block, width channels // num_heads) or `num_head_channels` (width fixed), the other -1.
    num_classes: None or "sequential" (the vector `y` of width `adm_in_channels`).
    norm_eps: the ResBlocks' and `out`'s GroupNorm (sgm's GroupNorm32: 1e-5); the
    SpatialTransformers keep the seed's 1e-6.
    time_cond_proj_dim: an LCM-distilled UNet's `timestep_cond` width (diffusers' field; sgm has
    none): `time_embed.cond_proj` [time_cond_proj_dim -> model_channels] adds it to the time embedding's input.
    """

    NAME = "UNet"
    OPTIONS = ("use_checkpoint", "checkpoint_policy", "sdp_backend")  # flax_sgm's own fields, which a loader may set

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int | tuple[int, ...] = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None  # default: transformer_depth[-1], as sgm
    # Per layer where a level's blocks differ (SSD-1B, Vega): one depth per input ResBlock, one per output
    # block (sgm's order); default (None): each level's transformer_depth, as sgm.
    transformer_depth_input: tuple[int, ...] | None = None
    transformer_depth_output: tuple[int, ...] | None = None
    num_heads: int = -1
    num_head_channels: int = -1
    context_dim: int | None = None
    use_linear_in_transformer: bool = False
    disable_self_attentions: bool | tuple[bool, ...] = False
    disable_middle_self_attn: bool = False
    use_scale_shift_norm: bool = False
    num_classes: str | None = None
    adm_in_channels: int | None = None
    dropout: float = 0.0
    time_cond_proj_dim: int | None = None  # an LCM UNet's guidance embedding width (diffusers' name); not sgm's
    norm_eps: float = numerics.UNET_GROUP_NORM_EPS
    spatial_transformer_attn_type: str = "softmax"
    use_checkpoint: bool = True
    checkpoint_policy: str = DEFAULT_CHECKPOINT_POLICY
    sdp_backend: str | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("in_channels", "out_channels", "model_channels"):
            _positive(name, getattr(self, name))
        if not self.channel_mult:
            raise ValueError("UNetConfig: `channel_mult` must list at least one level")
        set_("channel_mult", tuple(self.channel_mult))
        n = len(self.channel_mult)
        set_("num_res_blocks", _tuple(self.num_res_blocks, n, "num_res_blocks"))
        set_("transformer_depth", _tuple(self.transformer_depth, n, "transformer_depth"))
        set_("disable_self_attentions", _tuple(self.disable_self_attentions, n, "disable_self_attentions"))
        set_("attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True)))
        for name in ("channel_mult", "num_res_blocks"):
            for v in getattr(self, name):
                _positive(name, v)
        if any(not isinstance(d, int) or d < 0 for d in self.transformer_depth):
            raise ValueError(f"UNetConfig: `transformer_depth` must be ints >= 0; got {list(self.transformer_depth)}")
        if self.transformer_depth_middle is None:
            set_("transformer_depth_middle", self.transformer_depth[-1])
        _positive("transformer_depth_middle", self.transformer_depth_middle)
        for name, output in (("transformer_depth_input", False), ("transformer_depth_output", True)):
            set_(name, self._layer_depths(name, output))
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError(
                f"UNetConfig: set exactly one of `num_heads` and `num_head_channels` (the other -1); "
                f"got {self.num_heads} and {self.num_head_channels}"
            )
        _positive("num_heads" if self.num_heads != -1 else "num_head_channels", max(self.num_heads, self.num_head_channels))
        if self.num_classes not in (None, "sequential"):
            raise ValueError(f"UNetConfig: `num_classes` must be None or 'sequential' (a vector y); got {self.num_classes!r}")
        if (self.num_classes is None) != (self.adm_in_channels is None):
            raise ValueError(
                f"UNetConfig: `adm_in_channels` goes with num_classes='sequential'; got num_classes={self.num_classes!r}, "
                f"adm_in_channels={self.adm_in_channels!r}"
            )
        if self.adm_in_channels is not None:
            _positive("adm_in_channels", self.adm_in_channels)
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"UNetConfig: `norm_eps` must be a positive number; got {self.norm_eps!r}")
        if self.context_dim is not None:
            _positive("context_dim", self.context_dim)
        if self.time_cond_proj_dim is not None:
            _positive("time_cond_proj_dim", self.time_cond_proj_dim)
        for channels in {self.model_channels * m for m in self.channel_mult} | {self.model_channels}:
            if channels % numerics.GROUP_NORM_GROUPS:
                raise ValueError(
                    f"UNetConfig: every level's channels must divide into {numerics.GROUP_NORM_GROUPS} GroupNorm groups; "
                    f"got {channels} (model_channels {self.model_channels}, channel_mult {list(self.channel_mult)})"
                )
        self.input_blocks  # the heads and depths of every block must fit  # noqa: B018

    # Derived values ---------------------------------------------------------

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def level_channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]

    def has_attention(self, level: int) -> bool:
        """sgm: attention where the downsampling rate is listed and the level has transformer blocks."""
        return 2**level in self.attention_resolutions and self.transformer_depth[level] > 0

    def _layer_levels(self, output: bool) -> tuple[int, ...]:
        """The level of each input ResBlock (or output block), in sgm's order."""
        levels = reversed(range(self.levels)) if output else range(self.levels)
        return tuple(lvl for lvl in levels for _ in range(self.num_res_blocks[lvl] + output))

    def _layer_depths(self, name: str, output: bool) -> tuple[int, ...] | None:
        """transformer_depth_input/_output checked and canonical: levels without attention take the level's
        depth, and None when every entry is its level's transformer_depth."""
        value, levels = getattr(self, name), self._layer_levels(output)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != len(levels):
            what = "output block" if output else "input ResBlock"
            raise ValueError(f"UNetConfig: `{name}` must list one depth per {what} ({len(levels)}); got {value!r}")
        default = tuple(self.transformer_depth[lvl] for lvl in levels)
        depths = tuple(d if self.has_attention(lvl) else self.transformer_depth[lvl] for d, lvl in zip(value, levels))
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d, lvl in zip(depths, levels) if self.has_attention(lvl)):
            raise ValueError(f"UNetConfig: `{name}` must be ints >= 1 where a level has attention; got {list(value)}")
        return None if depths == default else depths

    def depths(self, output: bool) -> tuple[int, ...]:
        """Each input ResBlock's (or output block's) stack depth."""
        given = self.transformer_depth_output if output else self.transformer_depth_input
        return given or tuple(self.transformer_depth[lvl] for lvl in self._layer_levels(output))

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a SpatialTransformer over `channels`, as sgm splits them."""
        split = self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels
        if channels % split:
            raise ValueError(f"UNetConfig: {channels} channels do not split into {split} heads")
        return (split, channels // split) if self.num_head_channels == -1 else (split, self.num_head_channels)

    def transformer(self, spec: Attn) -> SpatialTransformerConfig:
        """The SpatialTransformerConfig of an attention layer: its own sizes, the UNet's settings."""
        return SpatialTransformerConfig(
            in_channels=spec.channels,
            heads=spec.heads,
            head_dim=spec.head_dim,
            depth=spec.depth,
            dropout=self.dropout,
            context_dim=self.context_dim,
            disable_self_attn=spec.disable_self_attn,
            use_linear=self.use_linear_in_transformer,
            attn_type=self.spatial_transformer_attn_type,
            use_checkpoint=self.use_checkpoint,
            sdp_backend=self.sdp_backend,
            checkpoint_policy=self.checkpoint_policy,
        )

    def _attention(self, channels: int, depth: int, disable_self_attn: bool) -> Attn:
        if self.num_head_channels != -1 and channels % self.num_head_channels:
            raise ValueError(f"UNetConfig: {channels} channels are not a multiple of num_head_channels {self.num_head_channels}")
        return Attn(channels, *self.heads(channels), depth, disable_self_attn)

    @property
    def input_blocks(self) -> tuple[tuple[Layer, ...], ...]:
        """Each input block's layers, in sgm's order: conv_in, then per level its ResBlocks (+ attention), a Downsample."""
        blocks: list[tuple[Layer, ...]] = [(ConvIn(self.in_channels, self.model_channels),)]
        ch = self.model_channels
        depths = iter(self.depths(output=False))
        for level in range(self.levels):
            out = self.level_channels(level)
            for _ in range(self.num_res_blocks[level]):
                layers: list[Layer] = [Res(ch, out)]
                depth = next(depths)
                if self.has_attention(level):
                    disabled = self.disable_self_attentions[level] and self.context_dim is not None  # sgm's rule
                    layers.append(self._attention(out, depth, disabled))
                blocks.append(tuple(layers))
                ch = out
            if level != self.levels - 1:
                blocks.append((Down(ch),))
        return tuple(blocks)

    @property
    def middle_block(self) -> tuple[Layer, ...]:
        ch = self.level_channels(self.levels - 1)
        attn = self._attention(ch, self.transformer_depth_middle, self.disable_middle_self_attn)
        return (Res(ch, ch), attn, Res(ch, ch))

    @property
    def skip_channels(self) -> tuple[int, ...]:
        """The channels of each input block's output, in order: what the output blocks concatenate."""
        return tuple(block[0].channels if isinstance(block[0], Down) else block[0].out_channels for block in self.input_blocks)

    @property
    def output_blocks(self) -> tuple[tuple[Layer, ...], ...]:
        """Each output block's layers: a ResBlock over the concatenated skip (+ attention), an Upsample closing a level."""
        skips = list(self.skip_channels)
        ch = self.level_channels(self.levels - 1)
        blocks = []
        depths = iter(self.depths(output=True))
        for level in reversed(range(self.levels)):
            out = self.level_channels(level)
            for i in range(self.num_res_blocks[level] + 1):
                layers: list[Layer] = [Res(ch + skips.pop(), out)]
                ch = out
                depth = next(depths)
                if self.has_attention(level):
                    layers.append(self._attention(ch, depth, self.disable_self_attentions[level]))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Up(ch))
                blocks.append(tuple(layers))
        return tuple(blocks)

    @classmethod
    def from_diffusers(cls, config: dict, *, source: str = "config.json", **options) -> UNetConfig:
        """A diffusers UNet2DConditionModel config: every field honoured, refused in one line, or irrelevant to the maths.

        `options` set flax_sgm's own fields (use_checkpoint, checkpoint_policy, sdp_backend).
        """
        return cls(**config_fields(config, source), **options)

    @classmethod
    def preset(cls, name: str, **changes) -> UNetConfig:
        if name not in PRESETS:
            raise ValueError(f"no UNet preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name].replace(**changes)


# The released models (sgm's configs; diffusers' config.json of the same checkpoints agree).
PRESETS = {
    # SD 1.x: 8 heads everywhere, conv projections, CLIP ViT-L context.
    "sd15": UNetConfig(
        model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_heads=8, context_dim=768
    ),
    # SD 2.x: 64-wide heads, linear projections, OpenCLIP ViT-H context.
    "sd21": UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        attention_resolutions=(4, 2, 1),
        num_head_channels=64,
        context_dim=1024,
        use_linear_in_transformer=True,
    ),
    # SDXL base: no attention at level 0, depth 2 and 10, the vector y of 2816 (pooled text + 6 size/crop ids).
    "sdxl-base": UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4),
        attention_resolutions=(4, 2),
        transformer_depth=(1, 2, 10),
        num_head_channels=64,
        context_dim=2048,
        use_linear_in_transformer=True,
        num_classes="sequential",
        adm_in_channels=2816,
    ),
    # SDXL refiner: 384 channels, depth 4 at levels 1 and 2, y of 2560 (pooled text + 5 ids).
    "sdxl-refiner": UNetConfig(
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        attention_resolutions=(4, 2),
        transformer_depth=4,
        num_head_channels=64,
        context_dim=1280,
        use_linear_in_transformer=True,
        num_classes="sequential",
        adm_in_channels=2560,
    ),
}
