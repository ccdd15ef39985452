"""The CLIP / OpenCLIP text encoders: config (CLIPTextConfig), model (CLIPTextModel), transformers (the reader of
transformers' config.json), layout (the key layouts: transformers', open_clip's, sgm's single files), load
(load_text_encoder, exported as flax_sgm.load_text_encoder: a family's package imports no loader), conditioner (sgm's layer choice per embedder, SDXL's context and y), tokenizer
(transformers' CLIPTokenizer from a folder)."""

from flax_sgm.text.conditioner import EMBEDDERS, EmbedderSpec, condition, embed
from flax_sgm.text.config import CLIPTextConfig
from flax_sgm.text.model import CLIPTextModel, CLIPTextOutput
from flax_sgm.text.tokenizer import load_tokenizer, tokenize

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "EMBEDDERS",
    "EmbedderSpec",
    "condition",
    "embed",
    "load_tokenizer",
    "tokenize",
]
