"""A transformers CLIPTextConfig config.json as a CLIPTextConfig: each field honoured, refused, or irrelevant.

The one reader of transformers' text-encoder config.json (a diffusers pipeline's `text_encoder/` and
`text_encoder_2/`). Every field is in exactly one of HONOURED (read into CLIPTextConfig), DEFAULTS (refused,
in one line naming the field and its value, unless it holds the value the model computes with) and IRRELEVANT
(does not change the output). A field in none of them is refused too, so a field transformers adds later is
noticed (parity_tests/test_text.py walks transformers' own CLIPTextConfig). Imports no transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_sgm.errors import CheckpointError

TEXT_MODEL_TYPE = "clip_text_model"
# transformers' architectures of a text tower -> whether it holds the text projection.
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
# What other CLIP configs hold, for the one-line refusal.
NOT_A_TEXT_TOWER = {
    "clip": "a full CLIP model (CLIPModel: text and vision towers)",
    "clip_vision_model": "a CLIP vision tower",
}

# transformers' CLIPTextConfig defaults: what a config.json that leaves a field out means.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}

# Read into CLIPTextConfig (see config_fields); model_type and architectures say what the tower is.
HONOURED = (*TRANSFORMERS_DEFAULTS, "model_type", "architectures")

# Refused unless they hold these values (what CLIPTextModel computes).
DEFAULTS: dict[str, Any] = {
    "attention_dropout": 0.0,  # flax_sgm's attention function has no dropout
}

_GENERIC = "a transformers PretrainedConfig field that CLIP's text model does not read"
# Do not change the output, with why.
IRRELEVANT = {
    "dropout": "written by old configs; transformers' CLIP text model applies no hidden dropout",
    "initializer_range": "initialization only",
    "initializer_factor": "initialization only",
    "dtype": "the stored dtype; flax_sgm reads the weights' own (or param_dtype=)",
    "torch_dtype": "the stored dtype (older name of `dtype`)",
    "transformers_version": "metadata",
    "_name_or_path": "metadata",
    "_commit_hash": "metadata",
    "_attn_implementation": "torch's attention kernel; flax_sgm picks its backend itself (sdp_backend)",
    "output_attentions": "what transformers returns, not what it computes",
    "output_hidden_states": "what transformers returns (flax_sgm: output_hidden_states=)",
    "return_dict": "what transformers returns",
    "use_return_dict": "what transformers returns",
    "torchscript": "torch export only",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
    "num_labels": "classification heads only",
    "finetuning_task": "metadata",
    "tokenizer_class": "the tokenizer, not the model",
    "prefix": "the tokenizer, not the model",
    "sep_token_id": "the tokenizer, not the model",
    "task_specific_params": "metadata",
    **{name: _GENERIC for name in (
        "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
        "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings", "pruned_heads",
        "decoder_start_token_id", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
        "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
        "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
        "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
        "suppress_tokens", "begin_suppress_tokens",
    )},
}

ACTIVATIONS = ("quick_gelu", "gelu")  # transformers' ACT2FN "gelu" is the exact erf form


def has_projection(config: Mapping[str, Any]) -> bool | None:
    """Whether the config's architectures hold the text projection; None when it names none."""
    names = config.get("architectures") or []
    found = {ARCHITECTURES[n] for n in names if n in ARCHITECTURES}
    return found.pop() if len(found) == 1 else None


def _int(config, name: str, source: str, *, token: bool = False) -> int | None:
    """A size (a positive int) or a token id (an int or None)."""
    value = config.get(name, TRANSFORMERS_DEFAULTS[name])
    if token and value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or (not token and value <= 0):
        raise CheckpointError(f"{source}: {name} = {value!r} is not {'an int' if token else 'a positive int'}")
    return value


def config_fields(config: Mapping[str, Any], source: str, *, projection: bool | None = None) -> dict[str, Any]:
    """CLIPTextConfig's fields from a transformers CLIPTextConfig config.json.

    `projection`: whether the weights hold a text projection, used when `architectures` does not say.
    CheckpointError, one line naming the field and its value, for what CLIPTextModel cannot compute.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: not a transformers config (a JSON {type(config).__name__})")
    kind = config.get("model_type")
    if kind != TEXT_MODEL_TYPE:
        said = NOT_A_TEXT_TOWER.get(kind, f"a {kind!r} config" if kind else "no `model_type`")
        raise CheckpointError(f"{source}: {said}, not a CLIP text tower (model_type {TEXT_MODEL_TYPE!r})")
    names = config.get("architectures") or []
    unknown_arch = [n for n in names if n not in ARCHITECTURES]
    if unknown_arch:
        raise CheckpointError(
            f"{source}: architectures {names} is not one of {sorted(ARCHITECTURES)} (flax_sgm builds CLIP's text tower)"
        )
    known = set(HONOURED) | set(DEFAULTS) | set(IRRELEVANT)
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise CheckpointError(f"{source}: field {unknown[0]} = {config[unknown[0]]!r} is unknown to flax_sgm's CLIPTextModel")
    for name, default in DEFAULTS.items():
        if name in config and config[name] != default:
            raise CheckpointError(
                f"{source}: {name} = {config[name]!r} is not supported (CLIPTextModel computes {name} = {default!r})"
            )
    act = config.get("hidden_act", TRANSFORMERS_DEFAULTS["hidden_act"])
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act = {act!r} is not supported ({' or '.join(map(repr, ACTIVATIONS))})")
    eps = config.get("layer_norm_eps", TRANSFORMERS_DEFAULTS["layer_norm_eps"])
    if eps is None:  # transformers' CLIPTextConfig allows None and then builds nn.LayerNorm(eps=None): an error there
        raise CheckpointError(f"{source}: layer_norm_eps = None is not a number")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise CheckpointError(f"{source}: layer_norm_eps = {eps!r} is not a positive number")
    eos = config.get("eos_token_id", TRANSFORMERS_DEFAULTS["eos_token_id"])
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise CheckpointError(
            f"{source}: eos_token_id = {eos!r} is not supported (one int: the pooled vector is read at that token)"
        )
    fields = {
        name: _int(config, name, source)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings")
    }
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise CheckpointError(
            f"{source}: hidden_size {fields['hidden_size']} does not split into num_attention_heads "
            f"{fields['num_attention_heads']}"
        )
    with_projection = has_projection(config)
    with_projection = projection if with_projection is None else with_projection
    return dict(
        fields,
        hidden_act=act,
        layer_norm_eps=float(eps),
        projection_dim=_int(config, "projection_dim", source) if with_projection else None,
        eos_token_id=eos,
        pad_token_id=_int(config, "pad_token_id", source, token=True),
        bos_token_id=_int(config, "bos_token_id", source, token=True),
    )
