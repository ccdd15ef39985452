"""The tiny random models that the tests, the benchmarks, `flax-sgm verify` and the docs build: diffusers' own
classes in configs small enough for seconds on a 2-core CPU, one per kind of released model. Kept here, once,
so a fixture changes in one place. Needs diffusers (and torch) only when a model is built.

  UNETS   UNet2DConditionModel configs: sd1, sd2, sdxl, refiner, projection (class_embed_type), lcm, ssd1b
  VAES    AutoencoderKL configs: tiny, groups8, pipeline (four levels, factor 8)
  TOWERS  transformers' text towers: clip (CLIPTextModel), openclip and eos (CLIPTextModelWithProjection)
  unet(kind), vae(kind), tower(kind)   the model, seeded random, in eval mode
  tokenizer(pad)              a CLIP BPE tokenizer over a 1000-token vocabulary (transformers' CLIPTokenizer)
  pipeline(family, sampler)   a whole StableDiffusionPipeline ("sd") or StableDiffusionXLPipeline ("sdxl") of
                              tiny random models, 32 x 32 images, and SCHEDULERS' miniature of a released scheduler
  randomize_(module, seed)  every parameter of a torch module seeded random, in place
"""

from __future__ import annotations

from pathlib import Path

_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, sample_size=8)
UNETS = {
    # SD 1.x: heads by count, conv projections, attention at the top level only; self-attention off at level 0.
    "sd1": dict(
        _UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        only_cross_attention=(True, False),
    ),
    # SD 2.x: heads by width (2 x 16, 4 x 16), linear projections; FiLM-style time embedding (scale_shift).
    "sd2": dict(
        _UNET,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        resnet_time_scale_shift="scale_shift",
        upcast_attention=True,
    ),
    # SDXL: no attention at level 0, depth 2 at level 1, the vector y through text_time.
    "sdxl": dict(
        _UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 + 6 * 8,  # pooled 8 and SDXL's six size/crop ids of 8 each
        norm_eps=1e-3,
    ),
    # SDXL refiner: four levels, attention in the middle two, depth 2, y through text_time.
    "refiner": dict(
        _UNET,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4, 4),
        transformer_layers_per_block=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 2 * 8,
    ),
    # A vector y through class_embed_type 'projection' (diffusers' class_embedding, sgm's label_emb).
    "projection": dict(
        _UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=12,
    ),
    # An LCM-distilled UNet: the guidance-scale embedding (timestep_cond) through time_embedding.cond_proj.
    "lcm": dict(
        _UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        time_cond_proj_dim=16,
    ),
    # SSD-1B/Vega-shaped: depths per layer (a list per block) and up blocks unlike the down ones.
    "ssd1b": dict(
        _UNET,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=[1, [2, 1]],
        reverse_transformer_layers_per_block=[[1, 3, 2], 1],
    ),
}



# AutoencoderKL at three sizes.
_LEVELS2 = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
VAES = {
    # Two levels with the mid block's attention, 32 groups (sgm's Normalize): what `flax-sgm verify --model vae` runs.
    "tiny": dict(_LEVELS2, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16),
    # 8 groups, two ResnetBlocks per level, a 3-level x8 downsampling, latents of 3 channels, no mid attention.
    "groups8": dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    block_out_channels=(16, 16, 32), layers_per_block=2, latent_channels=3, norm_num_groups=8,
                    sample_size=16, mid_block_add_attention=False),
    # The released VAEs' four levels (factor 8) at 32 channels: the tiny pipelines' (PIPELINE_SIZE images).
    "pipeline": dict(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, sample_size=32),
}


def randomize_(module, seed: int):
    """Every parameter random (proj_out too, which the seed zeroes), in place.

    Weights ~ N(0, 1 / fan_in) so activations stay O(1); biases ~ N(0, 1/16);
    norm scales 1 + N(0, 0.01).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim > 1:  # Linear [out, in] or Conv2d [out, in, kh, kw]
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # LayerNorm / GroupNorm scale
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.25 * noise)
    return module


def unet(kind: str = "sd1", *, seed: int = 0, **fields):
    """diffusers' UNet2DConditionModel of UNETS[kind] (fields changed by `fields`), every weight seeded random,
    in eval mode."""
    from diffusers import UNet2DConditionModel

    return randomize_(UNet2DConditionModel(**UNETS[kind] | fields).eval(), seed)


def vae(kind: str = "tiny", *, seed: int = 0, **fields):
    """diffusers' AutoencoderKL of VAES[kind] (fields changed by `fields`), seeded random, in eval mode."""
    from diffusers import AutoencoderKL

    return randomize_(AutoencoderKL(**VAES[kind] | fields).eval(), seed)


def save(model, path, **kwargs) -> Path:
    """`model.save_pretrained(path)`: a directory as users hold it; returns the path."""
    model.save_pretrained(path, **kwargs)
    return Path(path)


# A CLIP BPE vocabulary in miniature: letters, one merged word ("cat"), the start and end tokens last, as CLIP's.
VOCAB = 1000


def tokenizer(pad: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer over VOCAB tokens, padding with `pad` (SD's pads with the end token, SDXL's
    second with "!", id 0, as open_clip): what a pipeline's tokenizer/ folder holds, in miniature."""
    import string

    from transformers import CLIPTokenizer

    vocab = {}
    for ch in ["!", *string.ascii_lowercase]:
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    vocab["ca"], vocab["cat</w>"] = len(vocab), len(vocab) + 1
    while len(vocab) < VOCAB - 2:
        vocab[f"q{len(vocab)}q</w>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = VOCAB - 2, VOCAB - 1
    return CLIPTokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t</w>")], pad_token=pad, model_max_length=77)


# transformers' text towers: (class, CLIPTextConfig fields).
_TOWER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, bos_token_id=0, pad_token_id=1)
TOWERS = {
    # OpenAI CLIP ViT-L's kind (SD 1.x, SDXL's first): quick_gelu, no projection, the legacy eos_token_id 2.
    "clip": ("CLIPTextModel", dict(_TOWER, hidden_act="quick_gelu", eos_token_id=2)),
    # OpenCLIP's kind (SD 2.x, SDXL's second): exact GELU, a projection, 4 heads, another layer-norm eps.
    "openclip": ("CLIPTextModelWithProjection", dict(_TOWER, hidden_act="gelu", eos_token_id=2, num_attention_heads=4,
                                                     projection_dim=24, layer_norm_eps=1e-3)),
    # A config written after transformers PR #24773: the pooled vector at the first eos_token_id, not the argmax.
    "eos": ("CLIPTextModelWithProjection", dict(_TOWER, hidden_act="quick_gelu", eos_token_id=7, projection_dim=16)),
}


def tower(kind: str = "clip", *, seed: int = 0, **fields):
    """transformers' text tower of TOWERS[kind] (fields changed by `fields`), seeded random, in eval mode."""
    import transformers

    cls, kwargs = TOWERS[kind]
    return randomize_(getattr(transformers, cls)(transformers.CLIPTextConfig(**kwargs | fields)).eval(), seed)


# Whole pipelines: 32 x 32 images (4 x 4 latents through the VAE's factor 8).
PIPELINE_SIZE = 32
_PIPELINE_UNET = dict(sample_size=PIPELINE_SIZE // 8, block_out_channels=(32, 64), layers_per_block=1)
PIPELINE_UNETS = {
    "sd": dict(_PIPELINE_UNET, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2),
    "sdxl": dict(_PIPELINE_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8),
}
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# The released pipelines' scheduler configs, in miniature (SD 1.5's DDIM-style fields, SDXL's Euler's).
SCHEDULERS = {
    "ddim": ("DDIMScheduler", dict(_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   timestep_spacing="leading")),
    "euler": ("EulerDiscreteScheduler", dict(_BETAS, steps_offset=1, timestep_spacing="leading")),
    "pndm": ("PNDMScheduler", dict(_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(_BETAS, use_karras_sigmas=True, steps_offset=1)),
    "heun": ("HeunDiscreteScheduler", dict(_BETAS, timestep_spacing="leading", steps_offset=1)),
    "lms": ("LMSDiscreteScheduler", dict(_BETAS, timestep_spacing="trailing")),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict(_BETAS, steps_offset=1, timestep_spacing="leading")),
}


def scheduler(name: str):
    """diffusers' scheduler of SCHEDULERS[name]."""
    import diffusers

    cls, kwargs = SCHEDULERS[name]
    return getattr(diffusers, cls)(**kwargs)


def pipeline(family: str = "sd", sampler: str = "ddim"):
    """diffusers' StableDiffusionPipeline ("sd") or StableDiffusionXLPipeline ("sdxl") of tiny seeded random
    models and tokenizers, with SCHEDULERS[sampler]; `save_pretrained` makes it a directory as users hold one."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    net = randomize_(UNet2DConditionModel(**PIPELINE_UNETS[family]).eval(), 1)
    clip = tower("clip", seed=3)
    if family == "sd":
        return StableDiffusionPipeline(vae=vae("pipeline", seed=2), text_encoder=clip,
                                       tokenizer=tokenizer("<|endoftext|>"), unet=net, scheduler=scheduler(sampler),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae("pipeline", seed=2, scaling_factor=0.13025, force_upcast=True),
                                     text_encoder=clip, text_encoder_2=tower("openclip", seed=4),
                                     tokenizer=tokenizer("<|endoftext|>"), tokenizer_2=tokenizer("!"),
                                     unet=net, scheduler=scheduler(sampler), add_watermarker=False)
