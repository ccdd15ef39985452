"""SpatialTransformer: norm, project in, transformer blocks over the pixels, project out, residual.

Channels-last: x [b, h, w, in_channels] -> same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_sgm.blocks import BasicTransformerBlock
from flax_sgm.remat import DEFAULT_CHECKPOINT_POLICY
from flax_sgm.checks import expect_array, expect_shape
from flax_sgm.primitives import Conv1x1, Linear, Normalize, zero_module
from flax_sgm.sharding import IMAGE, TOKENS, constrain

Dtype = Any


def _is_list_like(value) -> bool:
    """list, tuple, omegaconf.ListConfig: what the seed accepts as a per-block list."""
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes))) or type(value).__name__ == "ListConfig"


def per_block_context_dims(context_dim, depth: int) -> list[int | None]:
    """The seed's context_dim rule: one value, or a list of `depth` (a homogeneous list is stretched)."""
    if context_dim is None:
        return [None] * depth
    dims = list(context_dim) if _is_list_like(context_dim) else [context_dim]
    if len(dims) != depth:
        if any(d != dims[0] for d in dims):
            raise ValueError(
                f"SpatialTransformer: `context_dim` {dims} has {len(dims)} entries for depth {depth}; "
                "a list of another length must be homogeneous"
            )
        dims = depth * [dims[0]]
    return dims


class SpatialTransformer(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
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
        context_dims = per_block_context_dims(context_dim, depth)
        self.in_channels = in_channels
        self.dtype = dtype
        inner_dim = n_heads * d_head
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = Normalize(in_channels, **layer)
        project = Linear if use_linear else Conv1x1
        self.proj_in = project(in_channels, inner_dim, axes=("channels", "embed"), **layer)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner_dim,
                    n_heads,
                    d_head,
                    dropout=dropout,
                    context_dim=context_dims[d],
                    disable_self_attn=disable_self_attn,
                    attn_mode=attn_type,
                    checkpoint=use_checkpoint,
                    sdp_backend=sdp_backend,
                    checkpoint_policy=checkpoint_policy,
                    **layer,
                )
                for d in range(depth)
            ]
        )
        self.proj_out = zero_module(project(inner_dim, in_channels, axes=("embed", "channels"), **layer))

    def __call__(self, x: jax.Array, context=None) -> jax.Array:
        """`context`: None (self-attention), one array for every block, or a list of 1 or depth arrays."""
        expect_shape("SpatialTransformer", "x", x, ("b", "h", "w", self.in_channels))
        depth = len(self.transformer_blocks)
        contexts = list(context) if isinstance(context, (list, tuple)) else [context]
        for c in contexts:
            expect_array("SpatialTransformer", "context", c)
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
