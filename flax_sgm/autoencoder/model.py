"""sgm's KL autoencoder: Encoder, Decoder, the diagonal Gaussian posterior, AutoencoderKL.

Channels-last: images [b, h, w, in_channels] in [-1, 1], latents [b, h / f, w / f, embed_dim] with
f = config.downsample_factor. Built from an AutoencoderConfig; attribute names are sgm's
(`encoder.down.N.block.M`, `downsample.conv`, `mid.block_1`, `mid.attn_1`, `norm_out`, `conv_out`,
`decoder.up.N.upsample.conv`, `quant_conv`, `post_quant_conv`), so sgm's single-file table is the identity
(autoencoder/layout.py holds diffusers' names). The mid-block attention goes through the one attention
function (chunked on CPU where the logits would not fit, cuDNN on GPU). No scaling: the pipeline applies
config.scaling_factor and shift_factor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_sgm.nn import numerics
from flax_sgm.attention.modules import LinearAttention, MemoryEfficientCrossAttention
from flax_sgm.attention.backends import dot_product_attention
from flax_sgm.attention.policy import resolve_backend
from flax_sgm.autoencoder.config import AutoencoderConfig
from flax_sgm.attention.blocks import maybe_checkpointed
from flax_sgm.nn.checks import expect_array
from flax_sgm.nn.primitives import Conv, Dropout, GroupNorm
from flax_sgm.attention.remat import check_policy

Dtype = Any
LOGVAR_RANGE = (-30.0, 20.0)  # sgm's DiagonalGaussianDistribution clamps logvar so (diffusers too)


class ResnetBlock(nnx.Module):
    """norm1, SiLU, conv1, norm2, SiLU, dropout, conv2, plus the input (through a 1x1 `nin_shortcut`, or a 3x3
    `conv_shortcut`, where the channels change). The autoencoder's has no timestep embedding (temb_channels 0)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        *,
        num_groups: int = numerics.GROUP_NORM_GROUPS,
        checkpoint: bool = False,
        checkpoint_policy: str = "recompute",
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.checkpoint, self.checkpoint_policy = checkpoint, check_policy(checkpoint_policy)
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(in_channels, num_groups=num_groups, **layer)
        self.conv1 = Conv(in_channels, out_channels, kernel_size=3, axes=("channels", "channels"), **layer)
        self.norm2 = GroupNorm(out_channels, num_groups=num_groups, **layer)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.conv2 = Conv(out_channels, out_channels, kernel_size=3, axes=("channels", "channels"), **layer)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = Conv(in_channels, out_channels, kernel_size=3, axes=("channels", "channels"), **layer)
            else:
                self.nin_shortcut = Conv(in_channels, out_channels, kernel_size=1, axes=("channels", "channels"), **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        return maybe_checkpointed(self, type(self)._forward, x)

    def _forward(self, x: jax.Array) -> jax.Array:
        h = self.conv1(numerics.silu(self.norm1(x)))
        h = self.conv2(self.dropout(numerics.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        elif hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after sgm's asymmetric zero pad: one row and column at the bottom and right only."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        # torch: F.pad(x, (0, 1, 0, 1)) then Conv2d(stride=2, padding=0); the same as padding ((0, 1), (0, 1)).
        self.conv = Conv(in_channels, in_channels, kernel_size=3, axes=("channels", "channels"), strides=2,
                            padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 (each pixel repeated, as torch's interpolate(mode="nearest")), then a 3x3 conv."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.conv = Conv(in_channels, in_channels, kernel_size=3, axes=("channels", "channels"), rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [b, 2h, 2w, c]
        return self.conv(x)


class AttnBlock(nnx.Module):
    """sgm's AttnBlock (and MemoryEfficientAttnBlock, the same maths): one-head self-attention over every pixel,
    q, k, v and proj_out 1x1 convs, scale c ** -0.5, with a residual."""

    def __init__(
        self,
        in_channels: int,
        *,
        num_groups: int = numerics.GROUP_NORM_GROUPS,
        backend=None,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.in_channels = in_channels
        self.backend = resolve_backend(backend)
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = GroupNorm(in_channels, num_groups=num_groups, **layer)
        # One head of in_channels features: nothing to split by heads.
        self.q = Conv(in_channels, in_channels, kernel_size=1, axes=("channels", None), **layer)
        self.k = Conv(in_channels, in_channels, kernel_size=1, axes=("channels", None), **layer)
        self.v = Conv(in_channels, in_channels, kernel_size=1, axes=("channels", None), **layer)
        self.proj_out = Conv(in_channels, in_channels, kernel_size=1, axes=(None, "channels"), **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        h_ = self.norm(x)
        q, k, v = (proj(h_).reshape(b, h * w, 1, c) for proj in (self.q, self.k, self.v))  # [b, n, 1, c]
        out = dot_product_attention(q, k, v, scale=numerics.attention_scale(c), backend=self.backend)
        return x + self.proj_out(out.reshape(b, h, w, c))


class LinAttnBlock(LinearAttention):
    """sgm's LinAttnBlock: the seed's LinearAttention with one head of in_channels (no norm, no residual)."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        super().__init__(in_channels, heads=1, dim_head=in_channels, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class MemoryEfficientCrossAttentionWrapper(MemoryEfficientCrossAttention):
    """sgm's wrapper: the seed's MemoryEfficientCrossAttention over an image's pixels (self-attention, no
    norm), plus the image. sgm adds the input after flattening it to [b, h*w, c], which cannot broadcast
    against the [b, c, h, w] output; the residual here is the image itself, as intended."""

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        out = super().__call__(x.reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


def make_attn(config: AutoencoderConfig, in_channels: int, **layer) -> nnx.Module | None:
    """sgm's make_attn as meant: the attention layer config.attn_type builds (None for "none", sgm's
    nn.Identity). "memory-efficient-cross-attn" builds the cross-attention wrapper, which sgm never reaches."""
    if config.attention == "vanilla":
        return AttnBlock(in_channels, num_groups=config.num_groups, backend=config.sdp_backend, **layer)
    if config.attention == "linear":
        return LinAttnBlock(in_channels, **layer)
    if config.attention == "cross":
        return MemoryEfficientCrossAttentionWrapper(in_channels, heads=config.attn_heads, dim_head=config.attn_dim_head,
                                                    **layer)
    return None


def _resnet(config: AutoencoderConfig, in_channels: int, out_channels: int, **layer) -> ResnetBlock:
    return ResnetBlock(in_channels, out_channels, dropout=config.dropout, num_groups=config.num_groups,
                       checkpoint=config.use_checkpoint, checkpoint_policy=config.checkpoint_policy, **layer)


class Level(nnx.Module):
    """One level of the encoder or decoder: `block` (ResnetBlocks), `attn` (one after each, where the level has
    attention; empty otherwise) and its resampler (`downsample` or `upsample`, absent at the last level)."""

    def __init__(self, blocks: list, attns: list, **resampler):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        for name, module in resampler.items():
            setattr(self, name, module)

    def __call__(self, h: jax.Array) -> jax.Array:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class Mid(nnx.Module):
    """block_1, attn_1 (absent for attn_type "none"), block_2."""

    def __init__(self, config: AutoencoderConfig, channels: int, **layer):
        self.block_1 = _resnet(config, channels, channels, **layer)
        attn = make_attn(config, channels, **layer)
        if attn is not None:
            self.attn_1 = attn
        self.block_2 = _resnet(config, channels, channels, **layer)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = self.block_1(h)
        if hasattr(self, "attn_1"):
            h = self.attn_1(h)
        return self.block_2(h)


class Encoder(nnx.Module):
    """Image [b, h, w, in_channels] -> moments [b, h / f, w / f, 2 * z_channels] (mean and logvar, double_z)."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = Conv(config.in_channels, config.ch, kernel_size=3, axes=(None, "channels"), **layer)
        levels = []
        for level in range(config.levels):
            c_in, c_out = config.level_in_channels(level), config.level_channels(level)
            blocks = [_resnet(config, c_in if i == 0 else c_out, c_out, **layer) for i in range(config.num_res_blocks)]
            attns = [make_attn(config, c_out, **layer) for _ in blocks] if config.has_attention(level) else []
            down = {"downsample": Downsample(c_out, **layer)} if level != config.levels - 1 else {}
            levels.append(Level(blocks, [a for a in attns if a is not None], **down))
        self.down = nnx.List(levels)
        top = config.level_channels(config.levels - 1)
        self.mid = Mid(config, top, **layer)
        self.norm_out = GroupNorm(top, num_groups=config.num_groups, **layer)
        self.conv_out = Conv(top, 2 * config.z_channels, kernel_size=3, axes=("channels", None), **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(numerics.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """Latent [b, h, w, z_channels] -> image [b, h * f, w * f, out_channels]. `up` is indexed by level as sgm's
    (up.0 the full-size level) and runs from the last level down."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        top = config.level_channels(config.levels - 1)
        self.conv_in = Conv(config.z_channels, top, kernel_size=3, axes=(None, "channels"), **layer)
        self.mid = Mid(config, top, **layer)
        levels = [None] * config.levels
        c_in = top
        for level in reversed(range(config.levels)):
            c_out = config.level_channels(level)
            blocks = [_resnet(config, c_in if i == 0 else c_out, c_out, **layer) for i in range(config.num_res_blocks + 1)]
            attns = [make_attn(config, c_out, **layer) for _ in blocks] if config.has_attention(level) else []
            up = {"upsample": Upsample(c_out, **layer)} if level != 0 else {}
            levels[level] = Level(blocks, [a for a in attns if a is not None], **up)
            c_in = c_out
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(config.ch, num_groups=config.num_groups, **layer)
        self.conv_out = Conv(config.ch, config.out_channels, kernel_size=3, axes=("channels", None), **layer)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)
        return self.conv_out(numerics.silu(self.norm_out(h)))


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """diffusers' blend_v (axis 1) / blend_h (axis 2): b's first `extent` rows fade in from a's last ones,
    weights y / extent computed in float64 and cast, as torch multiplies by a Python float."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    ramp = np.arange(extent) / extent
    keep, take = ((1 - ramp).reshape(shape).astype(b.dtype), ramp.reshape(shape).astype(b.dtype))
    head = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * keep
    head = head + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * take
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def _tiled(fn, x: jax.Array, tile: int, stride: int, extent: int, limit: int) -> jax.Array:
    """diffusers' tiled encode/decode: `fn` of each tile of `x` (tile x tile, every `stride`), each blended
    with its (already blended) upper and left neighbours over `extent`, cropped to `limit` and joined."""
    h, w = x.shape[1:3]
    rows = [[fn(x[:, i : i + tile, j : j + tile]) for j in range(0, w, stride)] for i in range(0, h, stride)]
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], extent, 1)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], extent, 2)
    return jnp.concatenate([jnp.concatenate([t[:, :limit, :limit] for t in row], axis=2) for row in rows], axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """sgm's DiagonalGaussianDistribution over latents [b, h, w, c] (diffusers' `latent_dist`): a pytree, so
    encode's result passes through jax.jit and jax.vmap."""

    mean: jax.Array
    logvar: jax.Array  # clamped to LOGVAR_RANGE

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Moments [b, h, w, 2c]: the mean's channels, then the log-variance's (torch's chunk(2, dim=1))."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * noise, the noise drawn from `key` (a jax.random key)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """KL(self || other) per image [b], summed over h, w, c; against N(0, 1) when `other` is None."""
        if other is None:
            terms = self.mean**2 + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


class AutoencoderKL(nnx.Module):
    """sgm's AutoencodingEngineLegacy (KL): encoder, quant_conv, the posterior, post_quant_conv, decoder.

    encode(image) -> DiagonalGaussian; decode(latent) -> image; model(image) decodes the posterior's mode
    (or a sample, with `key`). Images NHWC in [-1, 1]. A float16 model whose config says force_upcast
    computes in float32 (its float16 weights upcast), as diffusers' SDXL pipelines run the VAE.
    """

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.config = config
        if config.force_upcast and jnp.dtype(dtype or param_dtype) == jnp.float16:
            dtype = jnp.float32
        self.dtype = dtype
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder = Encoder(config, **layer)
        self.decoder = Decoder(config, **layer)
        if config.use_quant_conv:
            self.quant_conv = Conv(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1, axes=(None, None), **layer)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv(config.embed_dim, config.z_channels, kernel_size=1, axes=(None, None), **layer)

    def encode(self, x: jax.Array, *, tiled: bool = False) -> DiagonalGaussian:
        """The posterior of images [b, h, w, in_channels] (h and w multiples of config.downsample_factor).

        tiled: an image larger than config.tile_sample_size is encoded tile by tile, the tiles' moments
        blended where they overlap (diffusers' enable_tiling; not equal to the untiled result, docs/autoencoder.md).
        """
        self._check("encode", "x", x, self.config.in_channels, self.config.downsample_factor, "image")
        c = self.config
        if tiled and max(x.shape[1:3]) > c.tile_sample_size:
            extent = int(c.tile_latent_size * c.tile_overlap_factor)
            moments = _tiled(self._moments, x, c.tile_sample_size, int(c.tile_sample_size * (1 - c.tile_overlap_factor)),
                             extent, c.tile_latent_size - extent)
        else:
            moments = self._moments(x)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array, *, tiled: bool = False) -> jax.Array:
        """Images [b, h * f, w * f, out_channels] of latents [b, h, w, embed_dim].

        tiled: a latent larger than config.tile_latent_size is decoded tile by tile, blended as diffusers'.
        """
        self._check("decode", "z", z, self.config.embed_dim, 1, "latent")
        c = self.config
        if tiled and max(z.shape[1:3]) > c.tile_latent_size:
            extent = int(c.tile_sample_size * c.tile_overlap_factor)
            return _tiled(self._decoded, z, c.tile_latent_size, int(c.tile_latent_size * (1 - c.tile_overlap_factor)),
                          extent, c.tile_sample_size - extent)
        return self._decoded(z)

    def _moments(self, x: jax.Array) -> jax.Array:
        moments = self.encoder(x)
        return self.quant_conv(moments) if hasattr(self, "quant_conv") else moments

    def _decoded(self, z: jax.Array) -> jax.Array:
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """decode(encode(x)): the posterior's mode, or a sample drawn with `key` (sgm's sample_posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    def _check(self, method: str, arg: str, x, channels: int, factor: int, what: str) -> None:
        """One line for a wrong rank, channel count, layout (NCHW) or size, before XLA sees it."""
        module = f"AutoencoderKL.{method}"
        expect_array(module, arg, x)
        dtype = getattr(x, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):  # uint8 pixels ran as they were
            scale = " in [-1, 1] (uint8 pixels: x / 127.5 - 1)" if what == "image" else ""
            raise ValueError(f"{module}: `{arg}` must be floats{scale}; got {jnp.dtype(dtype).name}")
        shape = tuple(jnp.shape(x))
        if len(shape) != 4:
            raise ValueError(f"{module}: `{arg}` must be a batch of {what}s [b, h, w, {channels}]; got shape {list(shape)}")
        if shape[-1] != channels:
            nchw = " (NCHW? flax_sgm is channels-last: x.transpose(0, 2, 3, 1))" if shape[1] == channels else ""
            raise ValueError(
                f"{module}: `{arg}` must have {channels} channels last, [b, h, w, {channels}]; got shape {list(shape)}{nchw}"
            )
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"{module}: `{arg}`'s height and width must be multiples of {factor} (the encoder halves them "
                f"{self.config.levels - 1} times); got {shape[1]} x {shape[2]}"
            )
