"""CLIPTextConfig: the CLIP / OpenCLIP text tower's architecture, typed and frozen; CLIPTextModel is built from it.

Fields keep transformers' CLIPTextConfig names. `projection_dim` is None for a tower without the text
projection (transformers' CLIPTextModel, sgm's FrozenCLIPEmbedder) and its width for one with it
(CLIPTextModelWithProjection, open_clip's towers). `from_transformers` reads a transformers config.json
(transformers.py). Imports nothing of the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any


from flax_sgm.config_io import ConfigIO
from flax_sgm.nn import numerics
from flax_sgm.text.transformers import config_fields

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI CLIP's x * sigmoid(1.702 x); OpenCLIP's exact erf GELU
# transformers' rule for where the pooled vector is read: a config whose eos_token_id is this (every config
# written before transformers PR #24773, the released SD ones among them) pools at the largest id of each
# sequence, as open_clip does (the end token 49407 is the largest in CLIP's vocabulary); any other pools at
# the first position equal to eos_token_id.
LEGACY_EOS_TOKEN_ID = 2


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"CLIPTextConfig: `{name}` must be a positive int; got {value!r}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ConfigIO):
    """transformers' CLIPTextConfig fields that change the maths, plus flax_sgm's `sdp_backend`.

    eos_token_id: where pooler_output is read (LEGACY_EOS_TOKEN_ID: the largest id; else the first eos).
    pad_token_id, bos_token_id: recorded from the checkpoint's config; the model does not read them
    (the tokenizer pads and opens a prompt).
    sdp_backend: the attention backend (attention_policy: "auto", "xla", "cudnn", "chunked"); None is "auto".
    """

    NAME = "CLIP text"
    OPTIONS = ("sdp_backend",)  # flax_sgm's own fields, which a loader may set

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = numerics.LAYER_NORM_EPS
    projection_dim: int | None = None
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    sdp_backend: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            _positive(name, getattr(self, name))
        if self.projection_dim is not None:
            _positive("projection_dim", self.projection_dim)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size {self.hidden_size} does not split into {self.num_attention_heads} heads"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: `hidden_act` must be one of {ACTIVATIONS}; got {self.hidden_act!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or isinstance(self.layer_norm_eps, bool) or self.layer_norm_eps <= 0:
            raise ValueError(f"CLIPTextConfig: `layer_norm_eps` must be a positive number; got {self.layer_norm_eps!r}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"CLIPTextConfig: `eos_token_id` must be an int; got {self.eos_token_id!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pools_at_argmax(self) -> bool:
        """Whether pooler_output is read at each sequence's largest id (the legacy rule) or at its first eos."""
        return self.eos_token_id == LEGACY_EOS_TOKEN_ID

    @classmethod
    def from_transformers(cls, config: dict, *, source: str = "config.json", projection: bool | None = None,
                          **options) -> CLIPTextConfig:
        """A transformers CLIPTextConfig config.json: every field honoured, refused in one line, or irrelevant.

        `projection`: whether the weights hold the text projection, where `architectures` does not say.
        `options` set flax_sgm's own fields (sdp_backend).
        """
        return cls(**config_fields(config, source, projection=projection), **options)

    @classmethod
    def preset(cls, name: str, **changes) -> CLIPTextConfig:
        if name not in PRESETS:
            raise ValueError(f"no CLIP text preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name].replace(**changes)


# The released towers, as Stable Diffusion holds them (sgm's embedders; diffusers' config.json of the same
# checkpoints agree). Every one uses 64-wide heads, 77 positions and CLIP's 49408-token vocabulary, and the
# legacy eos_token_id (pooling at the largest id, as open_clip).
PRESETS = {
    # OpenAI CLIP ViT-L/14: SD 1.x's text encoder and SDXL's first; sgm's FrozenCLIPEmbedder holds it without
    # the projection.
    "clip-vit-l-14": CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"
    ),
    # OpenCLIP ViT-H/14 (LAION-2B): SD 2.x's, 24 layers (SD 2.x reads the 23rd).
    "openclip-vit-h-14": CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu",
        projection_dim=1024,
    ),
    # OpenCLIP ViT-bigG/14 (LAION-2B): SDXL's second text encoder and the refiner's only one.
    "openclip-vit-bigg-14": CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
        projection_dim=1280,
    ),
}
