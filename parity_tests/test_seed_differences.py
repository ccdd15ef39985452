"""Where flax_sgm differs from the seed on purpose (the seed's bugs), and agrees where the seed is right.

Each test is named in the README's list of intended differences ("Known differences from the seed"); test_docs.py checks it.
"""

import numpy as np
import pytest
import torch

import flax_sgm
import torch_ref
from conftest import CRITERIA, CallAdapter, assert_close, assert_parity, compare, flax_twin, randomize_, rel_err


def block_pair(**options):
    t = randomize_(torch_ref.BasicTransformerBlock(16, 2, 8, context_dim=12, **options), seed=7)
    return t, flax_twin(t, flax_sgm.BasicTransformerBlock, 16, 2, 8, context_dim=12, **options)


@pytest.fixture
def block_inputs(rng):
    return {
        "x": rng.standard_normal((4, 5, 16)).astype(np.float32),
        "context": rng.standard_normal((4, 3, 12)).astype(np.float32),
        "additional_tokens": rng.standard_normal((4, 2, 16)).astype(np.float32),
    }


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_block_forward_honours_additional_tokens(block_inputs, checkpoint):
    """Seed bug A: BasicTransformerBlock.forward drops additional_tokens; flax_sgm honours it, remat or not."""
    t, f = block_pair(checkpoint=checkpoint)
    x, context, extra = (torch.from_numpy(block_inputs[k]) for k in ("x", "context", "additional_tokens"))
    with torch.no_grad():
        dropped = t(x, context=context, additional_tokens=extra)
        assert torch.equal(dropped, t(x, context=context))  # the seed ignores the tokens
        intended = t._forward(x, context=context, additional_tokens=extra)
    assert rel_err(intended, dropped) > CRITERIA["float32"].forward  # a difference parity sees
    # flax_sgm matches the seed's own _forward, forward values and gradients.
    assert_parity(compare(t, f, block_inputs, adapter=CallAdapter(method="_forward")), "BasicTransformerBlock")


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_block_forward_honours_cross_frame(block_inputs, checkpoint):
    """Seed bug A: forward drops n_times_crossframe_attn_in_self; flax_sgm honours it (b == n*n here)."""
    t, f = block_pair(checkpoint=checkpoint)
    inputs = {k: block_inputs[k] for k in ("x", "context")}
    x, context = torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["context"])
    with torch.no_grad():
        assert torch.equal(t(x, context=context, n_times_crossframe_attn_in_self=2), t(x, context=context))
    result = compare(t, f, inputs | {"n_times_crossframe_attn_in_self": 2}, adapter=CallAdapter(method="_forward"))
    assert_parity(result, "BasicTransformerBlock")


def cross_pair(rng):
    t = randomize_(torch_ref.CrossAttention(16, None, 2, 8), seed=8)
    return t, flax_twin(t, flax_sgm.CrossAttention, 16, None, 2, 8)


def test_cross_frame_agrees_where_the_seed_is_right(rng):
    """b == n*n: the seed's b // n repeat equals the intended n repeat; flax_sgm matches it."""
    t, f = cross_pair(rng)
    inputs = {"x": rng.standard_normal((9, 5, 16)).astype(np.float32)}
    assert_parity(compare(t, f, inputs | {"n_times_crossframe_attn_in_self": 3}), "CrossAttention")


def test_cross_frame_for_any_batch_divisible_by_n(rng):
    """Seed bug B: b = 2n fails in the seed's CrossAttention; flax_sgm gives the intended result.

    The intended result is the seed's MemoryEfficientCrossAttention, which repeats by n.
    """
    t, f = cross_pair(rng)
    x = rng.standard_normal((6, 5, 16)).astype(np.float32)
    with pytest.raises(RuntimeError):
        t(torch.from_numpy(x), n_times_crossframe_attn_in_self=3)
    reference = torch_ref.MemoryEfficientCrossAttention(16, None, 2, 8)
    reference.load_state_dict(t.state_dict())
    result = compare(reference, f, {"x": x, "n_times_crossframe_attn_in_self": 3})
    assert_parity(result, "CrossAttention")


def test_cross_frame_is_first_frame_attention(rng):
    """The intended rule, checked from first principles: frame i of a group uses frame 0's keys/values."""
    t, f = cross_pair(rng)
    x = rng.standard_normal((4, 5, 16)).astype(np.float32)
    out = np.asarray(f(x, n_times_crossframe_attn_in_self=2))
    for i in range(4):
        first = 2 * (i // 2)
        alone = f(x[i : i + 1], context=x[first : first + 1])
        assert_close(out[i : i + 1], alone, what=f"frame {i}")


def test_memory_efficient_attention_takes_masks(rng):
    """Seed bug C: the seed's xformers class raises on any mask; flax_sgm's applies it like CrossAttention."""
    t = randomize_(torch_ref.MemoryEfficientCrossAttention(16, 12, 2, 8), seed=9)
    x = torch.from_numpy(rng.standard_normal((2, 6, 16)).astype(np.float32))
    context = torch.from_numpy(rng.standard_normal((2, 5, 12)).astype(np.float32))
    mask = rng.random((6, 5)) > 0.4
    mask[:, 0] = True
    with pytest.raises(NotImplementedError):
        t(x, context=context, mask=torch.from_numpy(mask))
    reference = torch_ref.CrossAttention(16, 12, 2, 8)
    reference.load_state_dict(t.state_dict())
    f = flax_twin(t, flax_sgm.MemoryEfficientCrossAttention, 16, 12, 2, 8)
    inputs = {"x": x.numpy(), "context": context.numpy()}
    result = compare(reference, f, inputs | {"mask": mask})
    assert_parity(result, "MemoryEfficientCrossAttention")


# sgm's make_attn (sgm/modules/diffusionmodules/model.py, beside the seed): its "memory-efficient-cross-attn"
# branch tests the builtin `type` instead of `attn_type`, so sgm builds LinAttnBlock for it.


class IntendedCrossAttentionWrapper(torch_ref.MemoryEfficientCrossAttention):
    """What sgm's MemoryEfficientCrossAttentionWrapper means: the seed's attention over the pixels plus the image."""

    def forward(self, x):
        b, c, h, w = x.shape
        out = super().forward(x.flatten(2).transpose(1, 2))  # [b, h*w, c]
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class SgmCrossAttentionWrapper(torch_ref.MemoryEfficientCrossAttention):
    """sgm's wrapper as written: the residual adds the flattened [b, h*w, c] input to the [b, c, h, w] output."""

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        out = super().forward(x)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def test_memory_efficient_cross_attn_builds_the_cross_attention_wrapper(rng):
    """sgm bug D: attn_type "memory-efficient-cross-attn" builds LinAttnBlock in sgm (and its wrapper's residual
    cannot broadcast); flax_sgm builds the seed's MemoryEfficientCrossAttention as the wrapper means, forward and
    gradients equal to it."""
    from flax_sgm import models
    from flax_sgm.autoencoder.model import LinAttnBlock, MemoryEfficientCrossAttentionWrapper

    config = flax_sgm.AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8,
                                        attn_type="memory-efficient-cross-attn", attn_heads=2, attn_dim_head=8)
    vae = models.abstract(config)
    assert type(vae.encoder.mid.attn_1) is MemoryEfficientCrossAttentionWrapper
    assert not isinstance(vae.decoder.mid.attn_1, LinAttnBlock)
    t = randomize_(IntendedCrossAttentionWrapper(32, None, 2, 8), seed=10)
    f = flax_twin(t, MemoryEfficientCrossAttentionWrapper, 32, heads=2, dim_head=8)
    x = rng.standard_normal((2, 32, 3, 5)).astype(np.float32)
    bad = SgmCrossAttentionWrapper(32, None, 2, 8)
    bad.load_state_dict(t.state_dict())
    with pytest.raises(RuntimeError):
        bad(torch.from_numpy(x))
    assert_parity(compare(t, f, {"x": x}), "MemoryEfficientCrossAttentionWrapper")


def test_linear_attention_agrees_where_sgm_is_right(rng):
    """attn_type "linear" (and a file sgm wrote for "memory-efficient-cross-attn": LinAttnBlock's to_qkv) is
    the seed's LinearAttention with one head of all channels, forward and gradients."""
    from flax_sgm import models
    from flax_sgm.autoencoder.layout import config_from_weights
    from flax_sgm.checkpoints import convert
    from flax_sgm.autoencoder.model import LinAttnBlock

    t = randomize_(torch_ref.LinearAttention(32, heads=1, dim_head=32), seed=11)
    f = flax_twin(t, LinAttnBlock, 32)
    x = rng.standard_normal((2, 32, 3, 5)).astype(np.float32)
    assert_parity(compare(t, f, {"x": x}), "LinAttnBlock")
    config = flax_sgm.AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8, attn_type="linear")
    shapes = {k: np.empty(v, np.float32) for k, v in convert.torch_shapes(models.abstract(config)).items()}
    assert "encoder.mid.attn_1.to_qkv.weight" in shapes
    assert config_from_weights(shapes, "", scaling_factor=1.0, num_groups=8).attention == "linear"
    cross = config.replace(attn_type="memory-efficient-cross-attn", attn_heads=2, attn_dim_head=16)
    shapes = {k: np.empty(v, np.float32) for k, v in convert.torch_shapes(models.abstract(cross)).items()}
    assert config_from_weights(shapes, "", scaling_factor=1.0, num_groups=8, attn_heads=2) == cross.replace(scaling_factor=1.0)
