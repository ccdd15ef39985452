"""A consistency-model-style JVP (sCM): the time derivative of the network along a diffusion trajectory.

With x_t = cos(t) x0 + sin(t) z, d/dt F(x_t) = J_F(x_t) dx_t/dt is one jax.jvp of the network,
taken inside a jitted step with the model closed over, as consistency-model training does. It is
checked against a central finite difference of F along the same path.

    python examples/jvp.py
    python examples/jvp.py --tiny     # a quick look (CI runs the default size)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import flax_sgm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for a quick look")
    args = parser.parse_args()
    channels, heads, d_head, hw = (32, 2, 16, 6) if args.tiny else (320, 8, 40, 16)

    model = flax_sgm.SpatialTransformer(channels, heads, d_head, context_dim=64, rngs=nnx.Rngs(0))
    kernel = model.proj_out.kernel  # zero at init (as in the seed): give the untrained model a non-trivial Jacobian
    kernel[...] = 0.1 * jax.random.normal(jax.random.key(3), kernel.shape)
    keys = jax.random.split(jax.random.key(0), 3)
    x0, z = (jax.random.normal(k, (2, hw, hw, channels)) for k in keys[:2])
    context = jax.random.normal(keys[2], (2, 77, 64))

    def path(t):
        return jnp.cos(t) * x0 + jnp.sin(t) * z

    @jax.jit
    def time_derivative(t):
        """F(x_t) and dF/dt by forward-mode AD."""
        return jax.jvp(lambda t: model(path(t), context), (t,), (jnp.ones_like(t),))

    t, h = jnp.float32(0.7), 1e-2
    f, df_dt = time_derivative(t)
    finite_difference = (model(path(t + h), context) - model(path(t - h), context)) / (2 * h)
    error = float(jnp.abs(df_dt - finite_difference).max() / jnp.abs(finite_difference).max())
    print(f"dF/dt by jax.jvp vs central difference (h={h}): relative error {error:.2e}")
    if not error < 1e-2:
        raise SystemExit(f"the JVP disagrees with the finite difference: {error:.2e}")


if __name__ == "__main__":
    main()
