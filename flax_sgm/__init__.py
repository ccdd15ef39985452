"""flax-sgm: Stable Diffusion's sgm attention module in Flax NNX, with parity to its PyTorch original.

Tiers: primitives (norms, GEGLU, FeedForward) -> attention (attention_policy: which
backend runs and why; chunked_attention: the O(n) kernel; attention_backends: the one
attention function, its dispatch and scopes; attention: the attention modules)
-> blocks -> transformer. Weight mapping: convert.py. Numerical defaults: numerics.py.
Tolerances and the torch comparison: flax_sgm.verify (needs torch; not imported
here). Configs: config.py. Checkpoints: layout.py (where stacks sit, what keys
mean), sources.py (reading files and diffusers directories), pretrained.py
(load_pretrained, convert_file), output.py (the converted directory). The CLI:
cli/. Meshes: sharding.py. The whole UNet: unet.py (UNetModel), unet_config.py
(UNetConfig), unet_diffusers.py (diffusers' config.json), unet_layout.py (its key
layouts), pretrained_unet.py (load_unet). The text encoders: text/ (CLIPTextModel, load_text_encoder). Samplers: sampling/ (SchedulerConfig, sample).
Prompt to image: pipeline/ (load_pipeline).
Lowering for another platform: lowering.py.
"""

from flax_sgm.attention.modules import CrossAttention, LinearAttention, MemoryEfficientCrossAttention, SpatialSelfAttention
from flax_sgm.attention.backends import dot_product_attention, forward_mode_scope, record_attention_calls, target_platform
from flax_sgm.attention.policy import AttentionProblem, Choice, choose_backend, select_backend
from flax_sgm.attention.blocks import BasicTransformerBlock, BasicTransformerSingleLayerBlock
from flax_sgm.attention.config import SpatialTransformerConfig
from flax_sgm import models
from flax_sgm.checkpoints import convert
from flax_sgm.errors import ConversionError
from flax_sgm.errors import CheckpointError
from flax_sgm.attention.load import convert_file, load_pretrained, load_pretrained_all
from flax_sgm.nn.primitives import GEGLU, FeedForward, Normalize, zero_module
from flax_sgm.attention.remat import CHECKPOINT_POLICIES
from flax_sgm.unet.load import load_unet
from flax_sgm.attention.transformer import SpatialTransformer
from flax_sgm.unet.model import UNetModel, guidance_scale_embedding, sdxl_vector
from flax_sgm.unet.config import UNetConfig
from flax_sgm.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, load_vae
from flax_sgm.text import CLIPTextConfig, CLIPTextModel, CLIPTextOutput, load_text_encoder
from flax_sgm.sampling import SchedulerConfig, sample
from flax_sgm.pipeline import Pipeline, PipelineOutput, load_pipeline

__all__ = [
    "AttentionProblem",
    "AutoencoderConfig",
    "AutoencoderKL",
    "BasicTransformerBlock",
    "BasicTransformerSingleLayerBlock",
    "CHECKPOINT_POLICIES",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "CheckpointError",
    "Choice",
    "ConversionError",
    "CrossAttention",
    "DiagonalGaussian",
    "FeedForward",
    "GEGLU",
    "LinearAttention",
    "MemoryEfficientCrossAttention",
    "Normalize",
    "Pipeline",
    "PipelineOutput",
    "SchedulerConfig",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "SpatialTransformerConfig",
    "UNetConfig",
    "UNetModel",
    "choose_backend",
    "convert_file",
    "dot_product_attention",
    "forward_mode_scope",
    "guidance_scale_embedding",
    "load_pretrained",
    "load_pretrained_all",
    "load_text_encoder",
    "load_pipeline",
    "load_unet",
    "load_vae",
    "record_attention_calls",
    "sample",
    "sdxl_vector",
    "select_backend",
    "target_platform",
    "zero_module",
]
