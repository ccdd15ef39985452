"""bf16 on the CPU: flax_sgm's error against a float64 reference is no worse than torch's own bf16 error.

The same check as the GPU test (test_gpu.py), at CPU-sized shapes, through the one
function in flax_sgm.parity (low_precision_errors, low_precision_problems).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_sgm
import torch_ref
from conftest import randomize_
from flax_sgm import convert
from flax_sgm import primitives
from flax_sgm.parity import low_precision_errors, low_precision_problems

# name: (torch class, flax class, args, kwargs, image input/output, inputs from a numpy Generator)
CASES = {
    "cross-attention": (torch_ref.CrossAttention, flax_sgm.CrossAttention, (64, 48, 4, 16), {}, False,
                        lambda r: {"x": r.standard_normal((2, 96, 64)), "context": r.standard_normal((2, 77, 48))}),
    "block": (torch_ref.BasicTransformerBlock, flax_sgm.BasicTransformerBlock, (64, 4, 16), dict(context_dim=48), False,
              lambda r: {"x": r.standard_normal((2, 96, 64)), "context": r.standard_normal((2, 77, 48))}),
    "single-layer-block": (torch_ref.BasicTransformerSingleLayerBlock, flax_sgm.BasicTransformerSingleLayerBlock,
                           (64, 4, 16), {}, False, lambda r: {"x": r.standard_normal((2, 96, 64))}),
    "spatial-transformer": (torch_ref.SpatialTransformer, flax_sgm.SpatialTransformer, (64, 4, 16),
                            dict(depth=2, context_dim=48, use_linear=True), True,
                            lambda r: {"x": r.standard_normal((2, 64, 9, 11)), "context": r.standard_normal((2, 77, 48))}),
}


def bf16_pair(case, seed=0):
    """A torch factory holding bf16-representable weights, and the bf16 flax twin."""
    t_cls, f_cls, args, kwargs, _, _ = CASES[case]
    bf16_state = {k: v.to(torch.bfloat16) for k, v in randomize_(t_cls(*args, **kwargs), seed=seed).state_dict().items()}

    def make_torch():
        t = t_cls(*args, **kwargs)
        t.load_state_dict({k: v.float() for k, v in bf16_state.items()})
        return t

    f = nnx.eval_shape(lambda: f_cls(*args, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **kwargs))
    return make_torch, convert.load_torch_state_dict(f, bf16_state)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_error_no_worse_than_torch(case, seed):
    *_, image, make_inputs = CASES[case]
    inputs = {k: v.astype(np.float32) for k, v in make_inputs(np.random.default_rng(seed)).items()}
    make_torch, f = bf16_pair(case, seed=seed)
    errs = low_precision_errors(make_torch, f, inputs, image=image, seed=seed + 1)
    assert {"out", "input:x"} <= set(errs) and len(errs) > 4
    flax_worst = max(e[0] for e in errs.values())
    assert 1e-4 < flax_worst < 0.1  # bf16-sized: really ran in bf16, and is not broken
    assert not low_precision_problems(errs)


def test_the_check_catches_a_wrong_weight():
    """A 10% error in one weight, or a bias gradient summed in bf16, fails the check."""
    *_, image, make_inputs = CASES["block"]
    inputs = {k: v.astype(np.float32) for k, v in make_inputs(np.random.default_rng(0)).items()}
    make_torch, f = bf16_pair("block")
    f.attn1.to_v.kernel[...] = f.attn1.to_v.kernel[...] * 1.1
    errs = low_precision_errors(make_torch, f, inputs, image=image)
    assert any(p.startswith("out:") for p in low_precision_problems(errs))


def test_the_check_catches_a_bias_gradient_summed_in_bf16(monkeypatch):
    """What flax_sgm did before primitives.add_bias: the check must see it."""
    *_, image, make_inputs = CASES["single-layer-block"]
    inputs = {k: v.astype(np.float32) for k, v in make_inputs(np.random.default_rng(0)).items()}
    monkeypatch.setattr(primitives, "add_bias", lambda y, bias: y + bias)
    make_torch, f = bf16_pair("single-layer-block")
    problems = low_precision_problems(low_precision_errors(make_torch, f, inputs, image=image))
    assert any("bias" in p for p in problems), problems
