"""A DDIM-style sampling loop in jax.lax.scan, the model closed over, with two kinds of guidance:

- classifier-free guidance: the batch doubled with a null (zero) context, eps = uncond + w (cond - uncond);
- an input-gradient term (classifier guidance): jax.grad of a score of the denoised estimate w.r.t. x_t.

The network is a SpatialTransformer standing in for a denoiser (random weights: this shows the program,
not a picture). Built with its defaults, checkpointing included; load real weights with
flax_sgm.load_pretrained.

    python examples/sample.py
    python examples/sample.py --tiny     # a quick look (CI runs the default size)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import flax_sgm


def ddim_schedule(steps: int):
    """alpha_bar at each step, from noisy to clean (a cosine schedule)."""
    t = jnp.linspace(0.98, 0.0, steps + 1)
    return jnp.cos((t + 0.008) / 1.008 * jnp.pi / 2) ** 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps, for a quick look")
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance weight")
    parser.add_argument("--grad-scale", type=float, default=0.1, help="input-gradient guidance weight")
    args = parser.parse_args()
    channels, heads, d_head, hw, steps = (32, 2, 16, 6, 4) if args.tiny else (320, 8, 40, 16, 20)

    model = flax_sgm.SpatialTransformer(channels, heads, d_head, context_dim=64, rngs=nnx.Rngs(0))
    # proj_out starts at zero (as in the seed), which makes an untrained model the identity.
    kernel = model.proj_out.kernel
    kernel[...] = 0.02 * jax.random.normal(jax.random.key(3), kernel.shape)
    context = jax.random.normal(jax.random.key(1), (2, 77, 64))
    alphas = ddim_schedule(steps)

    def eps(x, context):
        """Classifier-free guidance: one call on the doubled batch."""
        out = model(jnp.concatenate([x, x]), jnp.concatenate([context, jnp.zeros_like(context)]))
        cond, uncond = jnp.split(out, 2)
        return uncond + args.cfg * (cond - uncond)

    def score(x0):
        """What the guidance pulls towards: here, a low mean energy of the estimate."""
        return -jnp.mean(x0**2)

    def step(x, i):
        a, a_next = alphas[i], alphas[i + 1]

        def denoised(x):
            e = eps(x, context)
            return (x - jnp.sqrt(1 - a) * e) / jnp.sqrt(a), e

        # Input-gradient guidance: d score(x0(x_t)) / d x_t, through the network.
        grad = jax.grad(lambda x: score(denoised(x)[0]))(x)
        x0, e = denoised(x)
        e = e - args.grad_scale * jnp.sqrt(1 - a) * grad
        x = jnp.sqrt(a_next) * x0 + jnp.sqrt(1 - a_next) * e
        return x, jnp.sqrt(jnp.mean(x0**2))

    @jax.jit
    def sample(noise):
        return jax.lax.scan(step, noise, jnp.arange(steps))

    x, x0_rms = sample(jax.random.normal(jax.random.key(2), (2, hw, hw, channels)))
    print(f"{steps} steps: x {x.shape}, rms of the x0 estimate per step {[round(float(r), 3) for r in x0_rms]}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise SystemExit("the sample is not finite")


if __name__ == "__main__":
    main()
