"""Every numerical default where torch and JAX differ, named once.

torch's values are the spec. Flax's own defaults differ for several of them
(nnx.LayerNorm eps 1e-6, fast variance, jax.nn.gelu's tanh approximation), so no
module relies on a framework default for any of these.
"""

import jax

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default
GROUP_NORM_EPS = 1e-6  # the seed's Normalize
GROUP_NORM_GROUPS = 32  # the seed's Normalize
# Norm variance as E[(x - mean)^2], not E[x^2] - mean^2 (flax's fast variance).
USE_FAST_VARIANCE = False
# Softmax and norm statistics are computed in float32 whatever the compute dtype.
STATS_DTYPE = jax.numpy.float32



def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): the exact erf form, computed in float32 and rounded once.

    torch evaluates it (and its derivative) in float32 for bf16/fp16 inputs; JAX's
    autodiff of the formula in bf16 rounds at every step (test_low_precision.py).
    """
    acc = jax.numpy.promote_types(x.dtype, STATS_DTYPE)
    return jax.nn.gelu(x.astype(acc), approximate=False).astype(x.dtype)


def attention_scale(d_head: int) -> float:
    """The seed's `dim_head ** -0.5` (torch SDPA's default scale)."""
    return d_head**-0.5
