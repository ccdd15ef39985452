"""The torch reference: the seed's sgm attention module, made to run (see attention.py)."""

from torch_ref.attention import (
    BACKEND_MAP,
    XFORMERS_IS_AVAILABLE,
    BasicTransformerBlock,
    BasicTransformerSingleLayerBlock,
    CrossAttention,
    FeedForward,
    GEGLU,
    LinearAttention,
    MemoryEfficientCrossAttention,
    Normalize,
    SpatialSelfAttention,
    SpatialTransformer,
    checkpoint,
    zero_module,
)

__all__ = [
    "BACKEND_MAP",
    "XFORMERS_IS_AVAILABLE",
    "BasicTransformerBlock",
    "BasicTransformerSingleLayerBlock",
    "CrossAttention",
    "FeedForward",
    "GEGLU",
    "LinearAttention",
    "MemoryEfficientCrossAttention",
    "Normalize",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "checkpoint",
    "zero_module",
]
