"""bf16 on the CPU: flax_sgm's error against a float64 reference is no worse than torch's own bf16 error.

The same check as the GPU test (test_gpu.py), at CPU-sized shapes, through the one
function in flax_sgm.parity (low_precision_errors, LOW_PRECISION_SLACK).
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
from flax_sgm.parity import LOW_PRECISION_SLACK, low_precision_errors

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


KNOWN_GAPS = {
    # Measured 2026-11-25 (seed 0): the second block's attn1 to_q / to_k weight gradients
    # are 2.1x / 2.0x torch's bf16 error, everything else <= 1.64x. Not explained yet;
    # strict, so the day it passes this entry has to go.
    "spatial-transformer": "block 1 attn1 to_q/to_k weight gradients 2x torch's bf16 error (unexplained)",
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_GAPS[c], strict=True)) if c in KNOWN_GAPS else c for c in CASES],
)
def test_bf16_error_no_worse_than_torch(case):
    *_, image, make_inputs = CASES[case]
    inputs = {k: v.astype(np.float32) for k, v in make_inputs(np.random.default_rng(0)).items()}
    make_torch, f = bf16_pair(case)
    errs = low_precision_errors(make_torch, f, inputs, image=image)
    assert {"out", "input:x"} <= set(errs) and len(errs) > 4
    flax_worst = max(e[0] for e in errs.values())
    assert 1e-4 < flax_worst < 0.1  # bf16-sized: really ran in bf16, and is not broken
    bad = {k: e for k, e in errs.items() if e[0] > LOW_PRECISION_SLACK * e[1]}
    assert not bad, bad


def test_the_check_catches_a_wrong_weight():
    """A 10% error in one weight breaks the comparison: the check can fail."""
    *_, image, make_inputs = CASES["block"]
    inputs = {k: v.astype(np.float32) for k, v in make_inputs(np.random.default_rng(0)).items()}
    make_torch, f = bf16_pair("block")
    f.attn1.to_v.kernel[...] = f.attn1.to_v.kernel[...] * 1.1
    errs = low_precision_errors(make_torch, f, inputs, image=image)
    assert errs["out"][0] > LOW_PRECISION_SLACK * errs["out"][1]
