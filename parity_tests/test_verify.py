"""flax_sgm.verify: verify_modules on the modules users bring (torch_ref, diffusers), and the float64 referee."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import Transformer2DModel
from diffusers.models.attention import BasicTransformerBlock

import flax_sgm
import torch_ref
from conftest import CRITERIA, CallAdapter, compare, flax_twin, randomize_
from test_torch_ref import seed, seed_text  # noqa: F401  (the seed file as a module)
from flax_sgm.verify import criteria, verify_modules

BLOCK_PARTS = ["norm1", "attn1", "norm2", "attn2", "norm3", "ff"]


@pytest.fixture(scope="module")
def diffusers_pair():
    """A diffusers Transformer2DModel as a user builds it (every weight random), and its flax_sgm twin."""
    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2,
                               cross_attention_dim=24)
    randomize_(model, seed=1)
    return model, flax_twin(model, flax_sgm.SpatialTransformer, 32, 2, 16, depth=2, context_dim=24)


def image_inputs(rng, channels=32, context_dim=24):
    return {"x": rng.standard_normal((2, channels, 5, 3)).astype(np.float32),
            "context": rng.standard_normal((2, 7, context_dim)).astype(np.float32)}


def test_diffusers_transformer_2d_passes_with_every_submodule(diffusers_pair, rng):
    model, twin = diffusers_pair
    report = verify_modules(model, twin, image_inputs(rng))
    expected = ["norm", "proj_in", *(f"transformer_blocks.{i}.{p}" for i in range(2) for p in BLOCK_PARTS), "proj_out"]
    assert [r.name for r in report.rows] == expected
    assert report.passed, report.format()
    assert all(r.backend for r in report.rows if ".attn" in r.name)
    assert report.to_dict()["submodules"][0]["name"] == "norm" and '"passed": true' in report.to_json()


def test_a_wrong_weight_fails_its_row_alone(diffusers_pair, rng):
    """Not the rows after it in the forward, nor the rows before it in the backward; and the whole model."""
    model, twin = diffusers_pair
    to_v = twin.transformer_blocks[1].attn2.to_v
    saved = to_v.kernel[...]
    to_v.kernel[...] = saved * 1.01
    try:
        report = verify_modules(model, twin, image_inputs(rng))
    finally:
        to_v.kernel[...] = saved
    assert [r.name for r in report.rows if not r.passed] == ["transformer_blocks.1.attn2"]
    assert not report.model.passed and not report.passed


def test_diffusers_basic_transformer_block(rng):
    block = randomize_(BasicTransformerBlock(32, 2, 16, cross_attention_dim=24), seed=2)
    twin = flax_twin(block, flax_sgm.BasicTransformerBlock, 32, 2, 16, context_dim=24, checkpoint=False)
    inputs = {"x": rng.standard_normal((2, 9, 32)).astype(np.float32),
              "context": rng.standard_normal((2, 7, 24)).astype(np.float32)}
    report = verify_modules(block, twin, inputs)
    assert [r.name for r in report.rows] == BLOCK_PARTS and report.passed, report.format()


def test_flax_twin_builds_a_bf16_twin(rng):
    """A bf16 twin rounds torch's float32 weights, as asked; verify_modules judges it in bf16."""
    import jax.numpy as jnp

    block = randomize_(BasicTransformerBlock(32, 2, 16, cross_attention_dim=24), seed=2)
    twin = flax_twin(block, flax_sgm.BasicTransformerBlock, 32, 2, 16, context_dim=24, checkpoint=False,
                     dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert twin.attn2.to_k.kernel.dtype == jnp.bfloat16
    inputs = {"x": rng.standard_normal((2, 9, 32)).astype(np.float32),
              "context": rng.standard_normal((2, 7, 24)).astype(np.float32)}
    report = verify_modules(block, twin, inputs, dtype="bfloat16")
    assert report.model.flax_dtype == "bfloat16" and report.passed, report.format()
    with pytest.raises(ValueError, match="allow_downcast"):
        flax_twin(block, flax_sgm.BasicTransformerBlock, 32, 2, 16, context_dim=24, param_dtype=jnp.bfloat16,
                  allow_downcast=False)


def test_the_seed_files_own_module(seed, rng):
    """The seed's SpatialTransformer itself (the file run as a module: test_torch_ref's `seed` fixture)."""
    t = randomize_(seed.SpatialTransformer(32, 2, 16, context_dim=24, use_linear=True, use_checkpoint=False), seed=5)
    f = flax_twin(t, flax_sgm.SpatialTransformer, 32, 2, 16, context_dim=24, use_linear=True)
    report = verify_modules(t, f, image_inputs(rng))
    assert len(report.rows) == 9 and report.passed, report.format()


def test_an_explicit_adapter_calls_another_convention(rng):
    """torch_ref's block through its _forward (the seed's forward drops additional_tokens)."""
    t = randomize_(torch_ref.BasicTransformerBlock(16, 2, 8, context_dim=12, checkpoint=False), seed=3)
    f = flax_twin(t, flax_sgm.BasicTransformerBlock, 16, 2, 8, context_dim=12, checkpoint=False)
    inputs = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32),
              "context": rng.standard_normal((2, 3, 12)).astype(np.float32),
              "additional_tokens": rng.standard_normal((2, 2, 16)).astype(np.float32)}
    assert verify_modules(t, f, inputs, adapter=CallAdapter(method="_forward")).passed


def test_float64_referee_rejects_a_weight_error_torch_does_not_have(rng):
    t = randomize_(torch_ref.SpatialTransformer(32, 2, 16, context_dim=24, use_linear=True), seed=4)
    f = flax_twin(t, flax_sgm.SpatialTransformer, 32, 2, 16, context_dim=24, use_linear=True)
    inputs = image_inputs(rng)
    assert compare(t, f, inputs).passed
    f.proj_out.kernel[...] = f.proj_out.kernel[...] * (1 + 1e-3)
    result = compare(t, f, inputs)
    flax_err, torch_err = result.errors["out"]
    assert torch_err < CRITERIA["float32"].forward < flax_err
    assert any(p.startswith("out:") for p in result.problems()), result.problems()


def test_criterion_ratio_and_floor():
    assert criteria.ratio(0.0, 0.0) == 0.0 and criteria.ratio(1e-7, 0.0) == float("inf")
    assert not criteria.problems({"out": (0.0, 0.0), "w": (0.0, 0.0)}, "bfloat16")  # no division by zero
    fp32 = CRITERIA["float32"]
    assert not criteria.problems({"out": (fp32.forward, 0.0)}, "float32")  # at the floor
    assert criteria.problems({"out": (fp32.forward * 1.01, 0.0)}, "float32")
    assert not criteria.problems({"out": (fp32.slack * 1e-3, 1e-3)}, "float32")  # torch itself far off float64
    with pytest.raises(ValueError, match="no parity criterion for dtype 'float16'"):
        criteria.criterion("float16")


def test_bad_calls_raise_value_errors(diffusers_pair, rng):
    model, twin = diffusers_pair
    with pytest.raises(ValueError, match="`inputs` must hold `x`"):
        verify_modules(model, twin, {"context": rng.standard_normal((2, 7, 24)).astype(np.float32)})
    with pytest.raises(ValueError, match="`reference` must be one of"):
        compare(model, twin, image_inputs(rng), reference="float16")
    with pytest.raises(ValueError, match="bfloat16 is judged against float64"):
        compare(model, twin, image_inputs(rng), dtype="bfloat16", reference="torch")


def test_flax_sgm_and_the_criteria_import_without_torch():
    """Tolerances are read by torch-free code (and import flax_sgm never needs torch)."""
    code = "import sys, flax_sgm; from flax_sgm.verify import criteria; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
