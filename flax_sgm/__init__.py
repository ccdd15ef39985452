"""flax-sgm: Stable Diffusion's sgm attention module in Flax NNX, with parity to its PyTorch original.

Tiers: primitives (norms, GEGLU, FeedForward) -> attention (attention_backends: the
one attention function and its backend choice; attention: the attention modules)
-> blocks -> transformer. Weight mapping: convert.py. Numerical defaults: numerics.py.
Tolerances and the torch comparison: flax_sgm.verify (needs torch; not imported
here). Files and the CLI: checkpoints.py, cli.py. Meshes: sharding.py.
"""

from flax_sgm.attention import CrossAttention, LinearAttention, MemoryEfficientCrossAttention, SpatialSelfAttention
from flax_sgm.attention_backends import dot_product_attention, select_backend
from flax_sgm.blocks import BasicTransformerBlock, BasicTransformerSingleLayerBlock
from flax_sgm.checkpoints import load_pretrained
from flax_sgm.primitives import GEGLU, FeedForward, Normalize, zero_module
from flax_sgm.remat import CHECKPOINT_POLICIES
from flax_sgm.transformer import SpatialTransformer

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
    "dot_product_attention",
    "load_pretrained",
    "select_backend",
    "zero_module",
]
