"""flax_sgm inside a Linen codebase through nnx.bridge: init, apply and grad the Linen way.

    python examples/linen.py
    python examples/linen.py --tiny     # a quick look (CI runs the default size)
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.nnx import bridge

import flax_sgm


class UNetLevel(nn.Module):
    """A Linen module as a Linen UNet would hold one attention level: conv in, SpatialTransformer, conv out."""

    channels: int
    heads: int
    d_head: int

    @nn.compact
    def __call__(self, x, context):
        x = nn.Conv(self.channels, (3, 3))(x)
        x = bridge.to_linen(flax_sgm.SpatialTransformer, self.channels, self.heads, self.d_head,
                            context_dim=context.shape[-1], name="attention")(x, context)
        return nn.Conv(x.shape[-1], (3, 3))(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for a quick look")
    args = parser.parse_args()
    channels, heads, d_head, hw = (32, 2, 16, 6) if args.tiny else (320, 8, 40, 16)

    level = UNetLevel(channels, heads, d_head)
    x = jax.random.normal(jax.random.key(0), (2, hw, hw, 4))
    context = jax.random.normal(jax.random.key(1), (2, 77, 64))
    variables = level.init(jax.random.key(2), x, context)
    out = jax.jit(level.apply)(variables, x, context)

    def loss(params, x):
        return jnp.mean(level.apply({"params": params}, x, context) ** 2)

    grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    n_params = sum(p.size for p in jax.tree.leaves(nn.unbox(variables["params"]["attention"])))
    norms = {k: float(optax.global_norm(nn.unbox(v))) for k, v in grads.items()}
    print(f"apply: {out.shape}; SpatialTransformer parameters held by Linen: {n_params}")
    print(f"gradient norms: {norms}; input gradient norm {float(optax.global_norm(grad_x)):.3g}")
    if not all(n > 0 for n in norms.values()):
        raise SystemExit("a gradient is zero: the bridge did not pass it")


if __name__ == "__main__":
    main()
