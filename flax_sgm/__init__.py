"""flax-sgm: Stability AI's sgm (Stable Diffusion's UNet, KL autoencoder, CLIP text encoders and the seed's
attention module) in Flax NNX, with strict PyTorch/diffusers weight loading and parity to the originals.

A folder per model family, each with the same rooms (config, model, the foreign config's reader, layout, load):
attention/ (the seed's tier), unet/, autoencoder/, text/; LoRA: lora/; samplers: sampling/; prompt to image: pipeline/. Shared layers: nn/
(numerics, primitives, checks).
Which model a config builds: models.py. Reading checkpoints: checkpoints/ (sources, the conversion-table engine,
the converted directory). Errors: errors.py. Tolerances and the torch comparison: verify/ (needs torch; not
imported here). The CLI: cli/. Meshes: sharding.py. Lowering for another platform: lowering.py.
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
from flax_sgm.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from flax_sgm.autoencoder.load import load_vae
from flax_sgm.text import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from flax_sgm.text.load import load_text_encoder
from flax_sgm.sampling import SchedulerConfig, SgmSamplerConfig, sample
from flax_sgm.pipeline import Pipeline, PipelineOutput, load_pipeline
from flax_sgm import lora
from flax_sgm.lora import add_adapters, fuse_lora, load_lora, save_lora, set_lora_scale, unload_lora

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
    "SgmSamplerConfig",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "SpatialTransformerConfig",
    "UNetConfig",
    "UNetModel",
    "add_adapters",
    "choose_backend",
    "convert_file",
    "dot_product_attention",
    "forward_mode_scope",
    "fuse_lora",
    "guidance_scale_embedding",
    "load_pretrained",
    "load_pretrained_all",
    "load_lora",
    "load_text_encoder",
    "load_pipeline",
    "load_unet",
    "load_vae",
    "record_attention_calls",
    "sample",
    "save_lora",
    "set_lora_scale",
    "sdxl_vector",
    "select_backend",
    "target_platform",
    "unload_lora",
    "zero_module",
]
