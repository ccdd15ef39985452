"""SpatialTransformerConfig: JSON round trip, validation, building concrete and abstract modules."""

import jax
import pytest

from flax_sgm.config import PRESETS, SpatialTransformerConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    config = PRESETS[name].config
    assert SpatialTransformerConfig.from_json(config.to_json()) == config


def test_per_block_context_dims_are_a_tuple():
    config = SpatialTransformerConfig.from_dict(dict(in_channels=64, n_heads=2, d_head=32, depth=2, context_dim=[16, 24]))
    assert config.context_dim == (16, 24)
    model = config.make_abstract()
    assert [b.attn2.context_dim for b in model.transformer_blocks] == [16, 24]


def test_abstract_build_allocates_nothing():
    model = PRESETS["sdxl"].config.make_abstract()
    assert isinstance(model.proj_in.kernel.get_value(), jax.ShapeDtypeStruct)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"in_channels": 64, "n_heads": 2}', "d_head"),
        ('{"in_channels": 64, "n_heads": 2, "d_head": 32, "heads": 3}', "unknown SpatialTransformer config keys"),
        ('{"in_channels": 0, "n_heads": 2, "d_head": 32}', "`in_channels` must be a positive int"),
        ("[1, 2]", "must be a JSON object"),
        ("{", "not valid JSON"),
    ],
    ids=["missing", "unknown", "zero", "not-object", "not-json"],
)
def test_bad_config_is_one_line_naming_the_source(text, message):
    with pytest.raises(ValueError, match=message) as err:
        SpatialTransformerConfig.from_json(text, source="my.json")
    assert str(err.value).startswith("my.json: ") and "\n" not in str(err.value)
