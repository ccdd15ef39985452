"""Seeded random weights and inputs: what `flax-sgm verify` runs without a checkpoint, and the tests' fixtures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_sgm.checkpoints import convert
from flax_sgm.attention.config import PRESETS, SpatialTransformerConfig
from flax_sgm import models
from flax_sgm.verify.tiny import randomize_  # noqa: F401  (seeded.randomize_, as before)


def flax_twin(torch_module: torch.nn.Module, flax_cls, *args, allow_downcast: bool | None = None, **kwargs):
    """The flax module of the same config, built abstractly and filled from torch's weights.

    `args` and `kwargs` are flax_cls's (`dtype`, `param_dtype` among them). A
    `param_dtype` narrower than torch's weights (bfloat16 from float32) rounds them,
    as the caller asked; `allow_downcast=False` refuses instead.
    """
    if allow_downcast is None:
        allow_downcast = "param_dtype" in kwargs
    model = nnx.eval_shape(lambda: flax_cls(*args, rngs=nnx.Rngs(0), **kwargs))
    return convert.load_torch_state_dict(model, torch_module.state_dict(), allow_downcast=allow_downcast)


def sample_inputs(
    config: SpatialTransformerConfig, *, seed: int, batch: int = 2, hw: tuple[int, int] = (16, 16), context_tokens: int = 77
) -> dict:
    """Seeded inputs of a SpatialTransformer config: x NCHW and, when it has a context_dim, a context (or one per block)."""
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.standard_normal((batch, config.in_channels, *hw)).astype(np.float32)}
    dims = config.context_dim
    if isinstance(dims, tuple):
        inputs["context"] = [rng.standard_normal((batch, context_tokens, d)).astype(np.float32) for d in dims]
    elif dims is not None:
        inputs["context"] = rng.standard_normal((batch, context_tokens, dims)).astype(np.float32)
    return inputs


def torch_spatial_transformer(config: SpatialTransformerConfig) -> torch.nn.Module:
    """torch_ref's SpatialTransformer of `config` (its constructor's arguments)."""
    import torch_ref

    kwargs = config.seed_args()
    kwargs["sdp_backend"] = None  # flax_sgm's backend names; torch's kernel choice does not change the math
    return torch_ref.SpatialTransformer(**kwargs)


# SDXL's first transformer level (input_blocks.4.1) at 16 x 16 pixels: realistic widths, seconds on a CPU.
VERIFY_DEFAULT = PRESETS["sdxl"].config.replace(use_checkpoint=False)


def spatial_transformer_pair(
    config: SpatialTransformerConfig,
    torch_state: Mapping[str, Any] | None = None,
    flax_module: nnx.Module | None = None,
    *,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[torch.nn.Module, nnx.Module, dict]:
    """torch_ref's SpatialTransformer of `config`, its flax_sgm twin and seeded inputs: what `verify_modules` takes.

    Weights: `torch_state` (torch names; arrays or tensors) or, without it, seeded random
    ones. The flax side is `flax_module` (e.g. converted from a file) or converted from
    torch's weights rounded to `dtype`, computing in `dtype`.
    """
    torch_module = torch_spatial_transformer(config)
    if torch_state is None:
        randomize_(torch_module, seed)
    else:
        torch_module.load_state_dict(convert.as_torch_tensors(torch_state), strict=True)
    if flax_module is None:
        jdtype = jnp.dtype(dtype)
        flax_module = models.abstract(config, dtype=jdtype, param_dtype=jdtype)
        convert.load_torch_state_dict(flax_module, torch_module.state_dict(), allow_downcast=True)
    return torch_module, flax_module, sample_inputs(config, seed=seed)


def unet_pair(*, dtype: str = "float32", seed: int = 0, hw: tuple[int, int] = (16, 16)):
    """`flax-sgm verify --model unet`: the tiny SDXL-style diffusers UNet (verify.tiny: no attention at level 0,
    depths 1 and 2, the vector y through text_time) with seeded random weights, its flax_sgm twin and inputs."""
    from flax_sgm.verify import tiny

    torch_unet = tiny.unet("sdxl", seed=seed)
    flax_unet = unet_twin(torch_unet, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    return flax_unet.config, torch_unet, flax_unet, unet_inputs(flax_unet.config, seed=seed, hw=hw)


def unet_twin(torch_unet, *, dtype=None, param_dtype=jnp.float32):
    """flax_sgm's UNetModel of a diffusers UNet2DConditionModel's config (checkpointing off), its weights read under
    diffusers' names; a param_dtype narrower than torch's weights rounds them."""
    from flax_sgm.unet.config import UNetConfig
    from flax_sgm.unet.diffusers import vector_embedding
    from flax_sgm.unet.layout import diffusers_layout

    config = UNetConfig.from_diffusers(dict(torch_unet.config), use_checkpoint=False)
    layout = diffusers_layout(config, vector_embedding(torch_unet.config))
    model = models.abstract(config, dtype=dtype, param_dtype=param_dtype)
    return convert.load_torch_state_dict(model, torch_unet.state_dict(), layout=layout, allow_downcast=True)


def unet_inputs(config, *, seed: int, hw: tuple[int, int] = (16, 16), context_tokens: int = 77) -> dict:
    """Seeded inputs of a UNetConfig: x NCHW, two timesteps, a context and SDXL's vector y where the model takes them."""
    rng = np.random.default_rng(seed)
    inputs = {
        "x": rng.standard_normal((2, config.in_channels, *hw)).astype(np.float32),
        "timesteps": np.array([3, 917], np.int64),
    }
    if config.context_dim is not None:
        inputs["context"] = rng.standard_normal((2, context_tokens, config.context_dim)).astype(np.float32)
    if config.adm_in_channels is not None:
        inputs["y"] = rng.standard_normal((2, config.adm_in_channels)).astype(np.float32)
    return inputs


def vae_pair(*, dtype: str = "float32", seed: int = 0, hw: tuple[int, int] = (16, 16)):
    """`flax-sgm verify --model vae`: the tiny diffusers AutoencoderKL (verify.tiny: two levels and the mid block's
    attention) with seeded random weights, its flax_sgm twin and images."""
    from flax_sgm.verify import tiny

    torch_vae = tiny.vae("tiny", seed=seed)
    flax_vae = vae_twin(torch_vae, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    return flax_vae.config, torch_vae, flax_vae, vae_inputs(flax_vae.config, seed=seed, hw=hw)


def vae_twin(torch_vae, *, dtype=None, param_dtype=jnp.float32):
    """flax_sgm's AutoencoderKL of a diffusers AutoencoderKL's config, its weights read under diffusers' names."""
    from flax_sgm.autoencoder.config import AutoencoderConfig
    from flax_sgm.autoencoder.layout import diffusers_layout

    config = AutoencoderConfig.from_diffusers(dict(torch_vae.config))
    model = models.abstract(config, dtype=dtype, param_dtype=param_dtype)
    return convert.load_torch_state_dict(model, torch_vae.state_dict(), layout=diffusers_layout(config), allow_downcast=True)


def vae_inputs(config, *, seed: int, hw: tuple[int, int] = (16, 16)) -> dict:
    """Seeded images in [-1, 1], NCHW (torch's layout)."""
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(-1, 1, (2, config.in_channels, *hw)).astype(np.float32)}


# `flax-sgm verify --model text-encoder`: an OpenCLIP-like text tower (exact GELU, the projection) in miniature.
VERIFY_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=0, pad_token_id=1,
                   eos_token_id=2)


def text_encoder_pair(*, dtype: str = "float32", seed: int = 0):
    """transformers' CLIPTextModelWithProjection of VERIFY_TEXT with seeded random weights, its flax_sgm twin and ids."""
    from transformers import CLIPTextConfig as TransformersConfig
    from transformers import CLIPTextModelWithProjection

    torch_text = randomize_(CLIPTextModelWithProjection(TransformersConfig(**VERIFY_TEXT)).eval(), seed)
    flax_text = text_encoder_twin(torch_text, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    return flax_text.config, torch_text, flax_text, text_inputs(flax_text.config, seed=seed)


def text_encoder_twin(torch_text, *, dtype=None, param_dtype=jnp.float32):
    """flax_sgm's CLIPTextModel of a transformers CLIPTextModel(WithProjection)'s config and weights."""
    from flax_sgm.text.config import CLIPTextConfig
    from flax_sgm.text.layout import TRANSFORMERS

    config = CLIPTextConfig.from_transformers(torch_text.config.to_dict(), projection=hasattr(torch_text, "text_projection"))
    model = models.abstract(config, dtype=dtype, param_dtype=param_dtype)
    layout = TRANSFORMERS if hasattr(torch_text, "text_model") else None  # transformers 5's CLIPTextModel is flat
    return convert.load_torch_state_dict(model, torch_text.state_dict(), layout=layout, allow_downcast=True)


def text_inputs(config, *, seed: int, batch: int = 2) -> dict:
    """Seeded token ids [batch, positions] as a tokenizer makes them: the start token, words, the end token at a
    different place in each row, then the end token as padding. The end token is where the config pools:
    the vocabulary's last id for the legacy eos_token_id (CLIP's 49407), else eos_token_id."""
    rng = np.random.default_rng(seed)
    n, end = config.max_position_embeddings, (config.vocab_size - 1 if config.pools_at_argmax else config.eos_token_id)
    ids = rng.integers(1, config.vocab_size - 1, (batch, n))
    ids[ids == end] = end - 1 if end > 1 else end + 1
    ids[:, 0] = config.bos_token_id if config.bos_token_id is not None and config.bos_token_id != end else 0
    for i in range(batch):
        stop = min(n - 1, 3 + 4 * i)
        ids[i, stop:] = end
    return {"x": ids.astype(np.int64)}
