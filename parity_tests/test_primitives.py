"""Primitives tier parity: GEGLU, FeedForward, Normalize, LayerNorm, zero_module, and the numerics traps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_sgm
import torch_ref
from conftest import CRITERIA, assert_close, assert_parity, compare, flax_twin, randomize_, rel_err
from flax_sgm.checkpoints import convert
from flax_sgm.nn import numerics
from flax_sgm.nn.primitives import LayerNorm


@pytest.mark.parametrize("dim_in,dim_out", [(16, 24), (7, 5)])
def test_geglu(dim_in, dim_out, rng):
    t = randomize_(torch_ref.GEGLU(dim_in, dim_out), seed=1)
    f = flax_twin(t, flax_sgm.GEGLU, dim_in, dim_out)
    x = rng.standard_normal((2, 9, dim_in)).astype(np.float32)
    assert_parity(compare(t, f, {"x": x}), "GEGLU")


@pytest.mark.parametrize(
    "kwargs",
    [dict(glu=False), dict(glu=True), dict(dim_out=12, mult=2), dict(glu=True, dim_out=7, mult=1.5)],
    ids=["gelu", "geglu", "dim_out-mult2", "geglu-dim_out-mult1.5"],
)
def test_feed_forward(kwargs, rng):
    t = randomize_(torch_ref.FeedForward(16, **kwargs), seed=2)
    f = flax_twin(t, flax_sgm.FeedForward, 16, **kwargs)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    assert_parity(compare(t, f, {"x": x}), "FeedForward")


@pytest.mark.parametrize("channels", [32, 96])
def test_normalize(channels, rng):
    t = randomize_(torch_ref.Normalize(channels), seed=3)
    f = nnx.eval_shape(lambda: flax_sgm.Normalize(channels, rngs=nnx.Rngs(0)))
    convert.load_torch_state_dict(f, t.state_dict())
    # A large mean makes E[x^2] - E[x]^2 (flax's fast variance) visibly wrong.
    x = (rng.standard_normal((2, channels, 5, 7)) * 0.5 + 30.0).astype(np.float32)
    result = compare(t, f, {"x": x})
    assert_parity(result, "Normalize (GroupNorm)")


def test_layer_norm_matches_torch(rng):
    t = randomize_(torch.nn.LayerNorm(24), seed=4)
    f = nnx.eval_shape(lambda: LayerNorm(24, rngs=nnx.Rngs(0), dtype=None, param_dtype=jnp.float32))
    convert.load_torch_state_dict(f, t.state_dict())
    x = (rng.standard_normal((2, 5, 24)) * 0.05 + 1.0).astype(np.float32)  # small variance: eps matters
    assert_parity(compare(t, f, {"x": x}), "LayerNorm")


def test_framework_defaults_would_fail_parity(rng):
    """The traps are real: flax/jax defaults differ from torch by more than the tolerance."""
    x = jnp.asarray(rng.standard_normal(1000).astype(np.float32) * 3)
    exact = np.asarray(numerics.gelu(x))
    torch_gelu = torch.nn.functional.gelu(torch.from_numpy(np.array(x))).numpy()
    assert_close(exact, torch_gelu, what="gelu")
    assert rel_err(jax.nn.gelu(x), torch_gelu) > CRITERIA["float32"].forward  # jax's default is tanh

    small_var = jnp.asarray(rng.standard_normal((4, 16)).astype(np.float32) * 1e-3)
    torch_ln = torch.nn.functional.layer_norm(torch.from_numpy(np.array(small_var)), (16,)).numpy()
    flax_default_ln = nnx.LayerNorm(16, rngs=nnx.Rngs(0))(small_var)  # eps 1e-6
    assert rel_err(flax_default_ln, torch_ln) > CRITERIA["float32"].forward
    ours = LayerNorm(16, rngs=nnx.Rngs(0), dtype=None, param_dtype=jnp.float32)(small_var)
    assert rel_err(ours, torch_ln) <= CRITERIA["float32"].forward


def test_zero_module_zeroes_every_parameter():
    m = flax_sgm.zero_module(flax_sgm.FeedForward(8, glu=True, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
    assert leaves and all(not np.any(np.asarray(p)) for p in leaves)


def test_proj_out_is_zero_initialized_like_the_seed():
    """An unrandomized SpatialTransformer is the identity, in both frameworks."""
    f = flax_sgm.SpatialTransformer(32, 2, 8, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 3, 32)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(x))


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_and_param_dtype_reach_every_layer(param_dtype):
    f = flax_sgm.SpatialTransformer(
        32, 2, 8, depth=2, context_dim=16, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=param_dtype
    )
    assert {p.dtype for p in jax.tree.leaves(nnx.state(f, nnx.Param))} == {jnp.dtype(param_dtype)}
    y = f(jnp.ones((1, 3, 3, 32)), context=jnp.ones((1, 4, 16)))
    assert y.dtype in (jnp.bfloat16, jnp.float32)
    ff_out = f.transformer_blocks[0].ff(jnp.ones((1, 4, 16), jnp.float32))
    assert ff_out.dtype == jnp.bfloat16  # compute dtype bfloat16


@pytest.mark.parametrize("family", ["unet", "vae", "text", "spatial-transformer", "checkpointed-block"])
def test_an_abstract_model_called_says_so_in_one_line(family):
    """models.abstract gives shapes only; calling it, eagerly or in a jitted closure, failed deep inside flax with
    "'ShapeDtypeStruct' object is not subscriptable". Lowering one through nnx.split still works."""
    from flax_sgm import models
    from flax_sgm.attention.config import PRESETS as STACKS
    from flax_sgm.autoencoder.config import PRESETS as VAES
    from flax_sgm.errors import AbstractModelError
    from flax_sgm.text.config import PRESETS as TOWERS
    from flax_sgm.unet.config import PRESETS as UNETS

    model, call, args = {
        "unet": (lambda: models.abstract(UNETS["sd15"]), lambda m, x: m(x, jnp.zeros(1), jnp.zeros((1, 77, 768))),
                 (jnp.zeros((1, 8, 8, 4)),)),
        "vae": (lambda: models.abstract(VAES["sdxl"]), lambda m, z: m.decode(z), (jnp.zeros((1, 4, 4, 4)),)),
        "text": (lambda: models.abstract(TOWERS["clip-vit-l-14"]), lambda m, ids: m(ids), (jnp.zeros((1, 77), jnp.int32),)),
        "spatial-transformer": (lambda: models.abstract(STACKS["default"].config), lambda m, x, c: m(x, c),
                                (jnp.zeros((1, 4, 4, STACKS["default"].config.in_channels)),
                                 jnp.zeros((1, 7, STACKS["default"].config.context_dims[0])))),
        # jax.checkpoint takes the parameters before any layer reads one (remat.checkpointed_call)
        "checkpointed-block": (lambda: nnx.eval_shape(lambda: flax_sgm.BasicTransformerBlock(
            32, 4, 8, context_dim=24, checkpoint=True, rngs=nnx.Rngs(0))), lambda m, x, c: m(x, c),
            (jnp.zeros((1, 16, 32)), jnp.zeros((1, 7, 24)))),
    }[family]
    abstract = model()
    with pytest.raises(AbstractModelError, match=r"the model is abstract \(flax_sgm.models.abstract"):
        call(abstract, *args)
    with pytest.raises(AbstractModelError, match="load weights into it"):
        jax.jit(lambda *a: call(abstract, *a))(*args)
    graphdef, state = nnx.split(abstract)
    jax.jit(lambda state, *a: call(nnx.merge(graphdef, state), *a)).lower(state, *args)
