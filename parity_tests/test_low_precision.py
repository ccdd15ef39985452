"""bf16 on the CPU: flax_sgm's error against a float64 reference is no worse than torch's own bf16 error.

The same check as the GPU test (test_gpu.py), at CPU-sized shapes, through the one
harness (flax_sgm.verify.compare with dtype="bfloat16", judged by verify.criteria).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_sgm
import torch_ref
from conftest import compare, randomize_
from flax_sgm.checkpoints import convert
from flax_sgm.nn import primitives
from flax_sgm.verify import criteria, verify_modules

# name: (torch class, flax class, args, kwargs, inputs from a numpy Generator)
CASES = {
    "cross-attention": (torch_ref.CrossAttention, flax_sgm.CrossAttention, (64, 48, 4, 16), {},
                        lambda r: {"x": r.standard_normal((2, 96, 64)), "context": r.standard_normal((2, 77, 48))}),
    "block": (torch_ref.BasicTransformerBlock, flax_sgm.BasicTransformerBlock, (64, 4, 16), dict(context_dim=48),
              lambda r: {"x": r.standard_normal((2, 96, 64)), "context": r.standard_normal((2, 77, 48))}),
    "single-layer-block": (torch_ref.BasicTransformerSingleLayerBlock, flax_sgm.BasicTransformerSingleLayerBlock,
                           (64, 4, 16), {}, lambda r: {"x": r.standard_normal((2, 96, 64))}),
    "spatial-transformer": (torch_ref.SpatialTransformer, flax_sgm.SpatialTransformer, (64, 4, 16),
                            dict(depth=2, context_dim=48, use_linear=True),
                            lambda r: {"x": r.standard_normal((2, 64, 9, 11)), "context": r.standard_normal((2, 77, 48))}),
}


def bf16_pair(case, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16):
    """A torch module and its flax twin computing in `dtype`; torch's weights are rounded to bf16 by the harness."""
    t_cls, f_cls, args, kwargs, _ = CASES[case]
    t = randomize_(t_cls(*args, **kwargs), seed=seed)
    f = nnx.eval_shape(lambda: f_cls(*args, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **kwargs))
    # Rounded the way the harness rounds torch's copy, so both hold the same bf16 values.
    bf16_state = {k: v.to(torch.bfloat16) for k, v in t.state_dict().items()}
    return t, convert.load_torch_state_dict(f, bf16_state)


def case_inputs(case, seed):
    return {k: v.astype(np.float32) for k, v in CASES[case][-1](np.random.default_rng(seed)).items()}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_error_no_worse_than_torch(case, seed):
    t, f = bf16_pair(case, seed=seed)
    result = compare(t, f, case_inputs(case, seed), dtype="bfloat16", seed=seed + 1)
    assert {"out", "input:x"} <= set(result.errors) and len(result.errors) > 4
    flax_worst = max(e[0] for e in result.errors.values())
    low, high = criteria.BF16_ERROR_RANGE
    assert low < flax_worst < high  # bf16-sized: really ran in bf16, and is not broken
    assert not result.problems()


def test_the_check_catches_a_wrong_weight():
    """A 10% error in one weight fails the check."""
    t, f = bf16_pair("block")
    f.attn1.to_v.kernel[...] = f.attn1.to_v.kernel[...] * 1.1
    problems = compare(t, f, case_inputs("block", 0), dtype="bfloat16").problems()
    assert any(p.startswith("out:") for p in problems), problems


def test_the_check_catches_a_bias_gradient_summed_in_bf16(monkeypatch):
    """What flax_sgm did before primitives.add_bias: the check must see it."""
    monkeypatch.setattr(primitives, "add_bias", lambda y, bias: y + bias)
    t, f = bf16_pair("single-layer-block")
    problems = compare(t, f, case_inputs("single-layer-block", 0), dtype="bfloat16").problems()
    assert any("bias" in p for p in problems), problems


def test_the_compute_dtype_reaches_every_layer():
    """bf16 compute over float32 parameters: every submodule verify_modules reports computes in bf16.

    A layer the dtype does not reach computes in its float32 parameters' dtype, and its row fails.
    """
    t, f = bf16_pair("spatial-transformer", param_dtype=jnp.float32)
    report = verify_modules(t, f, case_inputs("spatial-transformer", 0), dtype="bfloat16")
    assert len(report.rows) == 15 and report.model.flax_dtype == "bfloat16"
    assert {r.name: r.flax_dtype for r in report.rows} == {r.name: "bfloat16" for r in report.rows}
    assert report.passed, report.format()
