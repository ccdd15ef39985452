"""AutoencoderConfig: sgm's KL autoencoder (AutoencodingEngineLegacy's `ddconfig` and `embed_dim`), typed and frozen.

Fields keep sgm's names (`ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`, `z_channels`, `embed_dim`,
`attn_type`); the model is built from the config and imports it, never the other way. `scaling_factor`,
`shift_factor`, `latents_mean`/`latents_std` and `force_upcast` are what a pipeline applies around the
model (diffusers' AutoencoderKL config fields), recorded here with the weights they belong to.
"""

from __future__ import annotations

import dataclasses
from typing import Any


from flax_sgm.autoencoder.diffusers import config_fields
from flax_sgm.config_io import ConfigIO
from flax_sgm.nn import numerics
from flax_sgm.attention.remat import DEFAULT_CHECKPOINT_POLICY

Dtype = Any

# sgm's make_attn: attn_type -> what it builds. "vanilla-xformers" is the same maths as "vanilla" (one
# attention function here). sgm's branch for "memory-efficient-cross-attn" compares the builtin `type`, never
# the argument, so sgm falls through to LinAttnBlock; flax_sgm builds what the branch means, the seed's
# MemoryEfficientCrossAttention as sgm's MemoryEfficientCrossAttentionWrapper (README, seed difference D).
ATTN_TYPES = {
    "vanilla": "vanilla",
    "vanilla-xformers": "vanilla",
    "memory-efficient-cross-attn": "cross",
    "linear": "linear",
    "none": "none",
}

SD_SCALING_FACTOR = 0.18215  # SD 1.x / 2.x
SDXL_SCALING_FACTOR = 0.13025


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"AutoencoderConfig: `{name}` must be a positive int; got {value!r}")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(ConfigIO):
    """sgm's Encoder/Decoder arguments (double_z, conv resampling) and the KL engine's embed_dim.

    attn_resolutions: the image sizes (resolution // 2**level) whose levels have attention after
    each ResnetBlock; the released VAEs have none, only the mid blocks' `attn_1`.
    num_groups: every GroupNorm's groups (sgm's Normalize: 32; diffusers' norm_num_groups).
    use_quant_conv / use_post_quant_conv: diffusers' flags (sgm always has both).
    force_upcast: a float16 model computes in float32 (diffusers' SDXL pipelines upcast the VAE so);
    bfloat16 is left as it is.
    attn_heads / attn_dim_head: the heads of attn_type "memory-efficient-cross-attn" (sgm's attn_kwargs;
    the seed's MemoryEfficientCrossAttention defaults, 8 of 64).
    use_checkpoint: gradient checkpointing per ResnetBlock (training through the decoder).
    tile_sample_size / tile_overlap_factor: tiled encode and decode (`tiled=True`), as diffusers'
    enable_tiling derives them: image tiles of tile_sample_size (diffusers' sample_size), latent tiles of
    that over downsample_factor, overlapping by the factor and blended linearly.
    """

    NAME = "autoencoder"
    OPTIONS = ("use_checkpoint", "checkpoint_policy", "sdp_backend", "force_upcast", "scaling_factor",
               "tile_sample_size", "tile_overlap_factor")  # flax_sgm's own fields, which a loader may set

    in_channels: int = 3
    out_channels: int = 3  # sgm's out_ch
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    dropout: float = 0.0
    attn_type: str = "vanilla"
    attn_heads: int = 8
    attn_dim_head: int = 64
    num_groups: int = numerics.GROUP_NORM_GROUPS
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = SD_SCALING_FACTOR
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = False
    tile_sample_size: int = 512
    tile_overlap_factor: float = 0.25
    use_checkpoint: bool = False
    checkpoint_policy: str = DEFAULT_CHECKPOINT_POLICY
    sdp_backend: str | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "resolution", "z_channels", "embed_dim",
                     "num_groups", "attn_heads", "attn_dim_head", "tile_sample_size"):
            _positive(name, getattr(self, name))
        if not self.ch_mult:
            raise ValueError("AutoencoderConfig: `ch_mult` must list at least one level")
        set_("ch_mult", tuple(self.ch_mult))
        for m in self.ch_mult:
            _positive("ch_mult", m)
        set_("attn_resolutions", tuple(self.attn_resolutions))
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                set_(name, tuple(getattr(self, name)))
        if not 0.0 <= self.tile_overlap_factor < 1.0:
            raise ValueError(f"AutoencoderConfig: `tile_overlap_factor` must be in [0, 1); got {self.tile_overlap_factor!r}")
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"AutoencoderConfig: `attn_type` must be one of {list(ATTN_TYPES)}; got {self.attn_type!r}")
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError(
                f"AutoencoderConfig: without quant_conv, embed_dim ({self.embed_dim}) must be z_channels ({self.z_channels})"
            )
        for c in sorted({self.ch} | {self.ch * m for m in self.ch_mult}):
            if c % self.num_groups:
                raise ValueError(
                    f"AutoencoderConfig: every level's channels must divide into {self.num_groups} GroupNorm groups; "
                    f"got {c} (ch {self.ch}, ch_mult {list(self.ch_mult)})"
                )

    # Derived values ---------------------------------------------------------

    @property
    def levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        """How much smaller than the image a latent is per side (8 for the released VAEs)."""
        return 2 ** (self.levels - 1)

    @property
    def tile_latent_size(self) -> int:
        """diffusers' tile_latent_min_size: int(sample_size / 2 ** (levels - 1))."""
        return int(self.tile_sample_size / self.downsample_factor)

    @property
    def attention(self) -> str:
        """What each attention layer is: "vanilla" (AttnBlock), "linear" (LinAttnBlock), "cross" (sgm's
        MemoryEfficientCrossAttentionWrapper) or "none"."""
        return ATTN_TYPES[self.attn_type]

    def level_channels(self, level: int) -> int:
        return self.ch * self.ch_mult[level]

    def level_in_channels(self, level: int) -> int:
        """An encoder level's input channels (sgm's ch * in_ch_mult[level])."""
        return self.ch if level == 0 else self.level_channels(level - 1)

    def has_attention(self, level: int) -> bool:
        """sgm: attention after each ResnetBlock of a level whose size (curr_res) is in attn_resolutions."""
        return self.resolution // 2**level in self.attn_resolutions

    @classmethod
    def from_diffusers(cls, config: dict, *, source: str = "config.json", **options) -> AutoencoderConfig:
        """A diffusers AutoencoderKL config: every field honoured, refused in one line, or irrelevant to the maths.

        `options` set flax_sgm's own fields (use_checkpoint, checkpoint_policy, sdp_backend) or override one
        (scaling_factor).
        """
        return cls(**(config_fields(config, source) | options))

    @classmethod
    def preset(cls, name: str, **changes) -> AutoencoderConfig:
        if name not in PRESETS:
            raise ValueError(f"no autoencoder preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name].replace(**changes)


# The released KL-f8 VAEs: one architecture, the scaling factor and the float16 behaviour differ.
PRESETS = {
    # SD 1.x and 2.x (sgm's first_stage_config; diffusers' vae/config.json of the same checkpoints, which leave
    # force_upcast at diffusers' default, true).
    "sd": AutoencoderConfig(scaling_factor=SD_SCALING_FACTOR, force_upcast=True, tile_sample_size=512),
    # SDXL base and refiner: the original VAE overflows in float16, so it decodes in float32.
    "sdxl": AutoencoderConfig(scaling_factor=SDXL_SCALING_FACTOR, force_upcast=True, tile_sample_size=1024),
    # madebyollin's sdxl-vae-fp16-fix: the same shapes, fine-tuned to stay in float16's range.
    "sdxl-fp16-fix": AutoencoderConfig(scaling_factor=SDXL_SCALING_FACTOR, force_upcast=False, tile_sample_size=512),
}
