"""The tiny random models that the tests, the benchmarks, `flax-sgm verify` and the docs build: diffusers' own
classes in configs small enough for seconds on a 2-core CPU, one per kind of released model. Kept here, once,
so a fixture changes in one place. Needs diffusers (and torch) only when a model is built.

  UNETS   UNet2DConditionModel configs: sd1, sd2, sdxl, refiner, projection (class_embed_type), lcm, ssd1b
  VAES    AutoencoderKL configs
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



# AutoencoderKL: two levels with the mid block's attention (what `flax-sgm verify --model vae` runs).
VAES = {
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
    ),
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
