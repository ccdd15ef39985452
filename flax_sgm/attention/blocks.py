"""Transformer blocks: BasicTransformerBlock and BasicTransformerSingleLayerBlock, on [b, n, dim].

`checkpoint=True` runs the block under gradient checkpointing (remat.py) with a
policy from remat.CHECKPOINT_POLICIES; values and gradients are the same as without
it, and unlike the seed every call argument still reaches the block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.errors import TraceContextError

from flax_sgm.attention.modules import CrossAttention, MemoryEfficientCrossAttention
from flax_sgm.attention.policy import resolve_backend
from flax_sgm.nn.checks import expect_array, expect_shape
from flax_sgm.nn.primitives import FeedForward, LayerNorm
from flax_sgm.attention.remat import DEFAULT_CHECKPOINT_POLICY, check_policy, checkpointed_call
from flax_sgm.sharding import TOKENS, constrain

Dtype = Any

ATTENTION_MODES = {
    "softmax": CrossAttention,
    "softmax-xformers": MemoryEfficientCrossAttention,
}

def _attention_class(attn_mode: str):
    if attn_mode not in ATTENTION_MODES:
        raise ValueError(f"attn_mode must be one of {sorted(ATTENTION_MODES)}; got {attn_mode!r}")
    return ATTENTION_MODES[attn_mode]


def maybe_checkpointed(module: nnx.Module, method, *args, **static):
    """`method(module, *args, **static)`, checkpointed when `module.checkpoint` is set."""
    try:
        if not module.checkpoint:
            return method(module, *args, **static)
        return checkpointed_call(method, module, *args, policy=module.checkpoint_policy, static=static)
    except TraceContextError:
        # Only state that changes is written back: here, dropout's RNG counter.
        raise ValueError(
            f"{type(module).__name__}: dropout updates its RNG state, which a model closed over by a JAX "
            "transform (jax.jit, jax.grad, lax.scan) cannot do; call model.eval(), use the nnx transforms "
            "(nnx.jit, nnx.grad), or merge its state inside the transform with nnx.merge(..., copy=True)"
        ) from None


class BasicTransformerBlock(nnx.Module):
    """Self-attention (or cross, with disable_self_attn), cross-attention, feed-forward; pre-norm residuals."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
        attn_mode: str = "softmax",
        sdp_backend=None,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        checkpoint_policy: str = DEFAULT_CHECKPOINT_POLICY,
    ):
        attn_cls = _attention_class(attn_mode)
        backend = "auto" if attn_mode == "softmax-xformers" else resolve_backend(sdp_backend)
        check_policy(checkpoint_policy)
        self.dim = dim
        self.disable_self_attn = disable_self_attn
        self.checkpoint = checkpoint
        self.checkpoint_policy = checkpoint_policy
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn1 = attn_cls(
            dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout, backend=backend, **layer
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff, **layer)
        self.attn2 = attn_cls(dim, context_dim, n_heads, d_head, dropout, backend=backend, **layer)
        self.norm1 = LayerNorm(dim, **layer)
        self.norm2 = LayerNorm(dim, **layer)
        self.norm3 = LayerNorm(dim, **layer)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        additional_tokens: jax.Array | None = None,
        n_times_crossframe_attn_in_self: int = 0,
    ) -> jax.Array:
        expect_shape(type(self).__name__, "x", x, ("b", "n", self.dim))
        expect_array(type(self).__name__, "context", context)
        if not isinstance(n_times_crossframe_attn_in_self, (int, np.integer)):
            raise ValueError(
                f"{type(self).__name__}: `n_times_crossframe_attn_in_self` must be a Python int (it fixes shapes); "
                f"got {type(n_times_crossframe_attn_in_self).__name__}"
            )
        return maybe_checkpointed(
            self,
            type(self)._forward,
            x,
            context,
            additional_tokens,
            n_times_crossframe_attn_in_self=int(n_times_crossframe_attn_in_self),
        )

    def _forward(self, x, context, additional_tokens, *, n_times_crossframe_attn_in_self):
        x = constrain(x, TOKENS)  # the residual stream [b, n, dim]
        x = x + self.attn1(
            self.norm1(x),
            context=context if self.disable_self_attn else None,
            additional_tokens=additional_tokens,
            n_times_crossframe_attn_in_self=0 if self.disable_self_attn else n_times_crossframe_attn_in_self,
        )
        x = x + self.attn2(self.norm2(x), context=context, additional_tokens=additional_tokens)
        return constrain(x + self.ff(self.norm3(x)), TOKENS)


class BasicTransformerSingleLayerBlock(nnx.Module):
    """One attention (self, or cross when context is given) and a feed-forward; pre-norm residuals."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        attn_mode: str = "softmax",
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        checkpoint_policy: str = DEFAULT_CHECKPOINT_POLICY,
    ):
        attn_cls = _attention_class(attn_mode)
        check_policy(checkpoint_policy)
        self.dim = dim
        self.checkpoint = checkpoint
        self.checkpoint_policy = checkpoint_policy
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn1 = attn_cls(dim, context_dim, n_heads, d_head, dropout, **layer)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff, **layer)
        self.norm1 = LayerNorm(dim, **layer)
        self.norm2 = LayerNorm(dim, **layer)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        expect_shape(type(self).__name__, "x", x, ("b", "n", self.dim))
        return maybe_checkpointed(self, type(self)._forward, x, context)

    def _forward(self, x, context):
        x = constrain(x, TOKENS)  # the residual stream [b, n, dim]
        x = x + self.attn1(self.norm1(x), context=context)
        return constrain(x + self.ff(self.norm2(x)), TOKENS)
