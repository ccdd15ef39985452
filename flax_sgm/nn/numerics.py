"""Every numerical default where torch and JAX differ, named once.

torch's values are the spec. Flax's own defaults differ for several of them
(nnx.LayerNorm eps 1e-6, fast variance, jax.nn.gelu's tanh approximation), so no
module relies on a framework default for any of these.
"""

import functools

import jax

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default
GROUP_NORM_EPS = 1e-6  # the seed's Normalize
GROUP_NORM_GROUPS = 32  # the seed's Normalize
UNET_GROUP_NORM_EPS = 1e-5  # sgm's GroupNorm32 in the UNet's ResBlocks and `out` (torch's default)
# Norm variance as E[(x - mean)^2], not E[x^2] - mean^2 (flax's fast variance).
USE_FAST_VARIANCE = False
# Softmax and norm statistics are computed in float32 whatever the compute dtype.
STATS_DTYPE = jax.numpy.float32


def stats_dtype(dtype) -> jax.numpy.dtype:
    """Where softmax and norm statistics are kept: float32, or float64 for float64 inputs (jax_enable_x64)."""
    return jax.numpy.promote_types(dtype, STATS_DTYPE)


def in_float32(f, *xs: jax.Array, out_dtype=None) -> jax.Array:
    """f(*xs) computed in (at least) float32, its result rounded once to `out_dtype` (default: xs[0]'s).

    torch computes GELU, bias gradients and norms of bf16/fp16 tensors in float32 and
    rounds once, forward and backward; JAX's autodiff of the same formula in bf16
    rounds at every step (test_low_precision.py). In float32 the casts are no-ops.
    """
    acc = stats_dtype(xs[0].dtype)
    return f(*(x.astype(acc) for x in xs)).astype(out_dtype or xs[0].dtype)


def silu(x: jax.Array) -> jax.Array:
    """torch.nn.SiLU(): in float32 and rounded once (in bf16, JAX rounds sigmoid, product and their gradients)."""
    return in_float32(jax.nn.silu, x)


def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): the exact erf form, in float32 and rounded once."""
    return in_float32(functools.partial(jax.nn.gelu, approximate=False), x)


# OpenAI CLIP's activation (transformers' "quick_gelu"): x * sigmoid(1.702 x).
QUICK_GELU_SCALE = 1.702


def quick_gelu(x: jax.Array) -> jax.Array:
    """transformers' QuickGELUActivation, in float32 and rounded once."""
    return in_float32(lambda v: v * jax.nn.sigmoid(QUICK_GELU_SCALE * v), x)


def attention_scale(head_dim: int) -> float:
    """The seed's `dim_head ** -0.5` (torch SDPA's default scale)."""
    return head_dim**-0.5
