"""Call conventions: how a torch module and its flax_sgm twin are called on the same inputs.

Inputs are named as flax_sgm names its arguments (`x`, `context`, `mask`,
`additional_tokens`, ...). `x` goes first and positionally to both sides; an `x` of
rank 4 is an NCHW image for torch and NHWC for flax_sgm, and so is the output.
torch_ref's and the seed's modules take flax_sgm's names; diffusers' take others and
return other types, which `adapter_for` knows. Any other module: pass a CallAdapter.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclasses.dataclass(frozen=True)
class CallAdapter:
    """How to call a torch module: `names` maps a flax_sgm argument name to torch's where they differ,
    `torch_kwargs` are constant keywords added to torch's call, `output` picks the tensor out of what
    torch returns, `method` is the torch method called (default: the module itself), `key_layout` gives
    the flax module's KeyLayout for torch's parameter names (default: the module's own, sgm's)."""

    names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    torch_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    output: Callable[[Any], Any] = _first
    method: str | None = None
    key_layout: Callable[[Any], Any] | None = None

    def call_torch(self, module, x, kwargs: Mapping[str, Any]):
        call = module if self.method is None else getattr(module, self.method)
        renamed = {self.names.get(k, k): v for k, v in kwargs.items()}
        return self.output(call(x, **renamed, **self.torch_kwargs))

    def call_flax(self, module, x, kwargs: Mapping[str, Any]):
        """flax_sgm's twin on the same inputs (flax_sgm's names): one array back."""
        return module(x, **kwargs)

    def flax_names(self, torch_module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """A recorded torch call (args, kwargs) as flax_sgm-named inputs; `x` is the first argument.

        None arguments are dropped. Raises ValueError for an argument flax_sgm has no name for.
        """
        forward = torch_module.forward if self.method is None else getattr(torch_module, self.method)
        bound = inspect.signature(forward).bind(*args, **kwargs).arguments
        params = inspect.signature(forward).parameters
        back = {torch_name: ours for ours, torch_name in self.names.items()}
        named = {}
        for i, (name, value) in enumerate(bound.items()):
            pairs = value.items() if params[name].kind == inspect.Parameter.VAR_KEYWORD else [(name, value)]
            for torch_name, v in pairs:
                if v is None or torch_name in self.torch_kwargs:
                    continue
                if i == 0:
                    named["x"] = v
                elif self.names and torch_name not in back:
                    raise ValueError(
                        f"{type(torch_module).__name__} was called with `{torch_name}`, which its flax_sgm twin does "
                        "not take; verify it through an explicit CallAdapter"
                    )
                else:
                    named[back.get(torch_name, torch_name)] = v
        return named


SGM = CallAdapter()
# diffusers' Attention, BasicTransformerBlock and Transformer2DModel: hidden_states, encoder_hidden_states.
DIFFUSERS = CallAdapter(names={"context": "encoder_hidden_states"})
DIFFUSERS_TRANSFORMER_2D = CallAdapter(names={"context": "encoder_hidden_states"}, torch_kwargs={"return_dict": False})


@dataclasses.dataclass(frozen=True)
class DiffusersUNetAdapter(CallAdapter):
    """diffusers' UNet2DConditionModel called with flax_sgm's (x, timesteps, context, y).

    sgm's vector `y` is what diffusers' add_embedding (SDXL's text_time) or class_embedding
    ('projection') reads: it is fed there whole, by a forward pre-hook, so its gradient is
    compared too (sdxl_vector builds y from text_embeds and time_ids).
    """

    vector: str | None = None  # "add_embedding", "class_embedding" or None

    def call_torch(self, module, x, kwargs: Mapping[str, Any]):
        kwargs = dict(kwargs)
        y = kwargs.pop("y", None)
        if y is None or self.vector is None:
            return super().call_torch(module, x, kwargs)
        if self.vector == "class_embedding":
            return super().call_torch(module, x, kwargs | {"class_labels": y})
        width = getattr(module.config, "addition_time_embed_dim", None) or 1
        b = y.shape[0]
        # Placeholders of a consistent width: the hook replaces what diffusers concatenates from them.
        added = {"text_embeds": y.new_zeros(b, y.shape[1] % width), "time_ids": y.new_zeros(b, y.shape[1] // width)}
        handle = module.add_embedding.register_forward_pre_hook(lambda _mod, _args: (y,))
        try:
            return super().call_torch(module, x, kwargs | {"added_cond_kwargs": added})
        finally:
            handle.remove()


def _diffusers_unet(torch_module) -> CallAdapter:
    from flax_sgm.unet.diffusers import vector_embedding
    from flax_sgm.unet.layout import diffusers_layout

    vector = vector_embedding(torch_module.config)
    return DiffusersUNetAdapter(
        names={"context": "encoder_hidden_states", "timesteps": "timestep"},
        torch_kwargs={"return_dict": False},
        key_layout=lambda flax_unet: diffusers_layout(flax_unet.config, vector),
        vector=vector,
    )


def _diffusers_vae(torch_module) -> CallAdapter:
    """diffusers' AutoencoderKL: forward(sample) decodes the posterior's mode, as flax_sgm's model(x) does."""
    from flax_sgm.autoencoder.layout import diffusers_layout

    return CallAdapter(torch_kwargs={"return_dict": False}, key_layout=lambda flax_vae: diffusers_layout(flax_vae.config))


# An autoencoder's ResnetBlock2D: no timestep embedding, but forward(x, temb) still takes one.
VAE_RESNET = CallAdapter(torch_kwargs={"temb": None})

# diffusers' UNet parts by class: ResnetBlock2D(x, temb); the samplers and TimestepEmbedding take x alone.
DIFFUSERS_PARTS = {
    "Transformer2DModel": DIFFUSERS_TRANSFORMER_2D,
    "ResnetBlock2D": CallAdapter(names={"emb": "temb"}),
    "Downsample2D": SGM,
    "Upsample2D": SGM,
    "TimestepEmbedding": SGM,
}


def clip_text_outputs(out, cat) -> Any:
    """Every output of a CLIP text model, transformers' or flax_sgm's, in one [b, features] array (`cat`:
    torch.cat or jnp.concatenate): last_hidden_state, text_embeds where there is a projection (transformers'
    CLIPTextModelWithProjection returns no pooler_output), else pooler_output, then each of hidden_states."""
    b = out.last_hidden_state.shape[0]
    text_embeds = getattr(out, "text_embeds", None)
    parts = [out.last_hidden_state.reshape(b, -1), out.pooler_output if text_embeds is None else text_embeds]
    parts += [h.reshape(b, -1) for h in (out.hidden_states or ())]
    return cat(parts, -1)


@dataclasses.dataclass(frozen=True)
class TransformersCLIPTextAdapter(CallAdapter):
    """transformers' CLIPTextModel / CLIPTextModelWithProjection called with flax_sgm's (input_ids as `x`,
    attention_mask, inputs_embeds): the output is every output at once (clip_text_outputs). transformers'
    forward takes no inputs_embeds: they replace its token embedding's output through a forward hook, so their
    gradient (prompt tuning) is compared too."""

    def call_torch(self, module, x, kwargs: Mapping[str, Any]):
        import torch

        kwargs = dict(kwargs)
        embeds = kwargs.pop("inputs_embeds", None)
        text = getattr(module, "text_model", module)
        handle = None
        if embeds is not None:
            handle = text.embeddings.token_embedding.register_forward_hook(lambda _mod, _args, _out: embeds)
        try:
            out = module(x, **kwargs, output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()
        return clip_text_outputs(out, torch.cat)

    def call_flax(self, module, x, kwargs: Mapping[str, Any]):
        import jax.numpy as jnp

        return clip_text_outputs(module(x, **kwargs, output_hidden_states=True), jnp.concatenate)


def _transformers_clip_text(torch_module) -> CallAdapter:
    from flax_sgm.text.layout import TRANSFORMERS

    # transformers 5's CLIPTextModel has flax_sgm's own names; CLIPTextModelWithProjection keeps `text_model.`.
    layout = TRANSFORMERS if hasattr(torch_module, "text_model") else None
    return TransformersCLIPTextAdapter(key_layout=(lambda _flax: layout) if layout else None)


def adapter_for(torch_module) -> CallAdapter:
    """The call convention of torch_ref's, the seed's, diffusers' modules and transformers' CLIP text models."""
    cls = type(torch_module)
    if cls.__module__.startswith("transformers") and cls.__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return _transformers_clip_text(torch_module)
    if not cls.__module__.startswith("diffusers"):
        return SGM
    if cls.__name__ == "UNet2DConditionModel":
        return _diffusers_unet(torch_module)
    if cls.__name__ == "AutoencoderKL":
        return _diffusers_vae(torch_module)
    if cls.__name__ == "ResnetBlock2D" and getattr(torch_module, "time_emb_proj", None) is None:
        return VAE_RESNET
    return DIFFUSERS_PARTS.get(cls.__name__, DIFFUSERS)
