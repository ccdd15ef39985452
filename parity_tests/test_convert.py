"""Weight conversion: exact round trips, prefix selection, and every ConversionError case."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import flax_sgm
import torch_ref
from conftest import randomize_
from flax_sgm.checkpoints import convert
from flax_sgm.errors import ConversionError

MODULES = {
    "transformer-conv": (torch_ref.SpatialTransformer, flax_sgm.SpatialTransformer, (64, 2, 16), dict(depth=2, context_dim=24)),
    "transformer-linear": (torch_ref.SpatialTransformer, flax_sgm.SpatialTransformer, (32, 2, 8), dict(context_dim=[8, 16], depth=2, use_linear=True)),
    "block-plain-ff": (torch_ref.BasicTransformerBlock, flax_sgm.BasicTransformerBlock, (16, 2, 8), dict(gated_ff=False)),
    "single-layer": (torch_ref.BasicTransformerSingleLayerBlock, flax_sgm.BasicTransformerSingleLayerBlock, (16, 2, 8), {}),
    "linear-attention": (torch_ref.LinearAttention, flax_sgm.LinearAttention, (16, 2, 8), {}),
    "spatial-self-attention": (torch_ref.SpatialSelfAttention, flax_sgm.SpatialSelfAttention, (32,), {}),
    "xformers-attention": (torch_ref.MemoryEfficientCrossAttention, flax_sgm.MemoryEfficientCrossAttention, (16, 8, 2, 8), {}),
}


def abstract(flax_cls, args, kwargs, param_dtype=jnp.float32):
    return nnx.eval_shape(lambda: flax_cls(*args, rngs=nnx.Rngs(0), param_dtype=param_dtype, **kwargs))


@pytest.mark.parametrize("name", list(MODULES))
def test_round_trip_fp32_is_bit_exact_and_loads_strictly(name):
    t_cls, f_cls, args, kwargs = MODULES[name]
    t = randomize_(t_cls(*args, **kwargs), seed=1)
    sd = t.state_dict()
    f = convert.load_torch_state_dict(abstract(f_cls, args, kwargs), sd)
    back = convert.to_torch_state_dict(f)
    assert list(back) == [row.torch_key for row in convert.conversion_table(f)]
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == np.float32 and np.array_equal(back[k], v.numpy()), k
    fresh = t_cls(*args, **kwargs)
    fresh.load_state_dict(convert.as_torch_tensors(back), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("name", ["transformer-conv", "transformer-linear", "block-plain-ff"])
def test_round_trip_bf16_is_bit_exact(name):
    t_cls, f_cls, args, kwargs = MODULES[name]
    t = randomize_(t_cls(*args, **kwargs), seed=2).to(torch.bfloat16)
    sd = t.state_dict()
    f = convert.load_torch_state_dict(abstract(f_cls, args, kwargs, param_dtype=jnp.bfloat16), sd)
    back = convert.to_torch_state_dict(f)
    assert {v.dtype for v in back.values()} == {np.dtype(ml_dtypes.bfloat16)}
    tensors = convert.as_torch_tensors(back)
    for k, v in sd.items():
        assert tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], v), k


def test_numpy_arrays_and_widening_casts_are_accepted():
    t = randomize_(torch_ref.BasicTransformerBlock(16, 2, 8), seed=3)
    half = {k: v.half().numpy() for k, v in t.state_dict().items()}  # float16 -> float32 is exact
    f = convert.load_torch_state_dict(abstract(flax_sgm.BasicTransformerBlock, (16, 2, 8), {}), half)
    back = convert.to_torch_state_dict(f)
    assert all(np.array_equal(back[k], v.astype(np.float32)) for k, v in half.items())


def test_loading_copies_unless_told_the_arrays_are_private():
    t = randomize_(torch_ref.BasicTransformerBlock(16, 2, 8), seed=3)
    given = {k: np.ascontiguousarray(v.numpy()) for k, v in t.state_dict().items()}
    f = convert.load_torch_state_dict(abstract(flax_sgm.BasicTransformerBlock, (16, 2, 8), {}), given)
    given["norm1.weight"][:] = 7.0  # the caller's array changes; the model must not
    assert not np.any(np.asarray(f.norm1.scale[...]) == 7.0)

    raw = np.empty(16 + 16, np.float32)  # XLA:CPU shares 64-byte-aligned host buffers
    start = (-raw.ctypes.data % 64) // 4
    bias = raw[start : start + 16]
    bias[...] = t.state_dict()["norm1.bias"].numpy()
    private = dict(given, **{"norm1.bias": bias})
    f = convert.load_torch_state_dict(abstract(flax_sgm.BasicTransformerBlock, (16, 2, 8), {}), private, copy=False)
    assert f.norm1.bias[...].unsafe_buffer_pointer() == bias.ctypes.data  # shared, not copied
    assert np.array_equal(np.asarray(f.norm1.bias[...]), t.state_dict()["norm1.bias"].numpy())


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv1x1", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_weights_convert_bit_exactly_and_are_copied(use_linear, dtype):
    # 512 x 512: transposed as device_put copies them (strided views), beside vectors copied as they are.
    t = randomize_(torch_ref.SpatialTransformer(512, 2, 256, context_dim=16, use_linear=use_linear), seed=6).to(dtype)
    sd = t.state_dict()
    param_dtype = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
    config = dict(context_dim=16, use_linear=use_linear)
    f = convert.load_torch_state_dict(abstract(flax_sgm.SpatialTransformer, (512, 2, 256), config, param_dtype), sd)
    expected = {k: v.clone() for k, v in sd.items()}
    with torch.no_grad():
        t.proj_in.weight.zero_()  # the torch tensors change; the flax model must not
    back = convert.as_torch_tensors(convert.to_torch_state_dict(f))
    assert all(torch.equal(back[k], v) for k, v in expected.items())


def test_prefix_selects_one_stack_of_a_whole_model_checkpoint():
    a = randomize_(torch_ref.SpatialTransformer(32, 2, 8, context_dim=16), seed=4)
    b = randomize_(torch_ref.SpatialTransformer(32, 2, 8, context_dim=16), seed=5)
    whole = {"model.diffusion_model.time_embed.0.weight": torch.zeros(4, 4)}
    whole |= {f"model.diffusion_model.input_blocks.1.1.{k}": v for k, v in a.state_dict().items()}
    whole |= {f"model.diffusion_model.input_blocks.2.1.{k}": v for k, v in b.state_dict().items()}
    f = abstract(flax_sgm.SpatialTransformer, (32, 2, 8), dict(context_dim=16))
    convert.load_torch_state_dict(f, whole, prefix="model.diffusion_model.input_blocks.2.1.")
    back = convert.to_torch_state_dict(f)
    assert all(np.array_equal(back[k], v.numpy()) for k, v in b.state_dict().items())
    with_prefix = convert.to_torch_state_dict(f, prefix="input_blocks.2.1.")
    assert set(with_prefix) == {f"input_blocks.2.1.{k}" for k in b.state_dict()}


def test_every_problem_is_named_at_once():
    t = randomize_(torch_ref.BasicTransformerBlock(16, 2, 8, context_dim=12), seed=6)
    sd = dict(t.state_dict())
    del sd["attn1.to_q.weight"], sd["norm3.bias"]
    sd["attn2.to_k.weight"] = torch.zeros(16, 11)  # context width 11, model expects 12
    sd["ff.net.2.bias"] = torch.zeros(16, dtype=torch.int64)
    sd["attn1.to_out.1.weight"] = torch.zeros(1)  # Dropout has no weights
    sd["pos_embed"] = torch.zeros(3)
    with pytest.raises(ConversionError) as info:
        convert.load_torch_state_dict(abstract(flax_sgm.BasicTransformerBlock, (16, 2, 8), dict(context_dim=12)), sd)
    err, message = info.value, str(info.value)
    assert isinstance(err, ValueError)
    assert err.missing == ["attn1.to_q.weight", "norm3.bias"]
    assert err.unexpected == ["attn1.to_out.1.weight", "pos_embed"]
    assert len(err.mismatched) == 2
    for key in ["attn1.to_q.weight", "norm3.bias", "attn1.to_out.1.weight", "pos_embed"]:
        assert key in message
    assert "shape mismatch: attn2.to_k.weight has shape [16, 11], the model needs [16, 12]" in message
    assert "dtype mismatch: ff.net.2.bias is int64, expected a float dtype (float32)" in message


def test_strict_false_ignores_unknown_keys_but_never_missing_ones():
    t = randomize_(torch_ref.BasicTransformerSingleLayerBlock(16, 2, 8), seed=7)
    sd = dict(t.state_dict(), extra_key=torch.zeros(1))
    f = abstract(flax_sgm.BasicTransformerSingleLayerBlock, (16, 2, 8), {})
    convert.load_torch_state_dict(f, sd, strict=False)
    del sd["norm1.weight"]
    with pytest.raises(ConversionError, match="missing key: norm1.weight"):
        convert.load_torch_state_dict(f, sd, strict=False)



@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated, still a real dtype
def test_tensors_numpy_cannot_hold_are_named_not_crashed_on():
    t = randomize_(torch_ref.BasicTransformerSingleLayerBlock(16, 2, 8), seed=7)
    quantized = torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8)
    f = abstract(flax_sgm.BasicTransformerSingleLayerBlock, (16, 2, 8), {})
    convert.load_torch_state_dict(f, dict(t.state_dict(), extra_q=quantized), strict=False)  # unused: skipped
    with pytest.raises(ConversionError, match="unexpected key: extra_q"):
        convert.load_torch_state_dict(f, dict(t.state_dict(), extra_q=quantized))
    with pytest.raises(ConversionError, match=r"dtype mismatch: norm1.bias is torch.qint8, expected a float dtype"):
        convert.load_torch_state_dict(f, dict(t.state_dict(), **{"norm1.bias": quantized}))

def test_narrowing_cast_is_refused_unless_asked_for():
    t = randomize_(torch_ref.BasicTransformerSingleLayerBlock(16, 2, 8), seed=8)
    f = abstract(flax_sgm.BasicTransformerSingleLayerBlock, (16, 2, 8), {}, param_dtype=jnp.bfloat16)
    with pytest.raises(ConversionError, match=r"dtype mismatch: attn1.to_q.weight is float32; casting to the model's bfloat16 would lose precision"):
        convert.load_torch_state_dict(f, t.state_dict())
    convert.load_torch_state_dict(f, t.state_dict(), allow_downcast=True)
    expected = t.state_dict()["attn1.to_q.weight"].to(torch.bfloat16)
    assert torch.equal(convert.as_torch_tensors(convert.to_torch_state_dict(f))["attn1.to_q.weight"], expected)


def test_prefix_in_error_messages():
    with pytest.raises(ConversionError) as info:
        convert.load_torch_state_dict(abstract(flax_sgm.BasicTransformerSingleLayerBlock, (16, 2, 8), {}), {}, prefix="model.x.")
    message = str(info.value)
    assert message.startswith("weight conversion failed for BasicTransformerSingleLayerBlock (prefix 'model.x.'):")
    assert "\n  missing key: model.x.norm1.weight" in message and len(info.value.missing) == 13


def test_table_rows_name_their_transform():
    f = abstract(flax_sgm.SpatialTransformer, (32, 2, 8), dict(context_dim=16, use_linear=False))
    rows = {row.torch_key: row.transform.name for row in convert.conversion_table(f)}
    assert rows["proj_in.weight"] == "conv"
    assert rows["transformer_blocks.0.attn1.to_out.0.weight"] == "linear"
    assert rows["transformer_blocks.0.ff.net.0.proj.weight"] == "linear"
    assert rows["norm.weight"] == rows["transformer_blocks.0.norm2.weight"] == "norm"
