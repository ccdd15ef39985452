"""sgm's UNetModel: timestep and vector embeddings, ResBlocks, SpatialTransformers, down- and upsampling.

Channels-last: x [b, h, w, in_channels] -> [b, h, w, out_channels]. The model is
built from a UNetConfig, whose block specs say every layer; attribute names are
sgm's (`time_embed`, `label_emb`, `input_blocks`, `middle_block`, `output_blocks`,
`out`; a ResBlock's `in_layers`, `emb_layers`, `out_layers`, `skip_connection`), and
Each layer class's `torch_names` holds the nn.Sequential indices of sgm's state_dict.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_sgm.nn import numerics
from flax_sgm.attention.blocks import maybe_checkpointed
from flax_sgm.nn.checks import expect_numbers, expect_shape
from flax_sgm.nn.primitives import Conv, Dropout, GroupNorm, Linear
from flax_sgm.attention.remat import check_policy
from flax_sgm.sharding import IMAGE, constrain
from flax_sgm.attention.transformer import SpatialTransformer
from flax_sgm.unet.config import Attn, ConvIn, Down, Res, UNetConfig, Up

Dtype = Any
MAX_PERIOD = 10000  # sgm's timestep_embedding


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: int = MAX_PERIOD) -> jax.Array:
    """sgm's sinusoidal embedding [b] -> [b, dim] in float32: cos then sin (diffusers: flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None]  # [b, half]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


def sdxl_vector(pooled: jax.Array, time_ids: jax.Array, dim: int = 256) -> jax.Array:
    """SDXL's `y`: pooled text embeddings [b, p] beside each size/crop id [b, k] embedded by `dim` sinusoids.

    What sgm's conditioner (ConcatTimestepEmbedderND) and diffusers' `added_cond_kwargs`
    (text_embeds, time_ids through add_time_proj) give: [b, p + k * dim]. SDXL base: k = 6
    (original size, crop top-left, target size), the refiner k = 5 (with the aesthetic score).
    """
    pooled, time_ids = expect_numbers("sdxl_vector", "pooled", pooled), expect_numbers("sdxl_vector", "time_ids", time_ids)
    expect_shape("sdxl_vector", "time_ids", time_ids, ("b", "k"))
    b, k = time_ids.shape
    expect_shape("sdxl_vector", "pooled", pooled, (b, "p"))
    ids = timestep_embedding(time_ids.reshape(-1), dim).reshape(b, k * dim)
    return jnp.concatenate([pooled.astype(jnp.float32), ids], axis=-1).astype(jnp.result_type(pooled.dtype, jnp.float32))


GUIDANCE_SCALE = 1000.0  # diffusers' LCM pipelines scale w by 1000 before embedding it


def guidance_scale_embedding(w, dim: int = 512, dtype=jnp.float32) -> jax.Array:
    """An LCM UNet's `timestep_cond`: w [b] -> [b, dim], as diffusers' LatentConsistencyModelPipeline's
    get_guidance_scale_embedding computes it (w * 1000, `dim // 2` frequencies 10000 ** (-i / (dim // 2 - 1)),
    sin then cos, a zero column when `dim` is odd). The pipelines pass w = guidance_scale - 1; `dim` is
    the UNet's time_cond_proj_dim.
    """
    w = expect_numbers("guidance_scale_embedding", "w", w)
    expect_shape("guidance_scale_embedding", "w", w, ("b",))
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 4:
        raise ValueError(f"guidance_scale_embedding: `dim` must be an int >= 4; got {dim!r}")
    half = dim // 2
    w = jnp.asarray(w, jnp.float32) * GUIDANCE_SCALE
    step = jnp.log(jnp.float32(MAX_PERIOD)) / (half - 1)  # float32 op for op, as diffusers computes it
    args = w.astype(dtype)[:, None] * jnp.exp(jnp.arange(half, dtype=dtype) * -step.astype(dtype))[None]
    embedding = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


class EmbeddingMLP(nnx.Module):
    """Linear, SiLU, Linear: sgm's `time_embed` and the inside of `label_emb`.

    `cond_dim`: an LCM UNet's `cond_proj` (diffusers' TimestepEmbedding cond_proj, no bias), the
    condition [b, cond_dim] projected and added to the input before linear_1.
    """

    torch_names = {"linear_1": "0", "linear_2": "2"}  # nn.Sequential(Linear, SiLU, Linear)

    def __init__(self, in_features: int, features: int, *, cond_dim: int | None = None, rngs: nnx.Rngs, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32):
        layer = dict(axes=("embed", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = Linear(in_features, features, **layer)
        self.linear_2 = Linear(features, features, **layer)
        self.cond_proj = None if cond_dim is None else Linear(cond_dim, in_features, use_bias=False, **layer)

    def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(numerics.silu(self.linear_1(x)))


class LabelEmbedding(nnx.Module):
    """sgm's `label_emb` for num_classes="sequential": the vector y [b, adm_in_channels] -> [b, time_embed_dim]."""

    torch_names = {"mlp": "0"}  # nn.Sequential(nn.Sequential(Linear, SiLU, Linear))

    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.mlp = EmbeddingMLP(in_features, features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, y: jax.Array) -> jax.Array:
        return self.mlp(y)


class NormActConv(nnx.Module):
    """GroupNorm32, SiLU, 3x3 conv: a ResBlock's `in_layers` and the UNet's `out`."""

    torch_names = {"norm": "0", "conv": "2"}  # nn.Sequential(GroupNorm32, SiLU, conv)

    def __init__(
        self,
        channels: int,
        out_channels: int,
        *,
        eps: float,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = GroupNorm(channels, epsilon=eps, **layer)
        self.conv = Conv(channels, out_channels, kernel_size=3, axes=("channels", "channels"), **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(numerics.silu(self.norm(x)))


class NormActDropoutConv(nnx.Module):
    """GroupNorm32, SiLU, dropout, 3x3 conv: a ResBlock's `out_layers` (`norm` alone for scale-shift)."""

    torch_names = {"norm": "0", "conv": "3"}  # nn.Sequential(GroupNorm32, SiLU, Dropout, conv)

    def __init__(
        self, channels: int, *, eps: float, dropout: float, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32
    ):
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = GroupNorm(channels, epsilon=eps, **layer)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.conv = Conv(channels, channels, kernel_size=3, axes=("channels", "channels"), **layer)

    def __call__(self, x: jax.Array, scale_shift: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        h = self.norm(x)
        if scale_shift is not None:  # in float32: the gradients of scale and shift sum over every pixel
            h = numerics.in_float32(lambda h, scale, shift: h * (1 + scale) + shift, h, *scale_shift)
        return self.conv(self.dropout(numerics.silu(h)))


class ActLinear(nnx.Module):
    """SiLU, Linear: a ResBlock's `emb_layers`."""

    torch_names = {"linear": "1"}  # nn.Sequential(SiLU, Linear)

    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.linear = Linear(in_features, features, axes=("embed", "channels"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, emb: jax.Array) -> jax.Array:
        return self.linear(numerics.silu(emb))


class ResBlock(nnx.Module):
    """sgm's ResBlock: in_layers, the embedding added (or scale-shift of the out norm), out_layers, skip.

    x [b, h, w, channels], emb [b, emb_channels] -> [b, h, w, out_channels]; the skip is a
    1x1 conv when the channels change.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = True,
        *,
        eps: float,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        checkpoint_policy: str,
    ):
        out_channels = out_channels or channels
        self.channels, self.out_channels = channels, out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.checkpoint, self.checkpoint_policy = use_checkpoint, check_policy(checkpoint_policy)
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_layers = NormActConv(channels, out_channels, eps=eps, **layer)
        self.emb_layers = ActLinear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels, **layer)
        self.out_layers = NormActDropoutConv(out_channels, eps=eps, dropout=dropout, **layer)
        same = out_channels == channels
        self.skip_connection = None if same else Conv(channels, out_channels, kernel_size=1, axes=("channels", "channels"), **layer)

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        expect_shape("ResBlock", "x", x, ("b", "h", "w", self.channels))
        return maybe_checkpointed(self, type(self)._forward, x, emb)

    def _forward(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).astype(h.dtype)[:, None, None, :]  # [b, 1, 1, c or 2c]
        if self.use_scale_shift_norm:
            h = self.out_layers(h, scale_shift=tuple(jnp.split(emb_out, 2, axis=-1)))
        else:
            h = self.out_layers(numerics.in_float32(jnp.add, h, emb_out))  # emb_out's gradient sums over every pixel
        skip = x if self.skip_connection is None else self.skip_connection(x)
        return constrain(skip + h, IMAGE)


class Downsample(nnx.Module):
    """A stride-2 3x3 conv (padding 1): sgm's Downsample with conv_resample."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.op = Conv(channels, channels, kernel_size=3, axes=("channels", "channels"), strides=2, **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.op(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv: sgm's Upsample with conv_resample."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.conv = Conv(channels, channels, kernel_size=3, axes=("channels", "channels"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [b, 2h, 2w, c]
        return self.conv(x)


def _run(layers: nnx.List, h: jax.Array, emb: jax.Array, context) -> jax.Array:
    """sgm's TimestepEmbedSequential: ResBlocks take the embedding, SpatialTransformers the context."""
    for layer in layers:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context)
        else:
            h = layer(h)
    return h


class UNetModel(nnx.Module):
    """sgm's UNetModel, built from `config`: unet(x, timesteps, context=None, y=None), NHWC in and out.

    x [b, h, w, in_channels], h and w divisible by 2 ** (levels - 1); timesteps [b] (or a
    scalar for every item); context [b, m, context_dim]; y [b, adm_in_channels] when the
    config has num_classes="sequential" (SDXL: `sdxl_vector`), else None; timestep_cond
    [b, time_cond_proj_dim] for an LCM UNet (`guidance_scale_embedding`), added to the time
    embedding's input through `time_embed.cond_proj`; left out, it is skipped, as diffusers does.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        if not isinstance(config, UNetConfig):
            raise ValueError(f"UNetModel: `config` must be a UNetConfig; got {type(config).__name__}")
        self.config = config
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        emb_dim = config.time_embed_dim
        self.time_embed = EmbeddingMLP(config.model_channels, emb_dim, cond_dim=config.time_cond_proj_dim, **layer)
        self.label_emb = LabelEmbedding(config.adm_in_channels, emb_dim, **layer) if config.adm_in_channels else None

        def build(spec):
            if isinstance(spec, ConvIn):
                return Conv(spec.in_channels, spec.out_channels, kernel_size=3, axes=("channels", "channels"), **layer)
            if isinstance(spec, Res):
                return ResBlock(
                    spec.channels,
                    emb_dim,
                    config.dropout,
                    spec.out_channels,
                    config.use_scale_shift_norm,
                    config.use_checkpoint,
                    eps=config.norm_eps,
                    checkpoint_policy=config.checkpoint_policy,
                    **layer,
                )
            if isinstance(spec, Attn):
                return SpatialTransformer.from_config(config.transformer(spec), **layer)
            return (Downsample if isinstance(spec, Down) else Upsample)(spec.channels, **layer)

        self.input_blocks = nnx.List([nnx.List([build(s) for s in block]) for block in config.input_blocks])
        self.middle_block = nnx.List([build(s) for s in config.middle_block])
        self.output_blocks = nnx.List([nnx.List([build(s) for s in block]) for block in config.output_blocks])
        self.out = NormActConv(config.model_channels, config.out_channels, eps=config.norm_eps, **layer)

    def __call__(self, x: jax.Array, timesteps, context: jax.Array | None = None, y: jax.Array | None = None,
                 timestep_cond: jax.Array | None = None) -> jax.Array:
        c = self.config
        x, timesteps = expect_numbers("UNetModel", "x", x), expect_numbers("UNetModel", "timesteps", timesteps)
        context = None if context is None else expect_numbers("UNetModel", "context", context)
        y = None if y is None else expect_numbers("UNetModel", "y", y)
        expect_shape("UNetModel", "x", x, ("b", "h", "w", c.in_channels))
        b, h, w, _ = x.shape
        factor = 2 ** (c.levels - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"UNetModel: `x`'s height and width must be multiples of {factor} (2 ** (levels - 1)); got {h} x {w}"
            )
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,)) if jnp.ndim(timesteps) == 0 else timesteps
        expect_shape("UNetModel", "timesteps", timesteps, (b,))
        if c.context_dim is not None:
            if context is None:
                raise ValueError(f"UNetModel: this model has cross-attention: `context` [b, m, {c.context_dim}] is required")
            expect_shape("UNetModel", "context", context, (b, "m", c.context_dim))
        if (y is None) != (self.label_emb is None):
            needs = f"`y` [b, {c.adm_in_channels}] (num_classes='sequential')" if self.label_emb else "no `y` (no num_classes)"
            raise ValueError(f"UNetModel: this model takes {needs}; got {'None' if y is None else 'y'}")
        if y is not None:
            expect_shape("UNetModel", "y", y, (b, c.adm_in_channels))
        if timestep_cond is not None:
            if c.time_cond_proj_dim is None:
                raise ValueError("UNetModel: this model takes no `timestep_cond` (no time_cond_proj_dim: not an LCM UNet)")
            timestep_cond = expect_numbers("UNetModel", "timestep_cond", timestep_cond)
            expect_shape("UNetModel", "timestep_cond", timestep_cond, (b, c.time_cond_proj_dim))
        emb = self.time_embed(timestep_embedding(timesteps, c.model_channels).astype(x.dtype), timestep_cond)
        if y is not None:
            emb = emb + self.label_emb(y)
        hs = []
        hidden = x
        for block in self.input_blocks:
            hidden = _run(block, hidden, emb, context)
            hs.append(hidden)
        hidden = _run(self.middle_block, hidden, emb, context)
        for block in self.output_blocks:
            hidden = jnp.concatenate([hidden, hs.pop()], axis=-1)  # sgm's th.cat on channels
            hidden = _run(block, hidden, emb, context)
        return self.out(hidden.astype(x.dtype))
