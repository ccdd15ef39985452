"""SpatialTransformer parity against torch_ref: forward and gradients."""

import numpy as np
import pytest

import flax_sgm
import torch_ref
from conftest import assert_parity, compare, flax_twin, randomize_

CONFIGS = {
    "conv-proj-self": dict(in_channels=64, n_heads=2, d_head=16, depth=1, context_dim=None, use_linear=False),
    "linear-proj-ctx": dict(in_channels=64, n_heads=4, d_head=8, depth=2, context_dim=24, use_linear=True),
    "per-block-ctx": dict(in_channels=32, n_heads=2, d_head=16, depth=2, context_dim=[24, 40], use_linear=True),
    "disable-self-attn": dict(in_channels=32, n_heads=2, d_head=16, depth=1, context_dim=24, disable_self_attn=True),
}


def context_for(config, batch, rng):
    dims = config["context_dim"]
    if dims is None:
        return None
    if isinstance(dims, list):
        return [rng.standard_normal((batch, 7 + i, d)).astype(np.float32) for i, d in enumerate(dims)]
    return rng.standard_normal((batch, 7, dims)).astype(np.float32)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("batch,hw", [(1, (5, 7)), (2, (3, 4))], ids=["b1-5x7", "b2-3x4"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_spatial_transformer(name, batch, hw, checkpoint, rng):
    config = dict(CONFIGS[name], use_checkpoint=checkpoint)
    t = randomize_(torch_ref.SpatialTransformer(**config), seed=1)
    f = flax_twin(t, flax_sgm.SpatialTransformer, **config)
    inputs = {"x": rng.standard_normal((batch, config["in_channels"], *hw)).astype(np.float32)}
    context = context_for(config, batch, rng)
    if context is not None:
        inputs["context"] = context
    result = compare(t, f, inputs)
    assert_parity(result, "SpatialTransformer")
