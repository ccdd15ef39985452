"""GPU-only checks: cuDNN is really used, bf16 error no worse than torch's, fp32 parity at full precision.

Skipped without a CUDA GPU visible to both jax and torch. Run on the lent GPU with
`bash bench/gpu_all.sh` (which also runs the benchmarks).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_sgm
import torch_ref
from conftest import assert_parity, compare, flax_twin, randomize_
from flax_sgm.checkpoints import convert
from flax_sgm.attention.backends import dot_product_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() != "gpu" or not torch.cuda.is_available(),
        reason="needs a CUDA GPU visible to both jax and torch (CI and the dev machines have none)",
    ),
]

@pytest.mark.parametrize("n,m", [(4096, 4096), (4096, 77), (77, 77)], ids=["self", "cross-77", "odd-both"])
def test_auto_bf16_lowers_to_cudnn_forward_and_backward(n, m):
    q = jnp.ones((2, n, 10, 64), jnp.bfloat16)
    k = v = jnp.ones((2, m, 10, 64), jnp.bfloat16)

    def loss(q, k, v):
        return dot_product_attention(q, k, v, scale=0.125).astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    assert "__cudnn$fmha" in text  # the cuDNN fused-attention custom calls
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))  # and it runs


CASES = {
    "cross-attention": (lambda: torch_ref.CrossAttention(640, 2048, 10, 64), flax_sgm.CrossAttention, (640, 2048, 10, 64), {}, False,
                        lambda r: {"x": r.standard_normal((2, 1024, 640)), "context": r.standard_normal((2, 77, 2048))}),
    "block": (lambda: torch_ref.BasicTransformerBlock(640, 10, 64, context_dim=2048, checkpoint=False), flax_sgm.BasicTransformerBlock,
              (640, 10, 64), dict(context_dim=2048, checkpoint=False), False,
              lambda r: {"x": r.standard_normal((2, 1024, 640)), "context": r.standard_normal((2, 77, 2048))}),
    "single-layer-block": (lambda: torch_ref.BasicTransformerSingleLayerBlock(640, 10, 64, checkpoint=False),
                           flax_sgm.BasicTransformerSingleLayerBlock, (640, 10, 64), dict(checkpoint=False), False,
                           lambda r: {"x": r.standard_normal((2, 1024, 640))}),
    "spatial-transformer": (lambda: torch_ref.SpatialTransformer(640, 10, 64, depth=2, context_dim=2048, use_linear=True, use_checkpoint=False),
                            flax_sgm.SpatialTransformer, (640, 10, 64), dict(depth=2, context_dim=2048, use_linear=True, use_checkpoint=False), True,
                            lambda r: {"x": r.standard_normal((2, 640, 32, 32)), "context": r.standard_normal((2, 77, 2048))}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_error_no_worse_than_torch(case):
    make_torch, flax_cls, args, kwargs, _, make_inputs = CASES[case]
    inputs = {k: v.astype(np.float32) for k, v in make_inputs(np.random.default_rng(0)).items()}
    t = randomize_(make_torch(), seed=0)
    # flax_sgm holds torch's weights rounded to bf16, as the harness rounds torch's copy.
    f = nnx.eval_shape(lambda: flax_cls(*args, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **kwargs))
    convert.load_torch_state_dict(f, {k: v.to(torch.bfloat16) for k, v in t.state_dict().items()})
    result = compare(t, f, inputs, dtype="bfloat16", device="cuda")
    print(f"\n{case}: worst (flax, torch) bf16 rel err vs float64:", max(result.errors.items(), key=lambda kv: kv[1][0]))
    assert not result.problems(), result.problems()


def test_fp32_gpu_matches_torch_at_full_precision(rng):
    """flax_sgm in fp32 on the GPU, matmuls pinned to full precision (no TF32), against torch's exact fp32.

    torch runs on the CPU, where fp32 is exact with no TF32 switch to forget.
    """
    with jax.default_matmul_precision("highest"):
        t = randomize_(torch_ref.SpatialTransformer(64, 4, 16, depth=2, context_dim=32, use_linear=True), seed=3)
        f = flax_twin(t, flax_sgm.SpatialTransformer, 64, 4, 16, depth=2, context_dim=32, use_linear=True)
        x = rng.standard_normal((2, 64, 9, 7)).astype(np.float32)
        ctx = rng.standard_normal((2, 11, 32)).astype(np.float32)
        result = compare(t, f, {"x": x, "context": ctx})  # against float64, torch's fp32 on the CPU beside it
        assert_parity(result, "SpatialTransformer (GPU fp32)")
