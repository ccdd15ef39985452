"""Where the whole UNet's CPU time goes: its parts at SD 1.5's widths, flax_sgm under jit against diffusers eager.

For each level of SD 1.5 at a 32x32 latent (320 channels at 32x32, 640 at 16x16,
1280 at 8x8; batch 2, fp32, forward): a ResBlock against diffusers' ResnetBlock2D, a
SpatialTransformer (depth 1, 8 heads, context 77 x 768) against Transformer2DModel,
and the 3x3 convolution alone: XLA's (what flax_sgm runs), the same as nine shifted
matmuls (an alternative tried), and torch's. Random weights; times in ms (median).

    python bench/unet_parts.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import emit, environment, jax_sync, median_ms, torch_median_ms
from flax_sgm import SpatialTransformer
from flax_sgm.unet.model import ResBlock

LEVELS = ((320, 32), (640, 16), (1280, 8))
BATCH, EMB, CONTEXT = 2, 1280, (77, 768)


def conv_xla(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_matmuls(x, kernel):
    """The same convolution as nine shifted matmuls summed."""
    _, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, i : i + h, j : j + w] @ kernel[i, j] for i in range(3) for j in range(3))


def main():
    import torch
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    timing = dict(warmup=2, iters=10, repeats=3)
    rows = []
    for channels, hw in LEVELS:
        x = rng.standard_normal((BATCH, hw, hw, channels)).astype(np.float32)
        emb = rng.standard_normal((BATCH, EMB)).astype(np.float32)
        ctx = rng.standard_normal((BATCH, *CONTEXT)).astype(np.float32)
        kernel = (rng.standard_normal((3, 3, channels, channels)) * 0.02).astype(np.float32)
        jx, jemb, jctx, jkernel = map(jnp.asarray, (x, emb, ctx, kernel))
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        temb, tctx = torch.from_numpy(emb), torch.from_numpy(ctx)
        tkernel = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())

        res = ResBlock(channels, EMB, 0.0, use_checkpoint=False, eps=1e-5, rngs=nnx.Rngs(0), checkpoint_policy="recompute")
        attn = SpatialTransformer(channels, 8, channels // 8, context_dim=CONTEXT[1], use_checkpoint=False, rngs=nnx.Rngs(0))
        t_res = ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=EMB).eval()
        t_attn = Transformer2DModel(8, channels // 8, in_channels=channels, cross_attention_dim=CONTEXT[1]).eval()
        call = nnx.jit(lambda m, *a: m(*a))
        xla, matmuls = jax.jit(conv_xla), jax.jit(conv_matmuls)
        rows.append({
            "channels x hw": f"{channels} x {hw}",
            "ResBlock flax": median_ms(lambda: call(res, jx, jemb), jax_sync, **timing),
            "ResBlock torch": torch_median_ms(lambda: t_res(tx, temb), **timing),
            "SpatialTransformer flax": median_ms(lambda: call(attn, jx, jctx), jax_sync, **timing),
            "SpatialTransformer torch": torch_median_ms(lambda: t_attn(tx, encoder_hidden_states=tctx).sample, **timing),
            "conv3x3 XLA": median_ms(lambda: xla(jx, jkernel), jax_sync, **timing),
            "conv3x3 9 matmuls": median_ms(lambda: matmuls(jx, jkernel), jax_sync, **timing),
            "conv3x3 torch": torch_median_ms(lambda: torch.nn.functional.conv2d(tx, tkernel, padding=1), **timing),
        })
    emit(rows, environment(), None)


if __name__ == "__main__":
    main()
