"""A diffusers config.json is the spec of its stacks: every field that changes the output is honoured or
refused in one line. Models are diffusers' own, made here with random weights and saved with save_pretrained;
a signature walk notices a field a later diffusers adds."""

import inspect
import json
import shutil

import pytest
from flax import nnx

import flax_sgm
from flax_sgm.attention import diffusers as diffusers_config
from flax_sgm.errors import CheckpointError
from conftest import assert_stack_matches_torch, randomize_

diffusers = pytest.importorskip("diffusers")
from diffusers import Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

# A stack whose context width equals its inner width (2 heads of 16): the weights cannot show only-cross attention.
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, cross_attention_dim=32)


def saved(model, path):
    randomize_(model, seed=3).eval()
    model.save_pretrained(path)
    return path


# --- Transformer2DModel: honoured ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"only_cross_attention": True},  # context width == inner width: loaded without it before
        {"double_self_attention": True},
        {"upcast_attention": True},
        {"only_cross_attention": True, "double_self_attention": True},
    ],
    ids=lambda f: ",".join(f),
)
def test_an_honoured_transformer2d_field_gives_diffusers_output(tmp_path, fields):
    model = Transformer2DModel(**TINY, **fields)
    path = saved(model, tmp_path / "t")
    flax_module = flax_sgm.load_pretrained(path)
    assert flax_module.transformer_blocks[0].disable_self_attn == fields.get("only_cross_attention", False)
    assert_stack_matches_torch(flax_module, model)


def test_dropout_is_the_stacks_dropout(tmp_path):
    model = Transformer2DModel(**TINY, dropout=0.25)
    flax_module = flax_sgm.load_pretrained(saved(model, tmp_path / "t"))
    assert flax_module.transformer_blocks[0].attn2.out_dropout.rate == 0.25
    flax_module.eval()
    assert_stack_matches_torch(flax_module, model)


def test_only_cross_attention_contradicted_by_the_caller_is_refused(tmp_path):
    path = saved(Transformer2DModel(**TINY, only_cross_attention=True), tmp_path / "t")
    with pytest.raises(CheckpointError, match="disable_self_attn=False contradicts .*only_cross_attention for '' is true"):
        flax_sgm.load_pretrained(path, disable_self_attn=False)


# --- Transformer2DModel: refused ----------------------------------------------------------------

REFUSED = [
    ({"norm_eps": 1e-3}, "norm_eps=0.001; SpatialTransformer builds norm_eps=1e-05 only"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"activation_fn": "geglu-approximate"}, "activation_fn='geglu-approximate'"),
    ({"activation_fn": "gelu"}, "activation_fn='gelu'"),
    ({"norm_elementwise_affine": False}, "norm_elementwise_affine=False"),
    ({"num_embeds_ada_norm": 10}, "num_embeds_ada_norm=10"),  # diffusers makes it ada_norm
    ({"norm_type": "ada_norm", "num_embeds_ada_norm": 10}, "norm_type='ada_norm'"),
    ({"norm_num_groups": 16}, "norm_num_groups=16"),
    ({"attention_type": "gated"}, "attention_type='gated'"),
    ({"out_channels": 16}, "out_channels=16 differs from in_channels=32"),
]


@pytest.mark.parametrize("fields,message", REFUSED, ids=[",".join(f) for f, _ in REFUSED])
def test_a_transformer2d_field_flax_sgm_cannot_build_is_refused_by_name(tmp_path, fields, message):
    path = saved(Transformer2DModel(**TINY, **fields), tmp_path / "t")
    with pytest.raises(CheckpointError, match="config.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        flax_sgm.load_pretrained(path)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"patch_size": 2}, "patch_size=2"),
        ({"num_vector_embeds": 9}, "num_vector_embeds=9"),
        ({"caption_channels": 8}, "caption_channels=8"),
        ({"ff_inner_dim": 64}, "ff_inner_dim=64 is a Transformer2DModel field flax_sgm does not know"),
        ({"cross_attention_norm": "layer_norm"}, "cross_attention_norm='layer_norm' is a Transformer2DModel field"),
    ],
    ids=["patch_size", "num_vector_embeds", "caption_channels", "unknown-ff_inner_dim", "unknown-cross_attention_norm"],
)
def test_a_config_field_written_by_hand_is_refused_by_name(tmp_path, fields, message):
    """Inputs diffusers builds other modules for (patched, vector) and fields Transformer2DModel does not have."""
    path = saved(Transformer2DModel(**TINY), tmp_path / "t")
    config = path / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | fields))
    with pytest.raises(CheckpointError, match=message):
        flax_sgm.load_pretrained(path)


def test_a_config_contradicting_the_weights_is_refused(tmp_path):
    path = saved(Transformer2DModel(**TINY | {"cross_attention_dim": 24}), tmp_path / "t")
    config = path / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"cross_attention_dim": 32}))
    with pytest.raises(CheckpointError, match="cross_attention_dim 32 in the config, 24 in the weights"):
        flax_sgm.load_pretrained(path)


# --- UNet2DConditionModel: each stack's fields -----------------------------------------------------


def tiny_unet(**fields):
    return UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=(2, 2), layers_per_block=1,
        cross_attention_dim=32, sample_size=8, in_channels=4, out_channels=4, **fields,
    )


def test_a_unets_only_cross_attention_per_block(tmp_path):
    """down block 0 (and up block 1, reversed) of inner width 32 = the context width: only the config tells."""
    model = tiny_unet(only_cross_attention=[True, False])
    path = saved(model, tmp_path / "unet")
    loaded = flax_sgm.load_pretrained_all(path)
    disabled = {p for p, m in loaded.items() if m.transformer_blocks[0].disable_self_attn}
    assert disabled == {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"}
    for prefix, flax_module in loaded.items():
        stack = model.get_submodule(prefix)
        assert_stack_matches_torch(flax_module, stack)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"attention_type": "gated"}, "attention_type='gated'"),
        ({"dual_cross_attention": True}, "dual_cross_attention=True"),
        ({"norm_num_groups": 16}, "norm_num_groups=16"),
        ({"a_later_field": 1}, "a_later_field=1 is a UNet2DConditionModel field flax_sgm does not know"),
    ],
    ids=["attention_type", "dual_cross_attention", "norm_num_groups", "unknown"],
)
def test_a_unet_field_its_stacks_cannot_have_is_refused_by_name(unet_path, tmp_path, fields, message):
    path = tmp_path / "unet"
    shutil.copytree(unet_path, path)
    config = path / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | fields))
    with pytest.raises(CheckpointError, match=message):
        flax_sgm.load_pretrained(path, "down_blocks.1.attentions.0")


@pytest.fixture(scope="module")
def unet_path(tmp_path_factory):
    return saved(tiny_unet(), tmp_path_factory.mktemp("unet") / "unet")


# --- the signature walk -----------------------------------------------------------------------------


def parameters(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


@pytest.mark.parametrize("kind", sorted(diffusers_config.TABLES))
def test_every_constructor_field_is_honoured_fixed_or_neutral(kind):
    honoured, fixed, neutral = diffusers_config.TABLES[kind]
    tables = [set(honoured), set(fixed), set(neutral)]
    assert sum(map(len, tables)) == len(set().union(*tables)), "a field in two tables"
    signature = parameters(getattr(diffusers, kind))
    assert set(signature) == set().union(*tables), "diffusers added or removed a field: classify it"
    for field, value in fixed.items():  # a fixed value is diffusers' default, so an unset field loads
        assert signature[field] == value, field


def test_every_basic_transformer_block_field_is_set_by_transformer2d_or_left_as_sgm_has_it():
    """Transformer2DModel passes its own fields on; the block's others stay at defaults that are sgm's."""
    honoured, fixed, neutral = diffusers_config.TABLES["Transformer2DModel"]
    passed_on = set(honoured) | set(fixed) | set(neutral)
    signature = parameters(BasicTransformerBlock)
    left = {n: d for n, d in signature.items() if n not in passed_on and n not in ("dim",)}
    assert left == diffusers_config.BLOCK_DEFAULTS


def test_load_unet_and_the_stack_loader_read_a_unet_config_alike(tmp_path):
    """One reading of a UNet's config.json (unet/diffusers.read_blocks): per-block heads (the legacy
    attention_head_dim), only_cross_attention and the mid block's share give every stack the same config
    whether it is loaded alone or inside the whole UNet."""
    path = saved(UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=(1, 2), layers_per_block=1,
        only_cross_attention=[True, False], cross_attention_dim=32, sample_size=8), tmp_path / "unet")
    alone = flax_sgm.load_pretrained_all(path)
    whole = [m for _, m in nnx.iter_modules(flax_sgm.load_unet(path)) if isinstance(m, flax_sgm.SpatialTransformer)]
    assert [m.config for m in alone.values()] == [m.config for m in whole]
    # down 0, down 1, mid, up 0 (x2), up 1 (x2): the up blocks take the down blocks' reversed, the mid block the last's
    assert [(m.config.heads, m.config.disable_self_attn) for m in whole] == [
        (1, True), (2, False), (2, False), (2, False), (2, False), (1, True), (1, True)]
