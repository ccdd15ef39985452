"""CLIPTextModel: the CLIP / OpenCLIP text tower (transformers' CLIPTextModel and CLIPTextModelWithProjection).

Token and position embeddings, pre-norm transformer layers with causal self-attention (the project's one
attention function) and a quick_gelu or exact-GELU MLP, the final layer norm, the pooled vector at the end
token and, where the config has one, the text projection. Attribute names are transformers' (5.x's flattened
CLIPTextModel), so its table is the identity; the other layouts are layout.py's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_sgm.nn import numerics
from flax_sgm.attention.backends import dot_product_attention
from flax_sgm.attention.policy import resolve_backend
from flax_sgm.nn.checks import expect_array, expect_shape
from flax_sgm.nn.primitives import Embed, LayerNorm, Linear
from flax_sgm.text.config import CLIPTextConfig

Dtype = Any

ACTIVATION_FUNCTIONS = {"quick_gelu": numerics.quick_gelu, "gelu": numerics.gelu}


class CLIPTextOutput(NamedTuple):
    """What transformers' CLIPTextModel / CLIPTextModelWithProjection return, under the same names."""

    last_hidden_state: jax.Array  # [b, n, hidden]: the last layer's output after final_layer_norm
    pooler_output: jax.Array  # [b, hidden]: last_hidden_state at each sequence's end token
    hidden_states: tuple[jax.Array, ...] | None = None  # the embeddings, then each layer's output (no final norm)
    text_embeds: jax.Array | None = None  # [b, projection_dim]: pooler_output projected (a config with projection_dim)


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding plus the position embedding of positions 0..n-1."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.token_embedding = Embed(config.vocab_size, config.hidden_size, **layer)
        self.position_embedding = Embed(config.max_position_embeddings, config.hidden_size, **layer)

    def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None) -> jax.Array:
        n = input_ids.shape[1]
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        positions = self.position_embedding(jnp.arange(n))  # [n, hidden]
        return tokens.astype(positions.dtype) + positions


class CLIPAttention(nnx.Module):
    """Multi-head self-attention of x [b, n, hidden] under a boolean mask broadcasting to [b, heads, n, n]."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        dim = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = numerics.attention_scale(self.head_dim)
        self.backend = resolve_backend(config.sdp_backend or "auto")
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.k_proj = Linear(dim, dim, axes=("embed", "heads"), **layer)
        self.v_proj = Linear(dim, dim, axes=("embed", "heads"), **layer)
        self.q_proj = Linear(dim, dim, axes=("embed", "heads"), **layer)
        self.out_proj = Linear(dim, dim, axes=("heads", "embed"), **layer)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        q, k, v = (proj(x).reshape(b, n, self.heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = dot_product_attention(q, k, v, mask, scale=self.scale, backend=self.backend)  # [b, n, heads, head_dim]
        return self.out_proj(out.reshape(b, n, self.heads * self.head_dim))


class CLIPMLP(nnx.Module):
    """fc1 -> quick_gelu or exact GELU -> fc2."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.activation = ACTIVATION_FUNCTIONS[config.hidden_act]
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"), **layer)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, axes=("mlp", "embed"), **layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm: x + attention(norm1(x)), then + mlp(norm2(.))."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(config, **layer)
        self.layer_norm1 = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **layer)
        self.mlp = CLIPMLP(config, **layer)
        self.layer_norm2 = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **layer)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for _ in range(config.num_hidden_layers)]
        )


class CLIPTextModel(nnx.Module):
    """The text tower of `config`; `model(input_ids)` -> CLIPTextOutput.

    input_ids: int [b, n], n <= max_position_embeddings (77 for every released tower).
    attention_mask: optional [b, n], 1 (or True) keeps a token as a key, 0 hides it (padding), on top of the
      causal mask (Stable Diffusion's pipelines pass none).
    inputs_embeds: optional [b, n, hidden] in place of the token embeddings (prompt tuning); input_ids still
      say where the end token is.
    output_hidden_states: also return hidden_states (the embeddings and every layer's output).
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.config = config
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPTextEmbeddings(config, **layer)
        self.encoder = CLIPEncoder(config, **layer)
        self.final_layer_norm = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **layer)
        if config.projection_dim is not None:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, axes=("embed", None), use_bias=False,
                                          **layer)
        else:
            self.text_projection = None

    def _check(self, input_ids, attention_mask, inputs_embeds) -> None:
        name, c = type(self).__name__, self.config
        expect_shape(name, "input_ids", input_ids, ("b", "n"))
        if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
            raise ValueError(f"{name}: `input_ids` must be integer token ids; got dtype {jnp.result_type(input_ids)}")
        b, n = np.shape(input_ids)
        try:
            too_long = n > c.max_position_embeddings
        except Exception:  # jax.export's symbolic n: the comparison is inconclusive without a constraint
            raise ValueError(f"{name}: a symbolic token count needs the constraint n <= {c.max_position_embeddings} "
                             f"(jax.export.symbolic_shape('b, n', constraints=['n <= {c.max_position_embeddings}']))"
                             ) from None
        if too_long:
            raise ValueError(
                f"{name}: `input_ids` has {n} tokens, more than the {c.max_position_embeddings} positions of the model "
                "(truncate the prompt, as the tokenizer does)"
            )
        if not isinstance(input_ids, jax.core.Tracer):  # under jit an id out of range gives NaN (primitives.Embed)
            ids = np.asarray(input_ids)
            if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
                bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                raise ValueError(f"{name}: `input_ids` holds {bad}, outside the vocabulary 0..{c.vocab_size - 1}")
        if attention_mask is not None:
            expect_shape(name, "attention_mask", attention_mask, (b, n))
        if inputs_embeds is not None:
            expect_shape(name, "inputs_embeds", inputs_embeds, (b, n, c.hidden_size))

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        expect_array(type(self).__name__, "input_ids", input_ids)
        self._check(input_ids, attention_mask, inputs_embeds)
        input_ids = jnp.asarray(input_ids)
        b, n = input_ids.shape
        mask = jnp.tril(jnp.ones((n, n), jnp.bool_))  # [n, m]: causal, a token sees itself and what precedes it
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]  # [b, 1, n, m]
        h = self.embeddings(input_ids, inputs_embeds)
        hidden_states = [h]
        for layer in self.encoder.layers:
            h = layer(h, mask)
            hidden_states.append(h)
        last = self.final_layer_norm(h)
        if self.config.pools_at_argmax:
            at = jnp.argmax(input_ids, axis=-1)
        else:
            at = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)  # the first eos (0: none)
        pooled = last[jnp.arange(b), at]  # [b, hidden]
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(last, pooled, tuple(hidden_states) if output_hidden_states else None, text_embeds)
