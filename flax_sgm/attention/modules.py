"""Attention modules: CrossAttention (and its xformers-named twin), LinearAttention, SpatialSelfAttention.

Softmax attention goes through `attention_backends.dot_product_attention`; the
backend is chosen there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flax_sgm.nn import numerics
from flax_sgm.attention.backends import dot_product_attention
from flax_sgm.attention.policy import ATTENTION_OUT, resolve_backend
from flax_sgm.nn.checks import expect_broadcastable, expect_shape
from flax_sgm.nn.primitives import Conv, Dropout, Linear, Normalize
from flax_sgm.sharding import constrain

Dtype = Any


class CrossAttention(nnx.Module):
    """Multi-head attention of `x` [b, n, query_dim] over `context` [b, m, context_dim] (default: x).

    `mask` broadcasts to [b, heads, n (+ additional tokens), m]: boolean keeps, float adds.
    `additional_tokens` [b, n_add, query_dim] are prepended to x and stripped from the output.
    `n_times_crossframe_attn_in_self=n`: each group of n consecutive batch items
    attends to the keys and values of its first item.
    """

    torch_names = {"to_out": "to_out.0"}  # nn.Sequential(Linear, Dropout)

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend=None,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.query_dim, self.context_dim = query_dim, context_dim
        self.heads, self.head_dim = heads, dim_head
        self.scale = numerics.attention_scale(dim_head)
        self.backend = resolve_backend(backend)
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # Tensor parallel: q, k, v split by output features (whole heads), to_out by input features.
        self.to_q = Linear(query_dim, inner_dim, axes=("embed", "heads"), use_bias=False, **layer)
        self.to_k = Linear(context_dim, inner_dim, axes=("embed", "heads"), use_bias=False, **layer)
        self.to_v = Linear(context_dim, inner_dim, axes=("embed", "heads"), use_bias=False, **layer)
        self.to_out = Linear(inner_dim, query_dim, axes=("heads", "embed"), **layer)  # torch: to_out.0
        self.out_dropout = Dropout(dropout, rngs=rngs)  # torch: to_out.1

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        mask: jax.Array | None = None,
        additional_tokens: jax.Array | None = None,
        n_times_crossframe_attn_in_self: int = 0,
    ) -> jax.Array:
        name = type(self).__name__
        expect_shape(name, "x", x, ("b", "n", self.query_dim))
        b = x.shape[0]
        n_add = 0
        if additional_tokens is not None:
            expect_shape(name, "additional_tokens", additional_tokens, (b, "n_add", self.query_dim))
            n_add = additional_tokens.shape[1]
            x = jnp.concatenate([additional_tokens.astype(x.dtype), x], axis=1)
        if context is None:
            if self.context_dim != self.query_dim:
                raise ValueError(
                    f"{name}: `context` is required: context_dim {self.context_dim} differs from query_dim {self.query_dim}"
                )
            context = x
        expect_shape(name, "context", context, (b, "m", self.context_dim))
        n, m = x.shape[1], context.shape[1]
        if mask is not None:
            if not 2 <= jnp.ndim(mask) <= 4:  # torch SDPA takes 2-d to 4-d masks
                raise ValueError(f"{name}: `mask` must have rank 2 to 4, [(b,) (heads,) n, m]; got shape {list(jnp.shape(mask))}")
            expect_broadcastable(name, "mask", jnp.shape(mask), (b, self.heads, n, m), "[b, heads, n, m] =")

        q = self.to_q(x).reshape(b, n, self.heads, self.head_dim)  # [b, n, heads, head_dim]
        k = self.to_k(context).reshape(b, m, self.heads, self.head_dim)  # [b, m, heads, head_dim]
        v = self.to_v(context).reshape(b, m, self.heads, self.head_dim)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k, v = (constrain(t, ("batch", "kv_length", "heads", "head_dim")) for t in (k, v))

        if n_times_crossframe_attn_in_self:
            k, v = (first_frame_repeated(name, t, n_times_crossframe_attn_in_self) for t in (k, v))

        out = dot_product_attention(q, k, v, mask, scale=self.scale, backend=self.backend)
        out = constrain(out.reshape(b, n, self.heads * self.head_dim), ("batch", "length", "heads"))
        out = checkpoint_name(out, ATTENTION_OUT)
        out = out[:, n_add:]
        return self.out_dropout(self.to_out(out))


def first_frame_repeated(module: str, t: jax.Array, n: int) -> jax.Array:
    """Cross-frame attention: [(g n), ...] -> each group of n repeats its first item."""
    b = t.shape[0]
    if b % n:
        raise ValueError(
            f"{module}: the batch ({b}) must be divisible by n_times_crossframe_attn_in_self ({n})"
        )
    return jnp.repeat(t[::n], n, axis=0)


class MemoryEfficientCrossAttention(CrossAttention):
    """The seed's xformers class: the same attention with backend "auto".

    Unlike the seed it takes masks, and its cross-frame attention is the same as
    CrossAttention's. `backend` (which the seed's BasicTransformerBlock passes and its
    xformers class ignores) is ignored too; any other argument is a TypeError.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        backend=None,
    ):
        del backend  # "auto" always, as the seed's xformers class
        super().__init__(
            query_dim, context_dim, heads, dim_head, dropout, "auto", rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )


class LinearAttention(nnx.Module):
    """Softmax over tokens on the keys, then context = k v^T; channels-last [b, h, w, dim]."""

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        dim_head: int = 32,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.dim, self.heads, self.head_dim = dim, heads, dim_head
        hidden_dim = dim_head * heads
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # (qkv heads c) features: one split would cut across q, k and v, so not split.
        self.to_qkv = Conv(dim, hidden_dim * 3, kernel_size=1, axes=("channels", None), use_bias=False, **layer)
        self.to_out = Conv(hidden_dim, dim, kernel_size=1, axes=(None, "channels"), **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        expect_shape("LinearAttention", "x", x, ("b", "h", "w", self.dim))
        b, h, w, _ = x.shape
        # torch's channel order is (qkv heads c).
        qkv = self.to_qkv(x).reshape(b, h * w, 3, self.heads, self.head_dim)  # [b, n, 3, heads, head_dim]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        k = jax.nn.softmax(k.astype(numerics.STATS_DTYPE), axis=1).astype(v.dtype)
        context = jnp.einsum("bnhd,bnhe->bhde", k, v)
        out = jnp.einsum("bhde,bnhd->bnhe", context, q)
        return self.to_out(out.reshape(b, h, w, self.heads * self.head_dim))


class SpatialSelfAttention(nnx.Module):
    """One-head self-attention over the pixels of a channels-last image, with a residual."""

    def __init__(
        self,
        in_channels: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        backend=None,
    ):
        self.in_channels = in_channels
        self.backend = resolve_backend(backend)
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = Normalize(in_channels, **layer)
        # One head of in_channels features: nothing to split by heads.
        self.q = Conv(in_channels, in_channels, kernel_size=1, axes=("channels", None), **layer)
        self.k = Conv(in_channels, in_channels, kernel_size=1, axes=("channels", None), **layer)
        self.v = Conv(in_channels, in_channels, kernel_size=1, axes=("channels", None), **layer)
        self.proj_out = Conv(in_channels, in_channels, kernel_size=1, axes=(None, "channels"), **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.in_channels
        expect_shape("SpatialSelfAttention", "x", x, ("b", "h", "w", c))
        b, h, w, _ = x.shape
        h_ = self.norm(x)
        q, k, v = (proj(h_).reshape(b, h * w, 1, c) for proj in (self.q, self.k, self.v))  # [b, n, 1, c]
        out = dot_product_attention(q, k, v, scale=numerics.attention_scale(c), backend=self.backend)
        return x + self.proj_out(out.reshape(b, h, w, c))
