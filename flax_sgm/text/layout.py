"""Where a CLIP text tower's tensors sit in the files users hold, and which keys beside them are not its.

CLIPTextModel has transformers 5's names (convert.conversion_table gives them: `embeddings.token_embedding.weight`,
`encoder.layers.N.self_attn.q_proj.weight`, `final_layer_norm.weight`, `text_projection.weight`), which is how
transformers 5 saves a CLIPTextModel. Other layouts of the same tensors (KeyLayouts, rows of the one table):
  TRANSFORMERS  `text_model.` before all but the projection: transformers 4's CLIPTextModel (every released
                diffusers `text_encoder/`) and CLIPTextModelWithProjection (`text_encoder_2/`); sgm's
                FrozenCLIPEmbedder under `cond_stage_model.transformer.` (SD 1.x) and
                `conditioner.embedders.0.transformer.` (SDXL).
  open_clip     `open_clip_layout(config)`: sgm's FrozenOpenCLIPEmbedder(2) under `cond_stage_model.model.`
                (SD 2.x), `conditioner.embedders.1.model.` (SDXL) and `conditioner.embedders.0.model.` (the
                refiner): `transformer.resblocks.N.` with nn.MultiheadAttention's fused `in_proj_weight`
                (q, k, v stacked) and `text_projection` stored [hidden, projection] (a matmul's operand, not
                a Linear's weight).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from flax_sgm.checkpoints.convert import IDENTITY, LINEAR, KeyLayout, fused
from flax_sgm.attention.layout import LORA_FILES, listing, top_level_prefixes
from flax_sgm.errors import CheckpointError
from flax_sgm.text.config import PRESETS, CLIPTextConfig

TRANSFORMERS = KeyLayout(
    "transformers",
    (
        ("embeddings.", "text_model.embeddings."),
        ("encoder.", "text_model.encoder."),
        ("final_layer_norm.", "text_model.final_layer_norm."),
        ("text_projection.", "text_projection."),
    ),
)
OPEN_CLIP_NAMES = (  # per layer: CLIPEncoderLayer's children -> open_clip's ResidualAttentionBlock's
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
QKV = ("q_proj", "k_proj", "v_proj")  # in_proj_weight's order


def open_clip_layout(config: CLIPTextConfig) -> KeyLayout:
    """open_clip's names for a tower of `config` (generated per layer)."""
    pairs = [
        ("embeddings.token_embedding.", "token_embedding."),
        ("embeddings.position_embedding.weight", "positional_embedding"),
        ("final_layer_norm.", "ln_final."),
        ("text_projection.weight", "text_projection"),
    ]
    transforms = [("text_projection.weight", IDENTITY)]  # stored [hidden, projection]: flax's kernel layout
    modules = []
    for i in range(config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        modules.append((ours, theirs))
        pairs += [(ours + a, theirs + b) for a, b in OPEN_CLIP_NAMES]
        for index, proj in enumerate(QKV):
            pairs.append((f"{ours}self_attn.{proj}.weight", f"{theirs}attn.in_proj_weight"))
            pairs.append((f"{ours}self_attn.{proj}.bias", f"{theirs}attn.in_proj_bias"))
            transforms.append((f"{ours}self_attn.{proj}.weight", fused(LINEAR, index, len(QKV))))
            transforms.append((f"{ours}self_attn.{proj}.bias", fused(IDENTITY, index, len(QKV))))
    return KeyLayout("open_clip", tuple(pairs), tuple(modules), tuple(transforms))


# Keys beside a tower that are not the text model's, by layout, relative to the tower's prefix: each is named as
# ignored (TextEncoderPlan.ignored), never dropped unsaid; any other key the model does not use is an error.
IGNORED = {
    "transformers": (
        ("text_model.embeddings.position_ids", "transformers 4's position-id buffer (positions are 0..n-1)"),
        ("embeddings.position_ids", "transformers 4's position-id buffer (positions are 0..n-1)"),
    ),
    "open_clip": (
        ("attn_mask", "the causal mask, which the model builds"),
        ("logit_scale", "CLIP's contrastive temperature, not the text tower's"),
        ("visual.", "open_clip's image tower"),
    ),
}


def ignored_reason(key: str, kind: str) -> str | None:
    """Why a key (relative to a tower's prefix) of a `kind` layout is not the model's; None when it should be."""
    for pattern, reason in IGNORED[kind]:
        if key == pattern or (pattern.endswith(".") and key.startswith(pattern)):
            return reason
    return None


# sgm/LDM single files ---------------------------------------------------------------------------------------

SD_PREFIXES = (("cond_stage_model.transformer.", "transformers"), ("cond_stage_model.model.", "open_clip"))
_SGM_EMBEDDER = re.compile(r"^conditioner\.embedders\.(\d+)\.(transformer|model)\.")
SGM_KIND = {"transformer": "transformers", "model": "open_clip"}
# What marks a tower in each layout (relative to its prefix): its token embedding.
TOKEN_EMBEDDING = {
    "transformers": "text_model.embeddings.token_embedding.weight",
    "open_clip": "token_embedding.weight",
}
FLAT_TOKEN_EMBEDDING = "embeddings.token_embedding.weight"  # transformers 5's CLIPTextModel, saved at a file's root
KIND_NAMES = {"transformers": "CLIP, transformers' names", "open_clip": "OpenCLIP, open_clip's names"}


class Tower(NamedTuple):
    """One text encoder in a checkpoint: sgm's embedder number, its key prefix and its layout kind."""

    embedder: int
    prefix: str
    kind: str  # "transformers" or "open_clip"
    flat: bool = False  # transformers' names without `text_model.` (transformers 5's CLIPTextModel)

    def layout(self, config: CLIPTextConfig) -> KeyLayout | None:
        if self.kind == "open_clip":
            return open_clip_layout(config)
        return None if self.flat else TRANSFORMERS

    def describe(self) -> str:
        return f"{self.embedder} ({self.prefix or 'the root'}: {KIND_NAMES[self.kind]})"


def find_towers(keys: Iterable[str]) -> list[Tower]:
    """Every text tower of a checkpoint's keys, by sgm's embedder number."""
    keys = set(keys)
    found = []
    if TOKEN_EMBEDDING["transformers"] in keys:
        found.append(Tower(0, "", "transformers"))
    elif FLAT_TOKEN_EMBEDDING in keys:
        found.append(Tower(0, "", "transformers", flat=True))
    for prefix, kind in SD_PREFIXES:
        if prefix + TOKEN_EMBEDDING[kind] in keys:
            found.append(Tower(0, prefix, kind))
    embedders = {}
    for key in keys:
        if (m := _SGM_EMBEDDER.match(key)) and key == m.group(0) + TOKEN_EMBEDDING[SGM_KIND[m.group(2)]]:
            embedders[int(m.group(1))] = Tower(int(m.group(1)), m.group(0), SGM_KIND[m.group(2)])
    return found + [embedders[n] for n in sorted(embedders)]


# What a checkpoint holds instead of a text tower, by its keys' first names.
NOT_TEXT = {
    "model.diffusion_model.": "a UNet",
    "first_stage_model.": "a VAE",
    "vision_model.": "a CLIP vision tower",
    "visual.": "an open_clip image tower",
    "down_blocks.": "a diffusers model",
    "encoder.": "a VAE",
    **LORA_FILES,
}


def choose_tower(keys: list[str], embedder: int, source: str) -> Tower:
    """The tower sgm calls embedder `embedder`; one line saying what there is when it is not there."""
    towers = find_towers(keys)
    if not towers and TOKEN_EMBEDDING["open_clip"] in keys and any(k.startswith("visual.") for k in keys):
        raise CheckpointError(
            f"{source}: a full open_clip CLIP model (text and image towers at the root), not a text encoder as sgm or "
            "diffusers hold one (an sgm single file's conditioner.embedders.N.model., or a text_encoder/ directory)"
        )
    if not towers:
        tops = top_level_prefixes(keys)
        kinds = sorted({kind for start, kind in NOT_TEXT.items() if any(k.startswith(start) for k in keys)})
        what = f" ({' and '.join(kinds)})" if kinds else ""
        raise CheckpointError(
            f"{source}: no text encoder (no cond_stage_model.* or conditioner.embedders.* token embedding); "
            f"it holds {listing(tops, 8)}{what}"
        )
    if towers[0].prefix == "" and any(k.startswith("vision_model.") for k in keys):
        raise CheckpointError(
            f"{source}: a full CLIP model (text and vision towers, CLIPModel), not a text encoder; save its text tower "
            "alone (CLIPTextModel or CLIPTextModelWithProjection)"
        )
    chosen = [t for t in towers if t.embedder == embedder]
    if not chosen:
        held = "; ".join(t.describe() for t in towers)
        extra = ""
        if any(k.startswith(f"conditioner.embedders.{embedder}.") for k in keys):
            extra = f" (conditioner.embedders.{embedder} holds no text tower)"
        elif any(t.prefix.startswith("conditioner.") for t in towers):
            extra = " (SDXL's embedders after the text encoders are the size and crop embedders, which have no weights)"
        raise CheckpointError(f"{source}: embedder={embedder} is no text encoder{extra}; its text encoders: {held}")
    return chosen[0]


def config_fields_from_weights(shapes: Mapping[str, Any], tower: Tower, source: str) -> dict[str, Any]:
    """CLIPTextConfig's fields that a tower's shapes show: all but the heads and the activation."""
    local = {k[len(tower.prefix):]: tuple(v.shape) for k, v in shapes.items() if k.startswith(tower.prefix)}
    if tower.kind == "open_clip":
        names = dict(token="token_embedding.weight", position="positional_embedding", fc1="transformer.resblocks.{}.mlp.c_fc.weight",
                     layer=re.compile(r"^transformer\.resblocks\.(\d+)\."), projection="text_projection")
    else:
        stem = "" if tower.flat else "text_model."
        names = dict(token=stem + "embeddings.token_embedding.weight", position=stem + "embeddings.position_embedding.weight",
                     fc1=stem + "encoder.layers.{}.mlp.fc1.weight", layer=re.compile(rf"^{re.escape(stem)}encoder\.layers\.(\d+)\."),
                     projection="text_projection.weight")
    try:
        vocab, hidden = local[names["token"]]
        positions = local[names["position"]][0]
        layers = 1 + max((int(m.group(1)) for k in local if (m := names["layer"].match(k))), default=-1)
        intermediate = local[names["fc1"].format(0)][0]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: the text encoder under {tower.prefix!r} is not CLIP's text tower (no {err})") from None
    projection = local.get(names["projection"])
    if projection is not None:
        projection = projection[1] if tower.kind == "open_clip" else projection[0]
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                max_position_embeddings=positions, projection_dim=projection)


def config_from_weights(shapes: Mapping[str, Any], tower: Tower, *, config: CLIPTextConfig | None = None,
                        source: str = "checkpoint", **options) -> CLIPTextConfig:
    """The CLIPTextConfig of a tower in a single file: a released one (PRESETS) by its shapes, or `config`,
    which the shapes must fit; one line naming what differs otherwise."""
    fields = config_fields_from_weights(shapes, tower, source)
    if config is not None:
        differ = [f"{k} {v!r} (config= has {getattr(config, k)!r})" for k, v in fields.items() if getattr(config, k) != v]
        if differ:
            raise CheckpointError(f"{source}: the text encoder under {tower.prefix!r} does not fit config=: {listing(differ, 4)}")
        return config.replace(**options)
    for preset in PRESETS.values():
        if all(getattr(preset, k) == v for k, v in fields.items()):
            return preset.replace(**options)
    raise CheckpointError(
        f"{source}: the text encoder under {tower.prefix!r} is none of {', '.join(PRESETS)} by its shapes ({fields['num_hidden_layers']} "
        f"layers of {fields['hidden_size']}): give config= (a CLIPTextConfig; the weights do not say the heads or the activation)"
    )
