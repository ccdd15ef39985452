"""SpatialTransformerConfig: JSON round trip, validation, building concrete and abstract modules."""

import jax
import numpy as np
import pytest
from flax import nnx

from flax_sgm import SpatialTransformer
from flax_sgm.attention.config import PRESETS, SpatialTransformerConfig
from flax_sgm import models


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    config = PRESETS[name].config
    assert SpatialTransformerConfig.from_json(config.to_json()) == config


def test_per_block_context_dims_are_a_tuple():
    config = SpatialTransformerConfig.from_dict(dict(in_channels=64, heads=2, head_dim=32, depth=2, context_dim=[16, 24]))
    assert config.context_dim == (16, 24)
    model = models.abstract(config)
    assert [b.attn2.context_dim for b in model.transformer_blocks] == [16, 24]


def test_a_model_from_its_config_is_the_seed_call_of_that_config():
    config = PRESETS["default"].config.replace(depth=2, context_dim=(16, 24), checkpoint_policy="recompute")
    built = SpatialTransformer.from_config(config, rngs=nnx.Rngs(0))
    seed_call = SpatialTransformer(**config.seed_args(), checkpoint_policy=config.checkpoint_policy, rngs=nnx.Rngs(0))
    assert built.config == seed_call.config == config
    assert [b.attn2.context_dim for b in built.transformer_blocks] == list(config.context_dims) == [16, 24]
    same = jax.tree.map(np.array_equal, nnx.state(built, nnx.Param), nnx.state(seed_call, nnx.Param))
    assert all(jax.tree.leaves(same))
    assert SpatialTransformerConfig.from_seed_args(**config.seed_args(), checkpoint_policy="recompute") == config


def test_the_seed_call_takes_numpy_ints_and_a_stretched_context_list():
    model = SpatialTransformer(np.int64(32), np.int32(2), 16, depth=3, context_dim=[24], rngs=nnx.Rngs(0))
    assert model.config.in_channels == 32 and type(model.config.heads) is int
    assert model.config.context_dims == (24, 24, 24)
    with pytest.raises(ValueError, match="has 2 entries for depth 3"):
        SpatialTransformer(32, 2, 16, depth=3, context_dim=[24, 40], rngs=nnx.Rngs(0))


def test_abstract_build_allocates_nothing():
    model = models.abstract(PRESETS["sdxl"].config)
    assert isinstance(model.proj_in.kernel.get_value(), jax.ShapeDtypeStruct)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"in_channels": 64, "heads": 2}', "head_dim"),
        ('{"in_channels": 64, "heads": 2, "head_dim": 32, "n_heads": 3}',
         r"unknown SpatialTransformer config keys \['n_heads'\]; n_heads is the seed's name for heads"),
        ('{"in_channels": 0, "heads": 2, "head_dim": 32}', "`in_channels` must be a positive int"),
        ("[1, 2]", "must be a JSON object"),
        ("{", "not valid JSON"),
    ],
    ids=["missing", "unknown", "zero", "not-object", "not-json"],
)
def test_bad_config_is_one_line_naming_the_source(text, message):
    with pytest.raises(ValueError, match=message) as err:
        SpatialTransformerConfig.from_json(text, source="my.json")
    assert str(err.value).startswith("my.json: ") and "\n" not in str(err.value)
