"""Tiled against untiled encode/decode on the tests' tiny random VAE (16-pixel tiles, a 64 x 64 image): the
numbers of docs/autoencoder.md. Run from the repository root: python bench/vae_tiling.py"""
import sys; sys.path.insert(0, "parity_tests")
import numpy as np, jax, jax.numpy as jnp
from test_autoencoder import diffusers_vae, flax_vae
from conftest import nchw_to_nhwc, rel_err
vae = flax_vae(diffusers_vae("tiny", seed=0))
x = jnp.asarray(nchw_to_nhwc(np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)))
enc = jax.jit(lambda x, t: vae.encode(x, tiled=t).mean, static_argnums=1)
dec = jax.jit(lambda z, t: vae.decode(z, tiled=t), static_argnums=1)
m0, m1 = enc(x, False), enc(x, True)
print("encode mean rel err tiled vs untiled", rel_err(np.asarray(m1), np.asarray(m0)))
d0, d1 = dec(m0, False), dec(m0, True)
print("decode rel err", rel_err(np.asarray(d1), np.asarray(d0)), "max abs", float(jnp.abs(d1 - d0).max()), "max", float(jnp.abs(d0).max()))
