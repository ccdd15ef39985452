"""Which model each config builds: the one table every loader looks a config up in.

A config knows nothing of its model (arrows run down: models -> configs); `build(config)` makes the model with
random weights, `abstract(config)` the same tree with ShapeDtypeStruct parameters for a loader to fill, built without
tracing.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from flax_sgm.attention.config import SpatialTransformerConfig
from flax_sgm.autoencoder.config import AutoencoderConfig
from flax_sgm.autoencoder.model import AutoencoderKL
from flax_sgm.attention.transformer import SpatialTransformer
from flax_sgm.nn.primitives import LazyRngs, shapes_only
from flax_sgm.text.config import CLIPTextConfig
from flax_sgm.text.model import CLIPTextModel
from flax_sgm.unet.config import UNetConfig
from flax_sgm.unet.model import UNetModel

Dtype = Any

MODELS: dict[type, Any] = {
    SpatialTransformerConfig: SpatialTransformer,
    UNetConfig: UNetModel,
    CLIPTextConfig: CLIPTextModel,
    AutoencoderConfig: AutoencoderKL,
}


def model_class(config) -> Any:
    try:
        return MODELS[type(config)]
    except KeyError:
        raise TypeError(f"no model is built from a {type(config).__name__}; known configs: "
                        f"{', '.join(c.__name__ for c in MODELS)}") from None


def build(config, *, rngs: nnx.Rngs | None = None, dtype: Dtype = None, param_dtype: Dtype = jnp.float32) -> nnx.Module:
    """The model of `config` with random weights (seeded by `rngs`, default nnx.Rngs(0))."""
    cls = model_class(config)
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        _check_float(cls, name, value)
    return cls(config, rngs=rngs or nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)


def _check_float(cls, name: str, value) -> None:
    """A floating dtype, or None for the compute dtype: an int8 param_dtype loaded every weight as zeros."""
    if value is None and name == "dtype":
        return
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{cls.__name__}: {name} must be a floating dtype (float32, bfloat16, float16, float64); "
                         f"got {value!r}")


def abstract(config, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, seed: int = 0) -> nnx.Module:
    """The same model with ShapeDtypeStruct parameters, for a loader to fill: built without running or tracing an
    initializer (primitives.shapes_only). Dropout RNG state, if any, is real: nnx.Rngs(seed)'s."""
    with shapes_only():
        return build(config, rngs=LazyRngs(seed), dtype=dtype, param_dtype=param_dtype)


def ready(model: nnx.Module) -> nnx.Module:
    """The model a loader returns: in inference mode (model.eval(): dropout off), as diffusers' and transformers'
    from_pretrained return theirs; model.train() turns dropout on. Its dropout keys are real already: the loader
    seeds them through abstract's `rngs`."""
    model.eval()
    return model
