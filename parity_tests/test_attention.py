"""Attention tier parity: CrossAttention, MemoryEfficientCrossAttention, LinearAttention, SpatialSelfAttention."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_sgm
import torch_ref
from conftest import CRITERIA, assert_parity, compare, flax_twin, randomize_

SHAPES = {  # (heads, d_head, query_dim, context_dim)
    "2x8-self": (2, 8, 16, None),
    "4x16-cross": (4, 16, 32, 24),
    "3x5-cross": (3, 5, 20, 12),  # odd head dim
}


def make_cross(cls_name, heads, d_head, query_dim, context_dim, **kwargs):
    t = randomize_(getattr(torch_ref, cls_name)(query_dim, context_dim, heads, d_head, **kwargs), seed=2)
    f = flax_twin(t, getattr(flax_sgm, cls_name), query_dim, context_dim, heads, d_head, **kwargs)
    return t, f


def inputs_for(rng, batch, n, m, query_dim, context_dim):
    inputs = {"x": rng.standard_normal((batch, n, query_dim)).astype(np.float32)}
    if context_dim is not None:
        inputs["context"] = rng.standard_normal((batch, m, context_dim)).astype(np.float32)
    return inputs


@pytest.mark.parametrize("cls_name", ["CrossAttention", "MemoryEfficientCrossAttention"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cross_attention(cls_name, shape, batch, rng):
    heads, d_head, query_dim, context_dim = SHAPES[shape]
    t, f = make_cross(cls_name, heads, d_head, query_dim, context_dim)
    result = compare(t, f, inputs_for(rng, batch, 11, 7, query_dim, context_dim))
    assert_parity(result, cls_name)


@pytest.mark.parametrize("backend", [None, "MATH"])
def test_cross_attention_seed_backends(backend, rng):
    """The seed's sdp_backend choices run the same math (torch: SDPBackend; flax: its name)."""
    from torch.nn.attention import SDPBackend

    t = randomize_(torch_ref.CrossAttention(16, 12, 2, 8, backend=backend and getattr(SDPBackend, backend)), seed=3)
    f = flax_twin(t, flax_sgm.CrossAttention, 16, 12, 2, 8, backend=backend)
    assert_parity(compare(t, f, inputs_for(rng, 2, 9, 5, 16, 12)), "CrossAttention")


# Masks broadcast to [b, heads, n, m] as torch SDPA broadcasts them.
MASK_SHAPES = {
    "1-m": lambda b, h, n, m: (1, m),
    "n-m": lambda b, h, n, m: (n, m),
    "b-1-n-m": lambda b, h, n, m: (b, 1, n, m),
    "b-h-n-m": lambda b, h, n, m: (b, h, n, m),
    "b-1-1-m": lambda b, h, n, m: (b, 1, 1, m),
}


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
def test_cross_attention_masks(mask_shape, kind, rng):
    b, heads, n, m = 2, 2, 6, 5
    t, f = make_cross("CrossAttention", heads, 8, 16, 12)
    shape = MASK_SHAPES[mask_shape](b, heads, n, m)
    keep = rng.random(shape) > 0.3
    keep[..., 0] = True  # at least one key per row; fully masked rows are tested below
    mask = keep if kind == "bool" else np.where(keep, rng.standard_normal(shape), -1e4).astype(np.float32)
    inputs = inputs_for(rng, b, n, m, 16, 12)
    # The mask is data, not a differentiated input: pass it as a constant to both.
    result = compare(t, f, inputs | {"mask": mask})
    assert_parity(result, "CrossAttention")


@pytest.mark.parametrize("kind", ["bool", "float-inf"])
def test_fully_masked_rows_are_zero_like_torch(kind, rng):
    b, heads, n, m = 1, 2, 4, 5
    t, f = make_cross("CrossAttention", heads, 8, 16, 12)
    keep = np.ones((n, m), bool)
    keep[1] = False
    mask = keep if kind == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
    result = compare(t, f, inputs_for(rng, b, n, m, 16, 12) | {"mask": mask})
    assert_parity(result, "CrossAttention")


@pytest.mark.parametrize("cls_name", ["CrossAttention", "MemoryEfficientCrossAttention"])
@pytest.mark.parametrize("with_context", [False, True], ids=["self", "cross"])
def test_additional_tokens(cls_name, with_context, rng):
    t, f = make_cross(cls_name, 2, 8, 16, 12 if with_context else None)
    inputs = inputs_for(rng, 2, 7, 5, 16, 12 if with_context else None)
    inputs["additional_tokens"] = rng.standard_normal((2, 3, 16)).astype(np.float32)
    assert_parity(compare(t, f, inputs), cls_name)


@pytest.mark.parametrize("n_frames", [2, 3])
def test_cross_frame_matches_xformers_class_for_any_batch(n_frames, rng):
    """MemoryEfficientCrossAttention repeats by n (the seed's intended rule) for any b divisible by n."""
    t, f = make_cross("MemoryEfficientCrossAttention", 2, 8, 16, None)
    inputs = inputs_for(rng, 2 * n_frames, 5, 5, 16, None)
    result = compare(t, f, inputs | {"n_times_crossframe_attn_in_self": n_frames})
    assert_parity(result, "MemoryEfficientCrossAttention")


@pytest.mark.parametrize("heads,dim_head", [(4, 32), (2, 8), (3, 5)])
@pytest.mark.parametrize("batch,hw", [(1, (5, 7)), (2, (4, 3))])
def test_linear_attention(heads, dim_head, batch, hw, rng):
    t = randomize_(torch_ref.LinearAttention(24, heads, dim_head), seed=5)
    f = flax_twin(t, flax_sgm.LinearAttention, 24, heads, dim_head)
    x = rng.standard_normal((batch, 24, *hw)).astype(np.float32)
    result = compare(t, f, {"x": x})
    assert_parity(result, "LinearAttention")


@pytest.mark.parametrize("channels", [32, 64])
@pytest.mark.parametrize("batch,hw", [(1, (5, 7)), (2, (3, 3))])
def test_spatial_self_attention(channels, batch, hw, rng):
    t = randomize_(torch_ref.SpatialSelfAttention(channels), seed=6)
    f = flax_twin(t, flax_sgm.SpatialSelfAttention, channels)
    x = rng.standard_normal((batch, channels, *hw)).astype(np.float32)
    # k.bias shifts every logit of a row, which softmax ignores: its gradient is (negligibly) zero.
    result = compare(t, f, {"x": x})
    assert result.errors["k.bias"][0] <= CRITERIA["float32"].grad  # within the floor, not only by the ratio
    assert_parity(result, "SpatialSelfAttention")


def test_dropout_needs_rng_and_changes_output_only_when_on(rng):
    x = jnp.asarray(rng.standard_normal((2, 5, 16)).astype(np.float32))
    off = flax_sgm.CrossAttention(16, heads=2, dim_head=8, rngs=nnx.Rngs(0))
    on = flax_sgm.CrossAttention(16, heads=2, dim_head=8, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    assert not np.allclose(on(x), off(x))  # same weights (same seed), dropout active
    on.eval()
    np.testing.assert_allclose(on(x), off(x), rtol=0, atol=0)


# Bad input: ValueError naming module, argument, expected and actual shape.
BAD_INPUTS = {
    "x-rank": (dict(x=np.zeros((2, 16))), r"CrossAttention: `x` must have rank 3.*\[b, n, 16\].*\[2, 16\]"),
    "x-width": (dict(x=np.zeros((2, 5, 15))), r"CrossAttention: `x` must have shape \[b, n, 16\].*\[2, 5, 15\]"),
    "context-width": (
        dict(x=np.zeros((2, 5, 16)), context=np.zeros((2, 3, 11))),
        r"CrossAttention: `context` must have shape \[2, m, 12\].*\[2, 3, 11\]",
    ),
    "context-batch": (
        dict(x=np.zeros((2, 5, 16)), context=np.zeros((3, 3, 12))),
        r"CrossAttention: `context` must have shape \[2, m, 12\].*\[3, 3, 12\]",
    ),
    "context-missing": (dict(x=np.zeros((2, 5, 16))), r"CrossAttention: `context` is required"),
    "mask": (
        dict(x=np.zeros((2, 5, 16)), context=np.zeros((2, 3, 12)), mask=np.ones((4, 3), bool)),
        r"CrossAttention: `mask` of shape \[4, 3\] does not broadcast to \[b, heads, n, m\] = \[2, 2, 5, 3\]",
    ),
    "mask-rank": (
        dict(x=np.zeros((2, 5, 16)), context=np.zeros((2, 3, 12)), mask=np.ones((3,), bool)),
        r"CrossAttention: `mask` must have rank 2 to 4, \[\(b,\) \(heads,\) n, m\]; got shape \[3\]",
    ),
    "cross-frame-batch": (
        dict(x=np.zeros((3, 5, 16)), context=np.zeros((3, 3, 12)), n_times_crossframe_attn_in_self=2),
        r"CrossAttention: the batch \(3\) must be divisible by n_times_crossframe_attn_in_self \(2\)",
    ),
    "additional-tokens-width": (
        dict(x=np.zeros((2, 5, 16)), context=np.zeros((2, 3, 12)), additional_tokens=np.zeros((2, 2, 8))),
        r"CrossAttention: `additional_tokens` must have shape \[2, n_add, 16\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cross_attention_bad_input(case):
    f = flax_sgm.CrossAttention(16, 12, heads=2, dim_head=8, rngs=nnx.Rngs(0))
    kwargs, pattern = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        f(**{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()})


def test_spatial_modules_bad_input():
    with pytest.raises(ValueError, match=r"LinearAttention: `x` must have shape \[b, h, w, 24\].*\[1, 24, 5, 5\]"):
        flax_sgm.LinearAttention(24, rngs=nnx.Rngs(0))(jnp.zeros((1, 24, 5, 5)))
    with pytest.raises(ValueError, match=r"SpatialSelfAttention: `x` must have rank 4"):
        flax_sgm.SpatialSelfAttention(32, rngs=nnx.Rngs(0))(jnp.zeros((1, 5, 32)))
    with pytest.raises(ValueError, match=r"Normalize \(GroupNorm\): `in_channels` must be divisible by 32 groups; got 20"):
        flax_sgm.SpatialSelfAttention(20, rngs=nnx.Rngs(0))


def test_memory_efficient_attention_takes_the_seeds_backend_and_refuses_other_arguments():
    flax_sgm.MemoryEfficientCrossAttention(16, 12, 2, 8, backend="MATH", rngs=nnx.Rngs(0))  # passed by the seed's block, ignored
    with pytest.raises(TypeError, match="unexpected keyword argument 'head_dim'"):
        flax_sgm.MemoryEfficientCrossAttention(16, 12, 2, head_dim=8, rngs=nnx.Rngs(0))
