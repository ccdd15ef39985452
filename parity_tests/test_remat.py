"""Gradient checkpointing (flax_sgm/attention/remat.py): what each policy keeps, exactness, and a module left whole.

The saved residuals are read off jax's own report (jax.ad_checkpoint.print_saved_residuals)
for a block closed over, as users call it.
"""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import flax_sgm
from conftest import assert_close

DIM, HEADS, D_HEAD, TOKENS, CONTEXT = 64, 2, 32, 24, (2, 7, 48)


def block(**kwargs):
    return flax_sgm.BasicTransformerBlock(DIM, HEADS, D_HEAD, context_dim=CONTEXT[2], rngs=nnx.Rngs(0, dropout=1), **kwargs)


def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, TOKENS, DIM)), jnp.float32)
    c = jnp.asarray(rng.standard_normal(CONTEXT), jnp.float32)
    return x, c


def saved_residuals(model) -> list[str]:
    """jax's description of every residual the backward pass keeps, one per line; weights (constants) left out."""
    x, c = inputs()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda x: model(x, c).sum(), x)
    return [line for line in out.getvalue().splitlines() if line and "from a constant" not in line]


def shape_of(line: str) -> tuple[int, ...]:
    return tuple(int(d) for d in re.match(r"\w+\[([\d,]*)\]", line).group(1).split(",") if d)


def test_recompute_saves_nothing_of_the_block():
    residuals = saved_residuals(block(checkpoint_policy="recompute"))
    assert residuals == [f"f32[2,{TOKENS},{DIM}] from the argument x"], residuals


def test_save_attention_keeps_the_attention_outputs_and_statistics_only():
    residuals = saved_residuals(block(checkpoint_policy="save_attention"))
    named = [r for r in residuals if "named 'attention_out'" in r]
    assert [shape_of(r) for r in named] == [(2, TOKENS, HEADS * D_HEAD)] * 2, residuals  # attn1, attn2
    rest = [r for r in residuals if r not in named and "from the argument" not in r]
    # The chunked backward's own residuals (output and log-sum-exp per query block), nothing else:
    assert rest and all("chunked_attention" in r for r in rest), rest
    tokens = {2 * TOKENS * HEADS * D_HEAD, 2 * HEADS * TOKENS}  # out, lse
    assert all(np.prod(shape_of(r)) in tokens for r in rest), rest
    # Never the feed-forward's hidden units (GEGLU: 8 * dim wide) or [n, m] logits.
    assert not any(8 * DIM in shape_of(r) or 4 * DIM in shape_of(r) for r in residuals), residuals


@pytest.mark.parametrize("policy", sorted(flax_sgm.CHECKPOINT_POLICIES))
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_checkpointed_values_and_gradients_equal_unchecked(policy, dropout):
    """Same weights and dropout keys: the same numbers, up to float32 rounding of a differently fused program."""
    x, c = inputs()
    checked = block(checkpoint=True, checkpoint_policy=policy, dropout=dropout)
    plain = block(checkpoint=False, dropout=dropout)

    def value_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, rest, x):
            # The RNG state goes in and out; copy=True gives it Variables of this trace, which dropout may update.
            model = nnx.merge(graphdef, params, rest, copy=True)
            return (model(x, c) ** 2).sum(), nnx.state(model, nnx.Not(nnx.Param))

        (value, rest), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))(params, rest, x)
        return value, grads, rest

    got, want = value_and_grads(checked), value_and_grads(plain)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(w.dtype, jnp.floating):
            assert_close(g, w)
        else:  # RNG counters and keys: advanced alike
            np.testing.assert_array_equal(jax.random.key_data(g) if jnp.issubdtype(g.dtype, jax.dtypes.prng_key) else g,
                                          jax.random.key_data(w) if jnp.issubdtype(w.dtype, jax.dtypes.prng_key) else w)


def test_dropout_state_advances_under_checkpointing():
    x, c = inputs()
    model = block(checkpoint=True, dropout=0.2)
    first, second = model(x, c), model(x, c)
    assert not np.allclose(first, second)  # the RNG counter was written back
    model.eval()
    np.testing.assert_array_equal(model(x, c), model(x, c))


def test_dropout_under_a_closed_over_jit_is_one_clear_error():
    x, c = inputs()
    model = block(dropout=0.2)
    with pytest.raises(ValueError, match=r"^BasicTransformerBlock: dropout updates its RNG state, .*copy=True") as err:
        jax.jit(lambda x: model(x, c))(x)
    assert "\n" not in str(err.value)
    model.eval()  # no state changes in eval mode: the closure is fine
    assert_close(jax.jit(lambda x: model(x, c))(x), model(x, c))


def test_a_failing_call_leaves_the_module_whole():
    x, c = inputs()
    model = block()
    before = model(x, c)
    with pytest.raises(ValueError, match="CrossAttention: `context` must have shape"):
        jax.jit(lambda x: model(x, c[..., :5]))(x)  # fails inside the checkpointed call
    np.testing.assert_array_equal(model(x, c), before)
    assert model.dim == DIM


def test_cross_frame_count_is_static():
    x, c = inputs()
    model = block()
    out = jax.jit(lambda x: model(x, c, n_times_crossframe_attn_in_self=2))(x)
    assert_close(out, model(x, c, n_times_crossframe_attn_in_self=2))
    assert not np.allclose(out, model(x, c))  # the count reached the attention


def test_a_traced_cross_frame_count_is_one_clear_error():
    x, c = inputs()
    model = block()
    with pytest.raises(ValueError, match=r"`n_times_crossframe_attn_in_self` must be a Python int") as err:
        jax.jit(lambda x, n: model(x, c, n_times_crossframe_attn_in_self=n))(x, 2)
    assert "\n" not in str(err.value).split("\n---")[0]
