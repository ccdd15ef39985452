"""flax-sgm: Stable Diffusion's sgm attention module in Flax NNX, with parity to its PyTorch original.

Tiers: primitives (norms, GEGLU, FeedForward) -> attention (attention_backends: the
one attention function and its backend choice; attention: the attention modules)
-> blocks -> transformer. Weight mapping: convert.py. Numerical defaults: numerics.py.
Tolerances and the torch comparison: flax_sgm.verify (needs torch; not imported
here). Configs: config.py. Checkpoints: layout.py (where stacks sit, what keys
mean), sources.py (reading files and diffusers directories), pretrained.py
(load_pretrained, convert_file), output.py (the converted directory). The CLI:
cli.py. Meshes: sharding.py. The whole UNet: unet.py (UNetModel), unet_config.py
(UNetConfig), unet_diffusers.py (diffusers' config.json), unet_layout.py (its key
layouts), pretrained_unet.py (load_unet). Lowering for another platform: lowering.py.
"""

from flax_sgm.attention import CrossAttention, LinearAttention, MemoryEfficientCrossAttention, SpatialSelfAttention
from flax_sgm.attention_backends import dot_product_attention, select_backend
from flax_sgm.blocks import BasicTransformerBlock, BasicTransformerSingleLayerBlock
from flax_sgm.config import SpatialTransformerConfig
from flax_sgm.pretrained import load_pretrained, load_pretrained_all
from flax_sgm.primitives import GEGLU, FeedForward, Normalize, zero_module
from flax_sgm.remat import CHECKPOINT_POLICIES
from flax_sgm.transformer import SpatialTransformer
from flax_sgm.pretrained_unet import load_unet
from flax_sgm.unet import UNetModel
from flax_sgm.unet_config import UNetConfig

__all__ = [
    "BasicTransformerBlock",
    "BasicTransformerSingleLayerBlock",
    "CHECKPOINT_POLICIES",
    "CrossAttention",
    "FeedForward",
    "GEGLU",
    "LinearAttention",
    "MemoryEfficientCrossAttention",
    "Normalize",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "SpatialTransformerConfig",
    "UNetConfig",
    "UNetModel",
    "dot_product_attention",
    "load_pretrained",
    "load_pretrained_all",
    "load_unet",
    "select_backend",
    "zero_module",
]
