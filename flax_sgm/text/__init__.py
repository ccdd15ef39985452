"""The CLIP / OpenCLIP text encoders: config (CLIPTextConfig), model (CLIPTextModel), transformers (the reader of
transformers' config.json), layout (the key layouts: transformers', open_clip's, sgm's single files), load
(load_text_encoder)."""

from flax_sgm.text.config import CLIPTextConfig
from flax_sgm.text.load import load_text_encoder
from flax_sgm.text.model import CLIPTextModel, CLIPTextOutput

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "load_text_encoder"]
