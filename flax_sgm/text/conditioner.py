"""sgm's text conditioning for the released models: which layer each text embedder takes, and SDXL's `context`
and vector `y`.

sgm's GeneralConditioner runs each embedder of a checkpoint and concatenates their outputs: token embeddings
along the features into `context` (SDXL: 768 + 1280 = 2048), vectors into `y` (SDXL: the pooled 1280 beside
the size and crop ids, each embedded by 256 sinusoids: 2816; the refiner's 1280 + 5 * 256 = 2560). An
EmbedderSpec says what one embedder hands on; EMBEDDERS holds sgm's for the released models. `condition` also
gives the zeroed unconditional embeddings (force_zeros) and training's classifier-free dropout (ucg_rate, keyed);
legacy_ucg is sgm's other dropout, of the prompt text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_sgm.text.model import CLIPTextModel
from flax_sgm.unet.model import sdxl_vector

LAYERS = ("last", "penultimate", "hidden", "pooled")


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
    """What one of sgm's text embedders hands the UNet.

    layer: "last" (the last layer), "penultimate" (the one before it), "hidden" (hidden_states[layer_idx], 0 being
      the embeddings), "pooled" (the pooled vector as one token).
    final_norm: the final layer norm on that layer (sgm's FrozenCLIPEmbedder "last" and its legacy OpenCLIP
      embedder, SD 2.x: yes; SDXL's "hidden" and FrozenOpenCLIPEmbedder2's "penultimate": no).
    pooled: also hand on the pooled vector for `y` (text_embeds where the tower has a projection).
    ucg_rate: sgm's classifier-free dropout for training: each output (context part, pooled vector) of each
      prompt is zeroed with this probability, each output drawn on its own (GeneralConditioner.forward draws
      one Bernoulli per output of an embedder). Applied only when `condition` is given a PRNG key.
    """

    layer: str = "last"
    layer_idx: int | None = None
    final_norm: bool = True
    pooled: bool = False
    ucg_rate: float = 0.0

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"EmbedderSpec: `layer` must be one of {LAYERS}; got {self.layer!r}")
        if (self.layer == "hidden") != (self.layer_idx is not None):
            raise ValueError(f"EmbedderSpec: `layer_idx` goes with layer='hidden' only; got layer={self.layer!r}, "
                             f"layer_idx={self.layer_idx!r}")
        if not isinstance(self.ucg_rate, (int, float)) or isinstance(self.ucg_rate, bool) or not 0 <= self.ucg_rate <= 1:
            raise ValueError(f"EmbedderSpec: `ucg_rate` must be a probability in [0, 1]; got {self.ucg_rate!r}")


# sgm's embedders of the released models, by sgm's embedder number (configs/inference/*.yaml).
EMBEDDERS = {
    "sd15": (EmbedderSpec("last"),),  # FrozenCLIPEmbedder
    "sd21": (EmbedderSpec("penultimate", final_norm=True),),  # FrozenOpenCLIPEmbedder, legacy: ln_final applied
    "sdxl-base": (
        EmbedderSpec("hidden", layer_idx=11, final_norm=False),  # FrozenCLIPEmbedder(layer="hidden", layer_idx=11)
        EmbedderSpec("penultimate", final_norm=False, pooled=True),  # FrozenOpenCLIPEmbedder2, always_return_pooled
    ),
    "sdxl-refiner": (EmbedderSpec("penultimate", final_norm=False, pooled=True),),
}


def embed(model: CLIPTextModel, input_ids: jax.Array, spec: EmbedderSpec) -> tuple[jax.Array, jax.Array | None]:
    """(context part [b, n, hidden], pooled [b, p] or None) of one embedder."""
    out = model(input_ids, output_hidden_states=spec.layer != "pooled")
    if spec.layer == "pooled":
        context = out.pooler_output[:, None]
    elif spec.layer == "last" and spec.final_norm:
        context = out.last_hidden_state
    else:
        index = {"last": -1, "penultimate": -2}.get(spec.layer, spec.layer_idx)
        if not -len(out.hidden_states) <= index < len(out.hidden_states):
            raise ValueError(f"EmbedderSpec: layer_idx {index} is past the {len(out.hidden_states)} hidden states")
        context = out.hidden_states[index]
        context = model.final_layer_norm(context) if spec.final_norm else context
    pooled = None
    if spec.pooled:
        pooled = out.text_embeds if out.text_embeds is not None else out.pooler_output
    return context, pooled


def legacy_ucg(key: jax.Array, prompts: Sequence[str], rate: float, value: str = "") -> list[str]:
    """sgm's `legacy_ucg_value` dropout (its SD 1.x / 2.x training configs): each prompt replaced by `value`
    with probability `rate` before tokenizing, in place of zeroing its embedding (EmbedderSpec.ucg_rate)."""
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1:
        raise ValueError(f"legacy_ucg: `rate` must be a probability in [0, 1]; got {rate!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    drop = np.asarray(jax.random.bernoulli(key, rate, (len(prompts),)))
    return [value if d else p for p, d in zip(prompts, drop)]


def dropout(key: jax.Array, emb: jax.Array, rate: float) -> jax.Array:
    """sgm's ucg dropout of one output: each row zeroed with probability `rate` (a Bernoulli of 1 - rate per row)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, (emb.shape[0],))
    return emb * keep.reshape((-1,) + (1,) * (emb.ndim - 1)).astype(emb.dtype)


def condition(models: Sequence[CLIPTextModel], input_ids: Sequence[jax.Array], specs: Sequence[EmbedderSpec],
              time_ids: jax.Array | None = None, *, time_dim: int = 256, key: jax.Array | None = None,
              force_zeros: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """sgm's GeneralConditioner over text embedders: (`context` [b, n, sum of widths], `y` or None).

    time_ids: SDXL's size and crop conditions [b, k] (base: original h, w, crop top, left, target h, w; the
      refiner: original h, w, crop top, left, aesthetic score), each embedded by `time_dim` sinusoids beside
      the pooled vector (sdxl_vector; sgm's ConcatTimestepEmbedderND, 256; diffusers' addition_time_embed_dim).
    key: a PRNG key for training's classifier-free dropout (EmbedderSpec.ucg_rate); None (inference): none.
      Output n of the embedders, in sgm's order (embedder by embedder, context before pooled), draws from
      jax.random.fold_in(key, n).
    force_zeros: the text embedders' outputs (context and pooled) zeroed, the size embeddings kept: sgm's
      force_uc_zero_embeddings=["txt"] and diffusers' force_zeros_for_empty_prompt negative conditioning.
    """
    if not len(models) == len(input_ids) == len(specs):
        raise ValueError(f"condition: {len(models)} models, {len(input_ids)} id arrays, {len(specs)} specs; one each")
    rows = [np.shape(ids)[0] if np.ndim(ids) else None for ids in input_ids]  # the embedders check their own ranks
    if len(set(rows)) > 1:  # else a raw concatenate error, or the pooled vector blamed for time_ids' batch
        raise ValueError(f"condition: the id arrays have {', '.join(map(str, rows))} rows; one per prompt in each")
    if time_ids is not None and np.ndim(time_ids) == 2 and rows[0] is not None and np.shape(time_ids)[0] != rows[0]:
        raise ValueError(f"condition: `time_ids` has {np.shape(time_ids)[0]} rows for {rows[0]} prompts; one per prompt")
    contexts, pooled, n = [], [], 0
    for model, ids, spec in zip(models, input_ids, specs):
        context, vector = embed(model, ids, spec)
        outputs = [context] if vector is None else [context, vector]
        for j, emb in enumerate(outputs):
            if key is not None and spec.ucg_rate > 0:
                emb = dropout(jax.random.fold_in(key, n), emb, spec.ucg_rate)
            if force_zeros:
                emb = jnp.zeros_like(emb)
            outputs[j] = emb
            n += 1
        contexts.append(outputs[0])
        pooled += outputs[1:]
    context = jnp.concatenate(contexts, axis=-1)
    if time_ids is None:
        return context, None
    if len(pooled) != 1:
        raise ValueError(f"condition: `y` takes one pooled vector; the specs give {len(pooled)}")
    return context, sdxl_vector(pooled[0], jnp.asarray(time_ids, jnp.float32), time_dim)
