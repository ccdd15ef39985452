"""SpatialTransformer: norm, project in, transformer blocks over the pixels, project out, residual.

Channels-last: x [b, h, w, in_channels] -> same shape.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_sgm.attention.blocks import BasicTransformerBlock
from flax_sgm.attention.config import SpatialTransformerConfig
from flax_sgm.attention.remat import DEFAULT_CHECKPOINT_POLICY
from flax_sgm.nn.checks import expect_numbers, expect_shape
from flax_sgm.nn.primitives import Conv, Linear, Normalize, zero_module
from flax_sgm.sharding import IMAGE, TOKENS, constrain

Dtype = Any


class SpatialTransformer(nnx.Module):
    """Built from a SpatialTransformerConfig (`SpatialTransformer(config, rngs=...)`, or `from_config`), or from
    the seed's arguments as torch is (`SpatialTransformer(320, 5, 64, context_dim=768, rngs=...)`)."""

    def __init__(
        self,
        in_channels: int | SpatialTransformerConfig,
        n_heads: int | None = None,
        d_head: int | None = None,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim=None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        attn_type: str = "softmax",
        use_checkpoint: bool = True,
        sdp_backend=None,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        checkpoint_policy: str = DEFAULT_CHECKPOINT_POLICY,
    ):
        if isinstance(in_channels, SpatialTransformerConfig):
            config = in_channels
        else:  # the seed's names stop here: from this line on, the config's
            if n_heads is None or d_head is None:
                raise ValueError("SpatialTransformer: give a SpatialTransformerConfig, or in_channels, n_heads and d_head")
            config = SpatialTransformerConfig(
                in_channels, n_heads, d_head, depth, dropout, context_dim, disable_self_attn, use_linear, attn_type,
                use_checkpoint, sdp_backend, checkpoint_policy,
            )
        self.config = config
        self.dtype = dtype
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = Normalize(config.in_channels, **layer)
        project = Linear if config.use_linear else functools.partial(Conv, kernel_size=1)
        self.proj_in = project(config.in_channels, config.inner_dim, axes=("channels", "embed"), **layer)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    config.inner_dim,
                    config.heads,
                    config.head_dim,
                    dropout=config.dropout,
                    context_dim=block_context_dim,
                    disable_self_attn=config.disable_self_attn,
                    attn_mode=config.attn_type,
                    checkpoint=config.use_checkpoint,
                    sdp_backend=config.sdp_backend,
                    checkpoint_policy=config.checkpoint_policy,
                    **layer,
                )
                for block_context_dim in config.context_dims
            ]
        )
        self.proj_out = zero_module(project(config.inner_dim, config.in_channels, axes=("embed", "channels"), **layer))

    @classmethod
    def from_config(
        cls, config: SpatialTransformerConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32
    ) -> SpatialTransformer:
        """The module `config` describes (random init from `rngs`)."""
        if not isinstance(config, SpatialTransformerConfig):
            raise ValueError(f"SpatialTransformer: `config` must be a SpatialTransformerConfig; got {type(config).__name__}")
        return cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, context=None) -> jax.Array:
        """`context`: None (self-attention), one array for every block, or a list of 1 or depth arrays."""
        x = expect_numbers("SpatialTransformer", "x", x)
        expect_shape("SpatialTransformer", "x", x, ("b", "h", "w", self.config.in_channels))
        depth = len(self.transformer_blocks)
        contexts = list(context) if isinstance(context, (list, tuple)) else [context]
        contexts = [None if c is None else expect_numbers("SpatialTransformer", "context", c) for c in contexts]
        if len(contexts) not in (1, depth):
            raise ValueError(f"SpatialTransformer: `context` list must have 1 or {depth} (depth) entries; got {len(contexts)}")
        if len(contexts) == 1:
            contexts = contexts * depth
        b, h, w, _ = x.shape
        x_in = x
        # A 1x1 conv and a linear layer are the same map on channels-last pixels.
        x = self.proj_in(self.norm(x)).reshape(b, h * w, -1)  # [b, n, inner_dim]
        x = constrain(x, TOKENS)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        x = self.proj_out(x.reshape(b, h, w, -1))  # [b, h, w, in_channels]
        out = x + x_in  # rounded once to the compute dtype, as flax layers return it (torch's bf16 add rounds once)
        return constrain(out if self.dtype is None else out.astype(self.dtype), IMAGE)
