"""Blocks tier parity: BasicTransformerBlock and BasicTransformerSingleLayerBlock, and checkpointing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_sgm
import torch_ref
from conftest import CRITERIA, assert_close, assert_parity, compare, flax_twin, nhwc_to_nchw, randomize_, rel_err
from flax_sgm.checkpoints import convert

BLOCK_OPTIONS = {
    "self-only": dict(context_dim=None),
    "cross": dict(context_dim=24),
    "cross-plain-ff": dict(context_dim=24, gated_ff=False),
    "disable-self-attn": dict(context_dim=24, disable_self_attn=True),
    "xformers-mode": dict(context_dim=24, attn_mode="softmax-xformers"),
    "math-backend": dict(context_dim=24, sdp_backend="MATH"),
}


def torch_kwargs(options):
    """The same options for torch: the seed takes an SDPBackend member, flax its name."""
    from torch.nn.attention import SDPBackend

    backend = options.get("sdp_backend")
    return options | ({"sdp_backend": getattr(SDPBackend, backend)} if backend else {})


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("option", list(BLOCK_OPTIONS))
def test_basic_transformer_block(option, checkpoint, rng):
    options = dict(BLOCK_OPTIONS[option], checkpoint=checkpoint)
    t = randomize_(torch_ref.BasicTransformerBlock(32, 4, 8, **torch_kwargs(options)), seed=1)
    f = flax_twin(t, flax_sgm.BasicTransformerBlock, 32, 4, 8, **options)
    inputs = {"x": rng.standard_normal((2, 13, 32)).astype(np.float32)}
    if options["context_dim"]:
        inputs["context"] = rng.standard_normal((2, 6, 24)).astype(np.float32)
    assert_parity(compare(t, f, inputs), "BasicTransformerBlock")


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("context_dim,gated_ff", [(None, True), (24, True), (24, False)], ids=["self", "cross", "cross-plain-ff"])
def test_single_layer_block(context_dim, gated_ff, checkpoint, rng):
    options = dict(context_dim=context_dim, gated_ff=gated_ff, checkpoint=checkpoint)
    t = randomize_(torch_ref.BasicTransformerSingleLayerBlock(32, 2, 16, **options), seed=2)
    f = flax_twin(t, flax_sgm.BasicTransformerSingleLayerBlock, 32, 2, 16, **options)
    inputs = {"x": rng.standard_normal((1, 9, 32)).astype(np.float32)}
    if context_dim:
        inputs["context"] = rng.standard_normal((1, 4, 24)).astype(np.float32)
    assert_parity(compare(t, f, inputs), "BasicTransformerSingleLayerBlock")


def _value_and_grads(model, x, context):
    def loss(m, x):
        return (m(x, context=context) ** 2).sum()

    value, (g_model, g_x) = nnx.value_and_grad(loss, argnums=(0, 1))(model, x)
    return value, jax.tree.leaves(g_model) + [g_x]


@pytest.mark.parametrize("policy", sorted(flax_sgm.CHECKPOINT_POLICIES))
def test_checkpointing_gives_the_same_values_and_gradients(policy, rng):
    def build(checkpoint):
        return flax_sgm.SpatialTransformer(
            32, 2, 8, depth=2, context_dim=16, use_checkpoint=checkpoint, checkpoint_policy=policy, rngs=nnx.Rngs(3)
        )

    plain, remat = build(False), build(True)
    nnx.update(plain, jax.tree.map(lambda p: p + 0.05, nnx.state(plain, nnx.Param)))  # proj_out non-zero
    nnx.update(remat, nnx.state(plain, nnx.Param))
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 32)).astype(np.float32))
    context = jnp.asarray(rng.standard_normal((2, 4, 16)).astype(np.float32))
    v0, g0 = _value_and_grads(plain, x, context)
    v1, g1 = _value_and_grads(remat, x, context)
    assert_close(v1, v0, what="value")
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert_close(a, b, what=f"gradient {i}")


def test_checkpointing_recomputes_in_the_backward_pass():
    """remat is really applied: the block adds one checkpoint to the jaxpr (the chunked attention has its own)."""
    block = flax_sgm.BasicTransformerBlock(16, 2, 8, checkpoint=True, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 4, 16))

    def checkpoints():
        return len(re.findall(r"\b(?:remat2|checkpoint)\[", str(jax.make_jaxpr(lambda x: block(x).sum())(x))))

    with_checkpoint = checkpoints()
    block.checkpoint = False
    assert with_checkpoint == checkpoints() + 1


def test_block_dropout_changes_output_only_in_train_mode(rng):
    block = flax_sgm.BasicTransformerBlock(16, 2, 8, dropout=0.3, checkpoint=True, rngs=nnx.Rngs(0, dropout=1))
    x = jnp.asarray(rng.standard_normal((1, 5, 16)).astype(np.float32))
    assert not np.allclose(block(x), block(x))  # a fresh dropout key each call
    block.eval()
    np.testing.assert_array_equal(block(x), block(x))


def test_block_bad_input():
    block = flax_sgm.BasicTransformerBlock(16, 2, 8, context_dim=12, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BasicTransformerBlock: `x` must have shape \[b, n, 16\]; got shape \[1, 4, 8\]"):
        block(jnp.ones((1, 4, 8)), context=jnp.ones((1, 3, 12)))
    with pytest.raises(ValueError, match=r"CrossAttention: `context` must have shape \[1, m, 12\]; got shape \[1, 3, 10\]"):
        block(jnp.ones((1, 4, 16)), context=jnp.ones((1, 3, 10)))
    with pytest.raises(ValueError, match=r"attn_mode must be one of \['softmax', 'softmax-xformers'\]; got 'flash'"):
        flax_sgm.BasicTransformerBlock(16, 2, 8, attn_mode="flash", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"checkpoint_policy must be one of"):
        flax_sgm.BasicTransformerBlock(16, 2, 8, checkpoint_policy="everything", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_functional_jit_over_split_state(checkpoint, rng):
    """jax.jit(jax.grad) over nnx.split/merge, remat or not: parameters only, and torch's gradient values."""
    model = flax_sgm.SpatialTransformer(32, 2, 8, context_dim=16, use_checkpoint=checkpoint, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda p: p + 0.05, nnx.state(model, nnx.Param)))  # proj_out non-zero
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert not jax.tree.leaves(rest)  # parameters only
    x = rng.standard_normal((1, 3, 3, 32)).astype(np.float32)
    context = rng.standard_normal((1, 4, 16)).astype(np.float32)
    step = jax.jit(jax.grad(lambda p, x, c: nnx.merge(graphdef, p, rest)(x, context=c).sum()))
    grads = step(params, jnp.asarray(x), jnp.asarray(context))
    assert jax.tree.structure(grads) == jax.tree.structure(params)

    t = torch_ref.SpatialTransformer(32, 2, 8, context_dim=16, use_checkpoint=False)
    t.load_state_dict(convert.as_torch_tensors(convert.to_torch_state_dict(model)), strict=True)
    t(torch.from_numpy(nhwc_to_nchw(x).copy()), context=torch.from_numpy(context)).sum().backward()
    got = convert.to_torch_state_dict(model, grads)
    for name, p in t.named_parameters():
        assert rel_err(got[name], p.grad.numpy()) <= CRITERIA["float32"].grad, name
