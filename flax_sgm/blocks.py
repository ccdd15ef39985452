"""Transformer blocks: BasicTransformerBlock and BasicTransformerSingleLayerBlock, on [b, n, dim].

`checkpoint=True` wraps the block in `nnx.remat` with a policy from
CHECKPOINT_POLICIES; values and gradients are the same as without it, and unlike the
seed every call argument still reaches the block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_sgm.attention import ATTENTION_OUT, CrossAttention, MemoryEfficientCrossAttention
from flax_sgm.attention_backends import resolve_backend
from flax_sgm.checks import expect_shape
from flax_sgm.primitives import FeedForward, LayerNorm
from flax_sgm.sharding import TOKENS, constrain

Dtype = Any

ATTENTION_MODES = {
    "softmax": CrossAttention,
    "softmax-xformers": MemoryEfficientCrossAttention,
}

# Remat policies by name. "recompute" saves nothing (what torch's checkpoint does);
# "save_attention" keeps each attention's output so the backward pass does not run
# the attention forward again.
CHECKPOINT_POLICIES = {
    "recompute": jax.checkpoint_policies.nothing_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}
DEFAULT_CHECKPOINT_POLICY = "save_attention"


def _attention_class(attn_mode: str):
    if attn_mode not in ATTENTION_MODES:
        raise ValueError(f"attn_mode must be one of {sorted(ATTENTION_MODES)}; got {attn_mode!r}")
    return ATTENTION_MODES[attn_mode]


def _checkpoint_policy(name: str):
    if name not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint_policy must be one of {sorted(CHECKPOINT_POLICIES)}; got {name!r}")
    return CHECKPOINT_POLICIES[name]


def maybe_remat(method, module: nnx.Module, *args):
    """Call `method(module, *args)`, under nnx.remat when `module.checkpoint` is set.

    Python scalars among `args` are static (the cross-frame count).
    """
    if not module.checkpoint:
        return method(module, *args)
    static = tuple(i + 1 for i, a in enumerate(args) if isinstance(a, int))
    policy = _checkpoint_policy(module.checkpoint_policy)
    return nnx.remat(method, policy=policy, static_argnums=static)(module, *args)


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
        _checkpoint_policy(checkpoint_policy)
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
        return maybe_remat(
            type(self)._forward, self, x, context, additional_tokens, int(n_times_crossframe_attn_in_self)
        )

    def _forward(self, x, context, additional_tokens, n_times_crossframe_attn_in_self):
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
        _checkpoint_policy(checkpoint_policy)
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
        return maybe_remat(type(self)._forward, self, x, context)

    def _forward(self, x, context):
        x = constrain(x, TOKENS)  # the residual stream [b, n, dim]
        x = x + self.attn1(self.norm1(x), context=context)
        return constrain(x + self.ff(self.norm2(x)), TOKENS)
